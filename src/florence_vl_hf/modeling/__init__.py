"""Florence-VL config and model (the Hub payload files live here, flat)."""

from .configuration_florence_vl import FlorenceVLConfig
from .modeling_florence_vl import (
    FlorenceVLForConditionalGeneration,
    FlorenceVLModel,
    FlorenceVLPreTrainedModel,
    FlorenceVLVisionFeatureCache,
)

__all__ = ["FlorenceVLConfig", "FlorenceVLForConditionalGeneration", "FlorenceVLModel", "FlorenceVLPreTrainedModel",
           "FlorenceVLVisionFeatureCache"]
