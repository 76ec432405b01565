"""One error hierarchy. The library raises these; the CLI prints `str(err)` as one line and exits with
`err.exit_code`. Every message says which file or key, what is wrong and what to do next."""
from __future__ import annotations


class LoraboxError(Exception):
    """Base of every error lorabox raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} {hint}")


class InputFileError(LoraboxError):
    """A file that cannot be used at all: missing, a directory, truncated, pickle, not safetensors."""

    exit_code = 2


class NotALoraError(InputFileError):
    """A readable safetensors file that holds no LoRA."""


class UnknownArchitecture(LoraboxError):
    """No key map explains the file's keys (or several do, equally well)."""

    exit_code = 2


class UnmappedKeysError(LoraboxError):
    """Keys that no key map understands; listed, with the nearest known spelling."""

    def __init__(self, message: str, keys: list[str], *, hint: str | None = None):
        self.keys = list(keys)
        super().__init__(message, hint=hint)


class ShapeMismatch(LoraboxError):
    """Tensors whose shapes do not fit together (down/up ranks, slice sizes)."""


class UnsupportedConversion(LoraboxError):
    """A well-formed adapter that the target dialect cannot express exactly."""


class KeyMapError(LoraboxError):
    """A key-map table that does not load or contradicts itself (a bug in key_maps/)."""


class OutputError(LoraboxError):
    """An output path that would overwrite an input, or cannot be written."""

    exit_code = 2


class TrainingError(LoraboxError):
    """Training cannot start or go on: data, base, configuration or a diverging loss."""


class DataError(TrainingError):
    """A training folder that cannot be used: empty, no captions, no image left after skipping bad ones."""

    exit_code = 2


class ObjectiveMismatch(TrainingError):
    """An objective (or timestep sampling, schedule) the base was not trained with."""


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 3
