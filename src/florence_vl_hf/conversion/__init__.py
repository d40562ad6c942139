"""Conversion of the original Florence-VL checkpoints, fixtures in their layout, assembling from parts, Hub upload.

Not part of the Hub payload.
"""

from .convert import convert_checkpoint, open_source
from .errors import ConversionError, PushError, VerificationError
from .fixture import make_fixture
from .hub import push_folder

__all__ = [
    "ConversionError",
    "PushError",
    "VerificationError",
    "convert_checkpoint",
    "make_fixture",
    "open_source",
    "push_folder",
]
