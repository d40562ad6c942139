"""`florence-vl train`: the two-stage recipe on transformers' Trainer from the command line."""

import argparse
import json
import logging
import sys
from pathlib import Path

from .data import TEMPLATES
from .stages import STAGES


def add_train_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "train",
        help="train a Florence-VL stage (pretrain: everything; finetune: projector + LLM) on LLaVA-format data",
        description="Train Florence-VL with transformers' Trainer. Defaults follow the paper's recipe for the "
        "stage and the LLM (global batch, learning rate, cosine schedule, 3% warm-up, no weight decay, 1 epoch); "
        "any of them can be overridden. Runs on CPU or GPU; launch with torchrun or accelerate for several GPUs.",
    )
    parser.add_argument("--stage", choices=STAGES, required=True, help="pretrain (stage 1) or finetune (stage 2)")
    parser.add_argument("--data", required=True, help="LLaVA-format JSON (a list of samples) or JSON lines")
    parser.add_argument("--image-folder", help="folder the samples' 'image' paths are relative to")
    parser.add_argument("--output-dir", required=True,
                        help="where the checkpoints and the trained model (a Hub-ready folder, or LoRA adapters) go")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a Florence-VL folder or Hub repo id to start from")
    source.add_argument("--config", help="a FlorenceVLConfig (config.json or its folder): start from random weights")
    source.add_argument("--florence2", help="a Florence-2 checkpoint; with --language-model, build from parts")
    parser.add_argument("--language-model", help="a causal LM checkpoint (with --florence2)")
    parser.add_argument("--template", choices=TEMPLATES, help="default: plain for pretrain, "
                        "the LLM's chat format for finetune")  # fmt: skip
    parser.add_argument("--model-max-length", type=int, help="default 2048")
    parser.add_argument("--global-batch-size", type=int, help="default: the paper's for the stage and LLM")
    parser.add_argument("--per-device-batch-size", type=int, default=4,
                        help="samples per device and forward; gradient accumulation makes up the global batch "
                        "(default: 4)")
    parser.add_argument("--learning-rate", type=float, help="peak learning rate (default: the paper's for the stage "
                        "and LLM)")  # fmt: skip
    parser.add_argument("--vision-tower-lr", type=float, help="a separate learning rate for Florence-2 (pretrain)")
    parser.add_argument("--vision-tower-start-step", type=int, default=0,
                        help="keep Florence-2's learning rate at 0 before this step (pretrain from random weights)")
    parser.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    parser.add_argument("--lr-scheduler", help="default cosine")
    parser.add_argument("--warmup", type=float, help="warm-up: a fraction of the steps (<1) or a step count")
    parser.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass: less memory, slower steps")
    parser.add_argument("--save-steps", type=int, default=500,
                        help="save a checkpoint in --output-dir every this many steps (default 500)")
    parser.add_argument("--save-total-limit", type=int, default=2,
                        help="keep at most this many checkpoints, deleting the oldest (default 2)")
    parser.add_argument("--logging-steps", type=int, default=10, help="log the loss every this many steps (default 10)")
    parser.add_argument("--report-to", default="none", help="tensorboard, wandb, ... (Trainer's report_to)")
    parser.add_argument("--resume-from-checkpoint", nargs="?", const="latest",
                        help="a checkpoint folder, or no value for the latest in --output-dir")  # fmt: skip
    parser.add_argument("--seed", type=int, default=42,
                        help="seed of the training, the data order and any randomly initialised weights (default 42)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--cache-images", type=int, help="keep this many preprocessed images (and the tokenized "
                        "samples) in memory for later epochs; 196 KB per image at 128 px, 4.7 MB at 768 px")
    parser.add_argument("--deepspeed", help="a DeepSpeed config JSON (ZeRO-2/3)")
    parser.add_argument("--fsdp", help="FSDP on GPUs under torchrun/accelerate launch: some of full_shard, "
                        "shard_grad_op, offload, auto_wrap (passed as fsdp=True and fsdp_config)")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters on the LLM instead of the LLM")
    parser.add_argument("--lora-r", type=int, default=16, help="rank of the LoRA adapters (default 16)")
    parser.add_argument("--lora-alpha", type=int, default=32, help="LoRA scaling alpha (default 32)")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA inputs (default 0.05)")
    parser.add_argument("--lora-target-modules", nargs="+", help="linear layer names (default: per LLM family)")
    parser.add_argument("--lora-freeze-projector", action="store_true", help="don't train the projector with LoRA")
    parser.add_argument("--merge-lora", action="store_true", help="also save the merged model in OUTPUT_DIR/merged")
    parser.add_argument("--disable-progress-bar", action="store_true", help="no tqdm progress bar (for logs)")
    parser.set_defaults(handler=run_train)
    return parser


