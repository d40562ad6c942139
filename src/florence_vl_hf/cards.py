"""Model cards (README.md) with the Hub metadata every folder the package writes carries: conversions (rendered by
conversion/card.py), `save_hub_folder` (training outputs, merged LoRA models, random models), LoRA adapters and the
bundled florence-vl-tiny."""

import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .families import family_of

REQUIRED_METADATA = {"library_name": "transformers", "pipeline_tag": "image-text-to-text"}
TAGS = ["florence-vl", "florence-2", "vision-language", "image-text-to-text", "custom_code"]


def license_for(text_model_type: str) -> str:
    """The weights' licence follows the LLM's (its family's licence; "other" for an LLM of no family)."""
    try:
        return family_of(text_model_type).licence
    except ValueError:
        return "other"


def hub_base_model(name_or_path) -> str | None:
    """A Hub repo id a model was loaded from (`user/name`), or None for a local folder or an unnamed model."""
    name = str(name_or_path or "")
    if not name or os.path.exists(name) or name.count("/") != 1 or name.startswith((".", "/")):
        return None
    return name


def check_card_metadata(text: str, needs=REQUIRED_METADATA) -> ModelCard:
    """Parse a README.md with huggingface_hub; ValueError names what the Hub metadata lacks."""
    try:
        card = ModelCard(text)
    except Exception as error:
        raise ValueError(f"the model card does not parse: {error}") from error
    data = card.data.to_dict()
    for key, value in needs.items():
        if data.get(key) != value:
            raise ValueError(f"model card metadata {key} is {data.get(key)!r}, expected {value!r}")
    if not data.get("license"):
        raise ValueError("model card metadata has no license")
    return card


def metadata_block(text_model_type: str, base_model=None) -> str:
    tags = [*TAGS, text_model_type]
    data = ModelCardData(license=license_for(text_model_type), base_model=base_model, tags=tags, **REQUIRED_METADATA)
    return f"---\n{data.to_yaml()}\n---\n"


def saved_model_card(config, name: str, description: str, base_model=None) -> str:
    """The README of a folder written by `save_hub_folder`: metadata, what the model is, how to load it."""
    text_model = config.text_config.model_type
    text = f"""{metadata_block(text_model, base_model)}
# {name}

A Florence-VL model (Florence-2's DaViT and encoder under the caption, OCR and grounding prompts, fused into a
{text_model} language model) written by `florence_vl_hf`. {description}

```python
from transformers import pipeline

pipe = pipeline("image-text-to-text", model="{name}", trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image", "url": "image.png"}}, {{"type": "text", "text": "What is here?"}}]}}]
print(pipe(text=messages, max_new_tokens=32)[0]["generated_text"][-1]["content"])
```

The folder holds its own modeling code (`trust_remote_code`); with `florence_vl_hf` installed, `trust_remote_code` is not
needed.
"""
    check_card_metadata(text)
    return text


def write_card(folder, text: str) -> Path:
    """Write README.md atomically (a temporary file in the folder, then a rename)."""
    path = Path(folder) / "README.md"
    staging = path.with_name(f".README.md.{os.getpid()}.tmp")
    staging.write_text(text)
    os.replace(staging, path)
    return path


def complete_adapter_card(folder, config) -> Path:
    """PEFT writes an adapter's README with `library_name: peft` and its base model: add the pipeline tag, the
    licence and the tags the Hub needs to list it with Florence-VL."""
    path = Path(folder) / "README.md"
    text_model = config.text_config.model_type
    card = ModelCard.load(path) if path.is_file() else ModelCard(metadata_block(text_model))
    card.data.pipeline_tag = REQUIRED_METADATA["pipeline_tag"]
    card.data.license = card.data.license or license_for(text_model)
    card.data.tags = sorted({*(card.data.tags or []), *TAGS})
    check_card_metadata(str(card), needs={"pipeline_tag": REQUIRED_METADATA["pipeline_tag"]})
    return write_card(folder, str(card))
