"""Training: one job runs an arm's list of stages (each its own loss, length, lr and schedule) for each seed.

Light to import: the config and tracking modules need no torch. The trainer itself is in `sftkey.train.trainer`
(`train_arm`, `run_stage`); importing it here would pull torch into every `import sftkey.train`.
"""

from sftkey.config_file import ConfigError
from sftkey.train.config import TrainConfig, load_config
from sftkey.train.tracking import JsonlTracker, NullTracker, Tracker

__all__ = ["ConfigError", "JsonlTracker", "NullTracker", "TrainConfig", "Tracker", "load_config"]
