"""Florence-VL as a Hugging Face Transformers model.

Importing the package registers model_type "florence_vl" with AutoConfig, AutoModel,
AutoModelForImageTextToText and AutoProcessor, and marks the classes so that save_pretrained writes a
trust_remote_code folder (auto_map plus the flat payload files).
"""

from importlib import resources
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .modeling import (
    FlorenceVLConfig,
    FlorenceVLForConditionalGeneration,
    FlorenceVLModel,
    FlorenceVLPreTrainedModel,
    FlorenceVLVisionFeatureCache,
)
from .processing import FlorenceVLProcessor, build_processor

__version__ = "0.1.0"


def from_pretrained_parts(florence2, language_model, **kwargs):
    """A new Florence-VL (model, processor) from a Florence-2 checkpoint and a causal LM, with a fresh projector.

    See `florence_vl_hf.conversion.parts.from_pretrained_parts`.
    """
    from .conversion.parts import from_pretrained_parts as build

    return build(florence2, language_model, **kwargs)


def tiny_model_dir() -> Path:
    """Folder of florence-vl-tiny, the small Florence-VL trained on ShapesVQA that ships with the package;
    load it with `AutoModelForImageTextToText.from_pretrained` / `AutoProcessor.from_pretrained` or `pipeline`."""
    folder = Path(str(resources.files("florence_vl_hf") / "florence_vl_tiny"))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"florence-vl-tiny is not bundled in this installation ({folder} has no config.json); "
            "reproduce it with `florence-vl train-tiny OUTPUT_DIR`"
        )
    return folder


AutoConfig.register(FlorenceVLConfig.model_type, FlorenceVLConfig, exist_ok=True)
AutoModel.register(FlorenceVLConfig, FlorenceVLModel, exist_ok=True)
AutoModelForImageTextToText.register(FlorenceVLConfig, FlorenceVLForConditionalGeneration, exist_ok=True)
AutoProcessor.register(FlorenceVLConfig, FlorenceVLProcessor, exist_ok=True)

FlorenceVLConfig.register_for_auto_class()
FlorenceVLModel.register_for_auto_class("AutoModel")
FlorenceVLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
FlorenceVLProcessor.register_for_auto_class()

__all__ = [
    "FlorenceVLConfig",
    "FlorenceVLForConditionalGeneration",
    "FlorenceVLModel",
    "FlorenceVLPreTrainedModel",
    "FlorenceVLProcessor",
    "FlorenceVLVisionFeatureCache",
    "build_processor",
    "from_pretrained_parts",
    "tiny_model_dir",
]
