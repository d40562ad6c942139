"""Conversion of the original Florence-VL checkpoints, assembling from parts, Hub upload (fixtures in the original
layout: `florence_vl_hf.lab.fixture`).

Not part of the Hub payload.
"""

from .convert import convert_checkpoint
from .errors import ConversionError, PushError, VerificationError
from .hub import push_folder
from .source import open_source

__all__ = [
    "ConversionError",
    "PushError",
    "VerificationError",
    "convert_checkpoint",
    "open_source",
    "push_folder",
]
