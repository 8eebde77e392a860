"""Data sets: one entry each (registry), where records come from (sources), their canonical form (records), and
train/test overlap."""

from sftkey.data.overlap import can_share_records, held_out_config, shared_uids
from sftkey.data.records import DataError, Record, content_version
from sftkey.data.sources import DataConfig, load_records

__all__ = ["DataConfig", "DataError", "Record", "can_share_records", "content_version",
           "held_out_config", "load_records", "shared_uids"]