def _load(args):
    from ..build import build_random_model, generation_config_for
    from ..families import family_of

    if args.model:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype="float32")
        return model, AutoProcessor.from_pretrained(args.model)
    if args.config:
        from .. import FlorenceVLConfig

        config = FlorenceVLConfig.from_pretrained(args.config)
        return build_random_model(config, seed=args.seed)
    if not args.language_model:
        raise ValueError("--florence2 needs --language-model")
    from .. import from_pretrained_parts

    model, processor = from_pretrained_parts(args.florence2, args.language_model, seed=args.seed)
    model.generation_config = generation_config_for(family_of(model.config.text_config).name)
    return model, processor


def run_train(args) -> int:
    from .api import fsdp_arguments, llm_template, train, training_arguments

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        model, processor = _load(args)
    except (OSError, ValueError) as error:
        print(f"error: could not load the model: {error}", file=sys.stderr)
        return 1
    overrides = {
        "learning_rate": args.learning_rate,
        "num_train_epochs": args.epochs,
        "max_steps": args.max_steps,
        "lr_scheduler_type": args.lr_scheduler,
        "warmup_steps": args.warmup,
        "weight_decay": args.weight_decay,
        "deepspeed": args.deepspeed,
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if args.fsdp is not None:
        overrides.update(fsdp_arguments(args.fsdp))
    # The global batch is split over every process torchrun / accelerate launch started (their WORLD_SIZE).
    try:
        training_args = training_arguments(
            args.output_dir,
            args.stage,
            llm_template(processor),
            global_batch_size=args.global_batch_size,
            per_device_train_batch_size=args.per_device_batch_size,
            bf16=args.bf16,
            activation_checkpointing=args.gradient_checkpointing,
            save_steps=args.save_steps,
            save_total_limit=args.save_total_limit,
            logging_steps=args.logging_steps,
            report_to=args.report_to,
            seed=args.seed,
            data_seed=args.seed,
            dataloader_num_workers=args.num_workers,
            disable_tqdm=args.disable_progress_bar,
            **overrides,
        )
    except ValueError as error:  # TrainingSetupError, or a value TrainingArguments refuses
        print(f"error: {error}", file=sys.stderr)
        return 1
    resume = args.resume_from_checkpoint
    if resume == "latest":
        resume = True
    lora = None
    if args.lora:
        lora = dict(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                    target_modules=args.lora_target_modules, train_projector=not args.lora_freeze_projector)  # fmt: skip
    try:
        result = train(
            model,
            processor,
            args.data,
            stage=args.stage,
            args=training_args,
            image_folder=args.image_folder,
            template=args.template,
            model_max_length=args.model_max_length,
            vision_tower_lr=args.vision_tower_lr,
            vision_tower_start_step=args.vision_tower_start_step,
            lora=lora,
            resume_from_checkpoint=resume,
            cache_images=args.cache_images,
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not result.trainer.is_world_process_zero():
        return 0  # the first process writes the merged model and prints the summary
    if args.merge_lora and lora is not None:
        from ..build import save_hub_folder

        merged = result.trainer.model.merge_and_unload()
        description = f"Trained with `florence-vl train` ({args.stage} stage, LoRA adapters merged into the LLM)."
        save_hub_folder(merged, processor, Path(args.output_dir) / "merged", description=description)
    summary = {"output_dir": str(result.output_dir), "metrics": result.metrics, "skipped": result.skipped}
    print(json.dumps(summary, default=str))
    return 0
