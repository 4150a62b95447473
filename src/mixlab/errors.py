"""mixlab's own exception types.

Every error that bad input can cause is a `MixlabError` whose message names the file, field,
parameter or value and what was expected. It subclasses ValueError, so callers that catch
ValueError keep working; the `mixlab` command prints the message on one line and exits with 2.
"""

from __future__ import annotations


class MixlabError(ValueError):
    """Bad input to mixlab; the message names the thing and what was expected."""


class ConfigError(MixlabError):
    """A configuration value is missing or out of range; the message names the field."""


class CheckpointError(MixlabError):
    """A checkpoint is missing, malformed or does not match the model; the message names the file."""


class DataError(MixlabError):
    """Bad training data: the message names the file, line or field and what was expected."""


class OutputError(MixlabError):
    """A destination mixlab refuses to write: it holds files mixlab did not write, is or contains a
    source, or is of the wrong kind (a folder where a file is expected, ...)."""


class GenerationError(MixlabError):
    """Generation cannot continue (for example, the model produced NaN logits)."""


class TrainingError(MixlabError):
    """Training cannot continue (for example, a non-finite loss)."""


__all__ = ["CheckpointError", "ConfigError", "DataError", "GenerationError", "MixlabError", "OutputError",
           "TrainingError"]
