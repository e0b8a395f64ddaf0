"""Exceptions a caller can act on: each names the file, field or record at fault."""


class TerrabeamError(Exception):
    """Base class: the CLI prints these without a traceback and exits non-zero."""


class ConfigError(TerrabeamError):
    """The pipeline configuration is invalid (field path, value and expectation in the message)."""


class InputError(TerrabeamError):
    """An input file is missing, unreadable or lacks a band."""


class GridMismatchError(TerrabeamError):
    """Inputs and the target grid (CRS, extent, patch size) do not fit together."""


class CorruptRecordError(TerrabeamError):
    """A TFRecord file fails its framing or CRC check (file and byte offset in the message)."""


class RecordCountError(TerrabeamError):
    """The number of records disagrees with the mixer's totalPatches."""


class ModelError(TerrabeamError):
    """The model cannot be loaded or does not fit the configured bands or patch size."""


class WorkspaceError(TerrabeamError):
    """The run workspace cannot be created or written."""


class TransientError(TerrabeamError):
    """A failure worth retrying: network trouble, HTTP 429/5xx, a lost worker."""


class DeployError(TerrabeamError):
    """A deployment cannot be rendered: the output folder or the files to bundle are not usable."""
