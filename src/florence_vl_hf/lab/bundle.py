"""Ship a florence-vl-tiny trained by `train_tiny` inside the package, as `florence_vl_hf.tiny_model_dir()`."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from ..cards import check_card_metadata, metadata_block
from ..families import family
from ..files import replace_dir, sibling_prefix
from .shapes import QUESTION_TYPES

MAX_WEIGHTS_BYTES = 25_000_000
# What the bundled folder needs to load with the package's registered classes.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "processor_config.json",
               "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "training_report.json")  # fmt: skip
TOKENIZER_FAMILY = family("phi3")  # florence-vl-tiny uses the Phi-3.5-mini-instruct tokenizer, with its licence files
# The trust_remote_code payload, from the installed package's own sources (never from the trained folder, whose copies
# date from training), so that the bundle also loads where the package is not importable.
PAYLOAD_FILES = {
    "configuration_florence_vl.py": "modeling",
    "modeling_florence_vl.py": "modeling",
    "processing_florence_vl.py": "processing",
}


def payload_sources() -> dict[str, Path]:
    """The package's payload files by name."""
    package = Path(__file__).resolve().parent.parent
    return {name: package / folder / name for name, folder in PAYLOAD_FILES.items()}


def add_payload(folder, link: bool = False) -> Path:
    """Put the package's payload files into `folder`: copies, or with `link` relative symlinks to the sources (the
    package's own bundle: one copy of the code in the repository, resolved into files when a wheel is built)."""
    folder = Path(folder)
    for name, source in payload_sources().items():
        staged = folder / f".{name}.tmp"
        staged.unlink(missing_ok=True)
        if link:
            staged.symlink_to(os.path.relpath(source, folder.resolve()))
        else:
            shutil.copyfile(source, staged)
        os.replace(staged, folder / name)
    return folder


def default_bundle_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "florence_vl_tiny"


def bundle_tiny(model_dir, target=None, hardware: str | None = None) -> Path:
    """Copy the model `train_tiny` saved in `model_dir` into `target` (default: the package's `florence_vl_tiny`
    folder) with the tokenizer's licence and a model card, replacing what was there in one rename."""
    model_dir, target = Path(model_dir), Path(target or default_bundle_dir())
    missing = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} is not a train_tiny output: {', '.join(missing)} missing")
    size = (model_dir / "model.safetensors").stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise ValueError(f"{model_dir / 'model.safetensors'} has {size} bytes, over the {MAX_WEIGHTS_BYTES} budget")
    with safe_open(model_dir / "model.safetensors", "pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}
    if dtypes != {"BF16"}:
        raise ValueError(f"{model_dir / 'model.safetensors'} holds {sorted(dtypes)} tensors; the bundle ships bf16")
    report = json.loads((model_dir / "training_report.json").read_text())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=sibling_prefix(target, "staging"), dir=target.parent))
    try:
        for name in MODEL_FILES:
            shutil.copyfile(model_dir / name, staging / name)
        config = json.loads((staging / "config.json").read_text())
        add_payload(staging, link=target.resolve() == default_bundle_dir().resolve())
        for name in TOKENIZER_FAMILY.licence_files:
            stem, suffix = os.path.splitext(name)
            shutil.copyfile(TOKENIZER_FAMILY.asset_dir / name, staging / f"{stem}-phi-3.5-tokenizer{suffix}")
        (staging / "README.md").write_text(model_card(report, config, hardware))
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def different_tensors(first_dir, second_dir) -> list[str]:
    """Names of the tensors that differ (or exist in only one) between two folders' model.safetensors."""
    with safe_open(Path(first_dir) / "model.safetensors", "pt") as a, \
         safe_open(Path(second_dir) / "model.safetensors", "pt") as b:  # fmt: skip
        names = set(a.keys()) | set(b.keys())
        return sorted(name for name in names if name not in a.keys() or name not in b.keys()
                      or not torch.equal(a.get_tensor(name), b.get_tensor(name)))  # fmt: skip


def model_card(report: dict, config: dict, hardware: str | None = None) -> str:
    """The bundled folder's README: what the model is, its held-out accuracy per type, how it was trained."""
    evaluation, recipe = report["evaluation"], report["recipe"]
    per_type = evaluation["per_type"]
    rows = "\n".join(f"| {kind} | {per_type[kind]['accuracy']:.1%} | {per_type[kind]['total']} |"
                     for kind in QUESTION_TYPES)  # fmt: skip
    stages = [f"stage {n} {report[f'stage{n}']['seconds'] / 60:.0f} min" for n in (0, 1, 2) if f"stage{n}" in report]
    machine = hardware or report.get("hardware") or "unrecorded hardware"
    text = f"""{metadata_block(config["text_config"]["model_type"])}
# florence-vl-tiny

A small Florence-VL (a tiny DaViT and BART encoder at {config['image_size']} px, {config['fusion']} fusion, a
{config['text_config']['num_hidden_layers']}-layer Phi-3 over the real Phi-3.5 tokenizer and chat template),
trained from scratch on synthetic ShapesVQA images by `florence-vl train-tiny` (package florence_vl_hf). It
answers ShapesVQA's questions about ShapesVQA images and nothing else.

Held-out exact-match accuracy ({evaluation['data']['images']} fresh images, generator seed
{evaluation['data']['seed']}, greedy decoding): **{evaluation['accuracy']:.1%}** overall.

| question type | accuracy | questions |
| --- | --- | --- |
{rows}

Trained with seed {recipe['seed']} on {recipe['train_images']} images: {', '.join(stages)} on {machine}, torch
{report['torch']}, {report['threads']} thread(s). The recipe, with every setting, is in `training_report.json`.

Weights: MIT, as the package. The tokenizer files are Phi-3.5-mini-instruct's (`LICENSE-phi-3.5-tokenizer`,
`NOTICE-phi-3.5-tokenizer.md`).
"""
    check_card_metadata(text)
    return text
