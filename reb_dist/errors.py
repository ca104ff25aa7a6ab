"""Errors a user sees. Each names the file (or folder) and what is wrong with it."""

from __future__ import annotations

from pathlib import Path


class RebError(Exception):
    """Base class for every error reb_dist raises on purpose."""


class DatasetError(RebError, ValueError):
    """A dataset file or folder cannot be used: corrupt image, missing folder, wrong mask size..."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class BackboneError(RebError, RuntimeError):
    """A backbone is unknown or its ImageNet weights are not available."""


class ConfigError(RebError, ValueError):
    """A setting is unknown or has a bad value."""


class ModelFileError(RebError, ValueError):
    """A saved model file is missing, corrupt or incompatible."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`ray job stop`, `kill`): the command stops as on Ctrl-C (its MLflow runs FAILED); exit 143."""
