"""Training Florence-VL from Python: `train(model, processor, data, stage=..., output_dir=...)`."""

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainingArguments
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

from ..build import save_hub_folder
from ..cards import complete_adapter_card
from ..errors import CommandError
from ..families import FAMILIES, FAMILY_NAMES
from .data import ConversationDataset, FlorenceVLDataCollator, ImageCache
from .lora import apply_lora
from .stages import apply_stage, check_stage, paper_recipe
from .trainer import FlorenceVLTrainer

logger = logging.getLogger(__name__)


class TrainingSetupError(CommandError, ValueError):
    """A training configuration that would not train as asked (a global batch the processes cannot split, processes
    that would not form one group, sharding that would not engage): refused before any step."""


def launched_world_size() -> int:
    """The number of processes a launcher (torchrun, accelerate launch) started: `WORLD_SIZE`, 1 without one."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise TrainingSetupError(f"WORLD_SIZE={value!r} is not a number of processes") from None


def _has_accelerator() -> bool:
    return torch.accelerator.is_available() or is_torch_xla_available()


def llm_template(processor) -> str:
    """"phi3" or "llama3": the LLM family whose chat template the processor holds (by its `assistant_marker`)."""
    template = processor.chat_template or ""
    for candidate in FAMILIES.values():
        if candidate.assistant_marker in template:
            return candidate.name
    raise ValueError(
        f"The processor's chat template is neither the {' nor the '.join(FAMILY_NAMES)} Florence-VL template"
    )


def training_arguments(
    output_dir,
    stage: str,
    llm: str = "phi3",
    global_batch_size: int | None = None,
    per_device_train_batch_size: int = 4,
    world_size: int | None = None,
    **overrides,
) -> TrainingArguments:
    """TrainingArguments with the paper's recipe for `stage` and the LLM family `llm` ("phi3"/"llama3") as defaults.

    The global batch is reached by gradient accumulation: `global_batch_size / (per_device_train_batch_size *
    world_size)` steps; a global batch that is no multiple of `per_device_train_batch_size * world_size` is refused
    (`TrainingSetupError`). `world_size` defaults to the launcher's `WORLD_SIZE` (1 without torchrun / accelerate
    launch); a different value under a launcher is refused. Any TrainingArguments field can be overridden by keyword.

    Under a launcher on a machine without an accelerator, `use_cpu=True` and `ddp_backend="gloo"` are set (unless
    `use_cpu` is given) so the processes train data-parallel as one gloo group; FSDP and DeepSpeed on the CPU, and
    FSDP without a launcher, are refused: accelerate would silently not shard.

    `bf16=True` on a machine without a bf16 GPU trains in bf16 autocast on the CPU (`use_cpu=True`, which
    TrainingArguments otherwise demands be set by hand), unless `use_cpu` is given.
    """
    recipe = paper_recipe(llm, stage)
    world_size = _checked_world_size(world_size)
    accumulation = _accumulation_steps(global_batch_size or recipe.global_batch_size, per_device_train_batch_size,
                                       world_size)  # fmt: skip
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
    on_cpu = _choose_cpu(values, overrides)
    _refuse_unsupported_sharding(values, on_cpu)
    return TrainingArguments(**values)


def _checked_world_size(world_size: int | None) -> int:
    """`world_size`, by default the launcher's; refused when it contradicts the launcher's."""
    launched = launched_world_size()
    if world_size is None:
        return launched
    if launched > 1 and world_size != launched:
        raise TrainingSetupError(
            f"world_size={world_size}, but {launched} processes were launched (WORLD_SIZE): the global batch would be "
            "split over the wrong number of processes"
        )
    return world_size


def _accumulation_steps(global_batch_size, per_device_train_batch_size, world_size) -> int:
    """Gradient accumulation steps that make the global batch from the per-device batches of every process."""
    for name, value in (("global_batch_size", global_batch_size), ("per_device_train_batch_size",
                        per_device_train_batch_size), ("world_size", world_size)):  # fmt: skip
        if not isinstance(value, int) or value < 1:
            raise TrainingSetupError(f"{name} must be a positive integer, got {value!r}")
    per_step = per_device_train_batch_size * world_size
    if global_batch_size % per_step:
        raise TrainingSetupError(
            f"The global batch {global_batch_size} is not a multiple of the per-device batch "
            f"{per_device_train_batch_size} x {world_size} process{'es' if world_size > 1 else ''} = {per_step}: "
            "choose a per-device batch (--per-device-batch-size) and global batch (--global-batch-size) that divide"
        )
    return global_batch_size // per_step


def _choose_cpu(values: dict, overrides: dict) -> bool:
    """Set `use_cpu` (and gloo under a launcher) where the machine needs it unless the caller chose; True when the
    run will be on the CPU."""
    launched = launched_world_size()
    wants_bf16 = values.get("bf16") or values.get("bf16_full_eval")
    if wants_bf16 and "use_cpu" not in overrides and not (is_torch_bf16_gpu_available() or is_torch_xla_available()):
        values["use_cpu"] = True
    on_cpu = values.get("use_cpu") or not _has_accelerator()
    if launched > 1 and on_cpu and "use_cpu" not in overrides:
        # Without use_cpu, accelerate finds no device backend, leaves the processes undistributed, and each one
        # trains alone on the whole data set.
        values["use_cpu"] = True
        values.setdefault("ddp_backend", "gloo")
    return on_cpu


def _refuse_unsupported_sharding(values: dict, on_cpu: bool) -> None:
    """FSDP and DeepSpeed on the CPU, and FSDP without a launcher, would silently not shard: refused."""
    for option, name in (("fsdp", "FSDP"), ("deepspeed", "DeepSpeed")):
        if not values.get(option):
            continue
        if on_cpu:
            why = "DeepSpeed on the CPU is not supported here"
            if option == "fsdp":
                why = "accelerate runs FSDP on GPUs only: on the CPU it ignores it and the processes train unsharded"
            raise TrainingSetupError(
                f"{name} (--{option}) needs GPUs: {why}. Leave --{option} out: torchrun on the CPU trains "
                "data-parallel over gloo"
            )
        if option == "fsdp" and launched_world_size() == 1 and "LOCAL_RANK" not in os.environ:
            raise TrainingSetupError(
                "FSDP (--fsdp) needs a launcher: run under torchrun or accelerate launch (one process without one "
                "would not shard)"
            )


_FSDP_WORDS = {"full_shard": ("reshard_after_forward", True), "shard_grad_op": ("reshard_after_forward", False),
               "offload": ("cpu_offload", True), "auto_wrap": None}  # fmt: skip


def fsdp_arguments(options: str) -> dict:
    """TrainingArguments' `fsdp=True` and `fsdp_config` (FSDP2) from the familiar words of `--fsdp` ('full_shard
    auto_wrap', 'shard_grad_op offload'...): transformers deprecates passing those words as `fsdp` itself."""
    words = options.split()
    unknown = [word for word in words if word not in _FSDP_WORDS]
    if unknown or not words:
        raise TrainingSetupError(f"--fsdp {options!r}: expected some of {', '.join(_FSDP_WORDS)}")
    if {"full_shard", "shard_grad_op"} <= set(words):
        raise TrainingSetupError(f"--fsdp {options!r}: full_shard and shard_grad_op exclude each other")
    config = dict(_FSDP_WORDS[word] for word in words if _FSDP_WORDS[word])
    return {"fsdp": True, "fsdp_config": config}


