"""LoRA on Florence-VL's language model with PEFT."""

import re

from ..families import family_of

PROJECTOR = "multi_modal_projector"
VISION_TOWER = "vision_tower"


def lora_target_modules(text_config, names=None) -> str:
    """A PEFT `target_modules` regex matching the named linear layers inside the language model only (never the
    vision tower's or the projector's); by default its family's attention and MLP projections (`lora_targets`)."""
    if names is None:
        try:
            names = family_of(text_config).lora_targets
        except ValueError:
            raise ValueError(
                f"No default LoRA targets for a {text_config.model_type!r} LLM; pass target module names"
            ) from None
    alternatives = "|".join(re.escape(name) for name in names)
    return rf".*language_model\.layers\.\d+\..*\.({alternatives})"


def apply_lora(
    model,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules=None,
    train_projector: bool = True,
    train_vision_tower: bool = False,
):
    """Wrap `model` in a PEFT model with LoRA adapters on the LLM's linear layers.

    `train_projector` / `train_vision_tower` train those modules fully and save them with the adapter
    (`modules_to_save`); everything else is frozen.
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(target_modules, str):
        target_modules = [target_modules]
    modules_to_save = [name for name, keep in ((PROJECTOR, train_projector), (VISION_TOWER, train_vision_tower)) if keep]
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_modules(model.config.text_config, target_modules),
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
