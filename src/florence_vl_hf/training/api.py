"""Training Florence-VL from Python: `train(model, processor, data, stage=..., output_dir=...)`."""

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainingArguments
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

from ..build import save_hub_folder
from ..cards import complete_adapter_card
from .data import ConversationDataset, FlorenceVLDataCollator, ImageCache
from .lora import apply_lora
from .stages import apply_stage, check_stage, paper_recipe
from .trainer import FlorenceVLTrainer

logger = logging.getLogger(__name__)


def llm_template(processor) -> str:
    """"phi3" or "llama3": the chat format of the processor's LLM."""
    template = processor.chat_template or ""
    for name, marker in (("phi3", "<|assistant|>"), ("llama3", "<|start_header_id|>")):
        if marker in template:
            return name
    raise ValueError("The processor's chat template is neither the phi3 nor the llama3 Florence-VL template")


def training_arguments(
    output_dir,
    stage: str,
    llm: str = "phi3",
    global_batch_size: int | None = None,
    per_device_train_batch_size: int = 4,
    world_size: int = 1,
    **overrides,
) -> TrainingArguments:
    """TrainingArguments with the paper's recipe for `stage` and `llm` ("phi3"/"llama3") as defaults.

    The global batch is reached by gradient accumulation: `global_batch_size / (per_device_train_batch_size *
    world_size)` steps (at least 1). Any TrainingArguments field can be overridden by keyword.

    `bf16=True` on a machine without a bf16 GPU trains in bf16 autocast on the CPU (`use_cpu=True`, which
    TrainingArguments otherwise demands be set by hand), unless `use_cpu` is given.
    """
    recipe = paper_recipe(llm, stage)
    global_batch_size = global_batch_size or recipe.global_batch_size
    accumulation = max(1, math.ceil(global_batch_size / (per_device_train_batch_size * world_size)))
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=recipe.learning_rate,
        num_train_epochs=recipe.num_train_epochs,
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_ratio,  # a float below 1 is a fraction of the total steps
        weight_decay=recipe.weight_decay,
        save_strategy="steps",
        save_steps=500,
        save_total_limit=2,
        logging_steps=10,
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,  # the collator needs every field of the examples
    )
    values.update(overrides)
    wants_bf16 = values.get("bf16") or values.get("bf16_full_eval")
    if wants_bf16 and "use_cpu" not in overrides and not (is_torch_bf16_gpu_available() or is_torch_xla_available()):
        values["use_cpu"] = True
    return TrainingArguments(**values)


@dataclass
class TrainResult:
    trainer: FlorenceVLTrainer
    metrics: dict
    skipped: dict = field(default_factory=dict)
    output_dir: Path | None = None


def train(
    model,
    processor,
    data,
    *,
    stage: str,
    output_dir=None,
    args: TrainingArguments | None = None,
    image_folder=None,
    template: str | None = None,
    model_max_length: int | None = None,
    vision_tower_lr: float | None = None,
    vision_tower_start_step: int = 0,
    lora: dict | None = None,
    resume_from_checkpoint=None,
    callbacks=None,
    save: bool = True,
    cache_images: int | ImageCache | None = None,
) -> TrainResult:
    """Train `model` on LLaVA-format `data` (a path or a list of samples) with transformers' Trainer.

    - `stage`: "pretrain" (everything trainable, `template` "plain" by default) or "finetune" (Florence-2 frozen,
      the LLM's chat template by default).
    - `args`: TrainingArguments; by default `training_arguments(output_dir, stage, llm)` (the paper's recipe).
    - `vision_tower_lr`, `vision_tower_start_step`: the vision tower's own learning rate, and the optimizer step
      before which it stays 0 (stage 1 from random weights: `FlorenceVLTrainer`).
    - `lora`: keyword arguments of `apply_lora` (e.g. `{"r": 16}`) to train LoRA adapters instead of the LLM.
    - `resume_from_checkpoint`: a checkpoint folder, or True for the latest in `args.output_dir`.
    - `cache_images`: keep this many preprocessed images (and every tokenized sample) in memory for later epochs,
      or pass an `ImageCache` to share one between runs over the same images.

    The final model (or adapter) and the processor are saved to `args.output_dir` when `save` is true.
    """
    check_stage(stage)
    llm = llm_template(processor)
    if args is None:
        if output_dir is None:
            raise ValueError("Pass output_dir or args")
        args = training_arguments(output_dir, stage, llm)
    if args.remove_unused_columns:
        raise ValueError("Set remove_unused_columns=False: the collator needs the examples' pixel_values")
    template = template or paper_recipe(llm, stage).template
    dataset = ConversationDataset(
        data,
        processor,
        template,
        image_folder=image_folder,
        model_max_length=model_max_length or paper_recipe(llm, stage).model_max_length,
        image_cache=ImageCache(cache_images) if isinstance(cache_images, int) else cache_images,
        cache_tokens=cache_images is not None,
    )
    counts = apply_stage(model, stage)
    logger.info("stage %s: %d trainable and %d frozen parameters", stage, counts["trainable"], counts["frozen"])
    if lora is not None:
        model = apply_lora(model, train_vision_tower=stage == "pretrain", **lora)
    model.train()
    trainer = FlorenceVLTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=FlorenceVLDataCollator(processor),
        processing_class=processor,
        callbacks=callbacks,
        vision_tower_lr=vision_tower_lr,
        vision_tower_start_step=vision_tower_start_step,
    )
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    output = Path(args.output_dir)
    if save:
        model.eval()
        steps = f"{result.global_step} optimizer steps on {len(dataset)} samples"
        if lora is not None:
            model.save_pretrained(output)
            processor.save_pretrained(output)
            complete_adapter_card(output, model.config)
        else:
            save_hub_folder(model, processor, output, description=f"Trained with `florence_vl_hf` ({stage} stage, {steps}).")
    if dataset.skipped:
        logger.warning("%d samples were skipped: %s", len(dataset.skipped), dataset.skipped)
    return TrainResult(trainer=trainer, metrics=result.metrics, skipped=dict(dataset.skipped), output_dir=output)
