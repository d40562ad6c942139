"""Assembling Florence-VL models and Hub-ready folders from configs (not part of the Hub payload)."""

from pathlib import Path

import torch
from transformers import GenerationConfig

from .cards import hub_base_model, saved_model_card, write_card
from .families import family
from .modeling import FlorenceVLForConditionalGeneration
from .processing import build_processor, family_for


def generation_config_for(template: str) -> GenerationConfig:
    """Greedy generation stopping at the end-of-turn tokens of the LLM family `template` ("phi3": <|end|>,
    <|endoftext|>; "llama3": <|eot_id|>, <|end_of_text|>)."""
    upstream = GenerationConfig.from_pretrained(family(template).asset_dir)
    return GenerationConfig(
        bos_token_id=upstream.bos_token_id,
        eos_token_id=upstream.eos_token_id,
        pad_token_id=upstream.pad_token_id,
        do_sample=False,
    )


def build_random_model(config, seed: int = 0, template: str | None = None):
    """A randomly initialised model of `config` and its processor (`build_processor(config, template=template)`: the
    bundled tokenizer of the config's LLM family, whose `<image>` id the config must hold)."""
    template = family_for(config, template).name
    processor = build_processor(config, template=template)
    torch.manual_seed(seed)
    model = FlorenceVLForConditionalGeneration(config).eval()
    model.generation_config = generation_config_for(template)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


def save_hub_folder(model, processor, output_dir, description: str = "") -> Path:
    """save_pretrained of model and processor: safetensors, config with auto_map, the payload .py files, and a
    README.md with the Hub metadata (`description` says where the model comes from)."""
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    card = saved_model_card(model.config, output_dir.name, description, base_model=hub_base_model(model.name_or_path))
    write_card(output_dir, card)
    return output_dir
