"""The exceptions `app.ml` raises. Callers catch `DetoxError` broadly or a subclass narrowly.

`InputError` and its subclasses mean the caller's input is wrong and retrying cannot help; the CLI
turns them into one line and exit status 2, a worker fails the job without retrying.
"""


class DetoxError(Exception):
    """Base of every error raised on purpose by `app.ml`."""


class InputError(DetoxError, ValueError):
    """Bad input: a file, a field, a case id, a parameter. The message names which."""


class UnknownArchitectureError(InputError):
    """The model's architecture has no known editable MLP output projection."""


class DeltaError(InputError):
    """A delta cannot be used: corrupt bytes, or made for another base model."""


class ChecksumMismatchError(DeltaError):
    """The delta's bytes do not hash to the sha256 recorded for them."""


class FingerprintMismatchError(DeltaError):
    """The delta was made for a different base model (config or original weights differ)."""


class EditCancelled(DetoxError):
    """The caller's cancellation check asked the edit to stop between steps."""


class ModelUnavailableError(DetoxError):
    """A model could not be fetched or converted (e.g. the package registry is unreachable)."""


class ExportError(InputError):
    """A version cannot be exported in the asked format (the message says why)."""


class NotExpressibleError(ExportError):
    """The delta changes something the format cannot hold (e.g. a bias, as a LoRA adapter)."""


class RankBoundError(ExportError):
    """No LoRA rank within `max_rank` meets the relative error bound for some module."""
