"""Data sets: where records come from (sources) and their canonical form (records)."""

from sftkey.data.records import DataError, Record, content_version
from sftkey.data.sources import DATASETS, DataConfig, load_records

__all__ = ["DATASETS", "DataConfig", "DataError", "Record", "content_version", "load_records"]
