"""Errors of the conversion tools: each names the file, key or setting at fault."""

from ..errors import CommandError


class ConversionError(CommandError, RuntimeError):
    """The source checkpoint cannot be converted faithfully (unknown/missing key, shape mismatch, bad file...)."""


class VerificationError(ConversionError):
    """The converted model does not compute what the source computes."""


class PushError(CommandError, RuntimeError):
    """Uploading a converted folder to the Hub failed; the folder itself is intact."""