def check_world(args: TrainingArguments) -> None:
    """Refuse arguments under which the processes a launcher started would not train as one group (each would train
    alone on all the data, with the accumulation meant for the whole group, and write the same output folder)."""
    launched = launched_world_size()
    if launched > 1 and args.world_size != launched:
        hint = "; on the CPU pass use_cpu=True (training_arguments does)" if not _has_accelerator() else ""
        raise TrainingSetupError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but they do not form one training group "
            f"(the Trainer sees {args.world_size}): each would train alone on all the data{hint}"
        )


def check_sharding(trainer) -> None:
    """Refuse FSDP / DeepSpeed settings that accelerate did not engage (it ignores them silently, e.g. on the CPU)."""
    args = trainer.args
    launched = launched_world_size()
    setup = f"{trainer.accelerator.distributed_type}, {launched} process{'es' if launched > 1 else ''}"
    from_launcher = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # accelerate launch's config
    if (args.fsdp or from_launcher) and not trainer.is_fsdp_enabled:
        options = f"fsdp_config {args.fsdp_config}" if args.fsdp else "accelerate's config"
        raise TrainingSetupError(
            f"FSDP ({options}) did not engage on this setup ({setup}): it needs GPUs and a launcher (torchrun or "
            "accelerate launch)"
        )
    if args.deepspeed and not trainer.is_deepspeed_enabled:
        raise TrainingSetupError(f"DeepSpeed ({args.deepspeed}) did not engage on this setup ({setup})")


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
    check_world(args)
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
    check_sharding(trainer)
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    output = Path(args.output_dir)
    skipped = _skipped_on_every_process(dataset, args)
    if save:
        model.eval()
        if trainer.is_world_process_zero():  # every process holds the same weights: the first one writes
            steps = f"{result.global_step} optimizer steps on {len(dataset)} samples"
            _save_trained(model, processor, output, adapter=lora is not None,
                          description=f"Trained with `florence_vl_hf` ({stage} stage, {steps}).")  # fmt: skip
        trainer.accelerator.wait_for_everyone()  # the folder is complete when train returns on any process
    if skipped and trainer.is_world_process_zero():
        logger.warning("%d samples were skipped: %s", len(skipped), skipped)
    return TrainResult(trainer=trainer, metrics=result.metrics, skipped=skipped, output_dir=output)


def _skipped_on_every_process(dataset, args) -> dict:
    """The samples skipped as unusable, gathered from every process (each skips the bad ones of its own share)."""
    skipped = dict(dataset.skipped)
    if args.world_size > 1 and torch.distributed.is_initialized():
        shares = [None] * args.world_size
        torch.distributed.all_gather_object(shares, skipped)
        skipped = {key: reason for share in shares for key, reason in share.items()}
    return skipped


def _save_trained(model, processor, output: Path, adapter: bool, description: str) -> None:
    """A LoRA adapter with the processor and an adapter card, or the whole model as a Hub folder."""
    if adapter:
        model.save_pretrained(output)
        processor.save_pretrained(output)
        complete_adapter_card(output, model.config)
    else:
        save_hub_folder(model, processor, output, description=description)
