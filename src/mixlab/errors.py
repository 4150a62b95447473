"""mixlab's own exception types.

Every error that bad input can cause is a `MixlabError` whose message names the file, field,
parameter or value and what was expected. It subclasses ValueError, so callers that catch
ValueError keep working; the `mixlab` command prints the message on one line and exits with 1 (the
command ran and failed), or with 2 for a `UsageError` (a flag's value), as for argparse's own errors.
"""

from __future__ import annotations


class MixlabError(ValueError):
    """Bad input to mixlab; the message names the thing and what was expected."""


class ConfigError(MixlabError):
    """A configuration value is missing or out of range; the message names the field. `setting`: the run
    setting it is about (a `TrainConfig` or `FinetuneConfig` field: "lr", "model_overrides"), where the
    check knows it: what blames a run's error on its config file or on a flag (`load_settings`)."""

    def __init__(self, message: str, *, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


class UsageError(ConfigError):
    """A command-line flag's value, or a combination of flags, that the command refuses (the `mixlab`
    command exits 2 for it, as argparse does for the values its types refuse)."""


class SettingsFileError(ConfigError):
    """A run's config file (`mixlab train run.toml`) cannot be read, or sets a setting the checks refuse; the
    message begins with its path. The command exits 1 for it, where the same value given by a flag is a
    `UsageError` (exit 2)."""


class CheckpointError(MixlabError):
    """A checkpoint is missing, malformed or does not match the model; the message names the file."""


class DataError(MixlabError):
    """Bad training data: the message names the file, line or field and what was expected."""


class OutputError(MixlabError):
    """A destination mixlab refuses to write: it holds files mixlab did not write, is or contains a
    source, or is of the wrong kind (a folder where a file is expected, ...)."""


class NotEnoughMemoryError(MixlabError, MemoryError):
    """A model whose weights cannot fit in the memory available, refused before a byte of them is read
    (the load would end in the kernel's out-of-memory kill); the message names the sizes and the API's
    arguments that fit. `sizes`: the message's first part, the sizes alone (what a command without
    those arguments says)."""

    def __init__(self, message: str, *, sizes: str | None = None) -> None:
        super().__init__(message)
        self.sizes = sizes or message


class GenerationError(MixlabError):
    """Generation cannot continue (for example, the model produced NaN logits)."""


class TrainingError(MixlabError):
    """Training cannot continue (for example, a non-finite loss)."""


__all__ = ["CheckpointError", "ConfigError", "DataError", "GenerationError", "MixlabError", "NotEnoughMemoryError",
           "OutputError", "SettingsFileError", "TrainingError", "UsageError"]
