"""Typed errors. The library raises these; the CLI prints them as one clear message."""

from __future__ import annotations


class MnmError(Exception):
    """Base class for every error that `mnm` reports to a user (no traceback needed)."""


class ConfigError(MnmError):
    """A configuration value (model config, target YAML, search setting) is invalid."""


class WidthsError(MnmError):
    """A widths specification does not fit the checkpoint (wrong length, unknown name, too wide)."""


class CheckpointError(MnmError):
    """A checkpoint directory is missing, unsafe, corrupt or inconsistent."""


class DataError(MnmError):
    """Text data for training or evaluation is missing or unusable."""


class ProfileError(MnmError):
    """A latency profile is missing, corrupt, or belongs to another checkpoint."""


class DeviceError(MnmError):
    """The requested device (e.g. CUDA) is not available on this machine."""


class SearchError(MnmError):
    """A search cannot start or continue (bad sampler, infeasible constraint, storage)."""


class ExportError(MnmError):
    """An export cannot be written or fails verification."""


class OverlapError(ConfigError):
    """An output path is, holds, or lies inside an input (writing it would destroy the input)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived. Raised by the CLI's signal handler so that `finally` blocks and atomic
    writes clean up as for Ctrl-C (a KeyboardInterrupt, so code that already handles
    interruption handles this too); the CLI then exits 143."""
