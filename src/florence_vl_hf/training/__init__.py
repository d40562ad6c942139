"""Training Florence-VL with transformers' Trainer and PEFT (not part of the Hub payload)."""

from .api import TrainingSetupError, TrainResult, launched_world_size, llm_template, train, training_arguments
from .data import (
    IGNORE_INDEX,
    ConversationDataset,
    FlorenceVLDataCollator,
    ImageCache,
    SampleError,
    load_conversations,
    tokenize_sample,
)
from .lora import apply_lora, lora_target_modules
from .stages import PAPER_RECIPES, STAGES, StageRecipe, apply_stage, paper_recipe
from .trainer import FlorenceVLTrainer

__all__ = [
    "IGNORE_INDEX",
    "PAPER_RECIPES",
    "STAGES",
    "ConversationDataset",
    "FlorenceVLDataCollator",
    "FlorenceVLTrainer",
    "ImageCache",
    "SampleError",
    "StageRecipe",
    "TrainResult",
    "TrainingSetupError",
    "apply_lora",
    "apply_stage",
    "launched_world_size",
    "llm_template",
    "load_conversations",
    "lora_target_modules",
    "paper_recipe",
    "tokenize_sample",
    "train",
    "training_arguments",
]
