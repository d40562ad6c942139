"""`florence-vl train`: the two-stage recipe on transformers' Trainer from the command line."""

import argparse
import json
import logging
import sys
from pathlib import Path

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
    parser.add_argument("--template", choices=("plain", "phi3", "llama3"), help="default: plain for pretrain, "
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
    from ..processing import template_for_text_config

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
    model.generation_config = generation_config_for(template_for_text_config(model.config.text_config))
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


def add_tiny_parsers(commands) -> None:
    tiny = commands.add_parser(
        "train-tiny",
        help="reproduce florence-vl-tiny: ShapesVQA data, stage 1, stage 2, held-out evaluation, bf16 model",
    )
    tiny.add_argument("output_dir", help="where the bf16 model, its processor and training_report.json go "
                      "(refused if not empty, unless --overwrite)")
    tiny.add_argument("--work-dir", help="where the ShapesVQA splits are generated (default: a temporary folder)")
    tiny.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    tiny.add_argument("--stage0-steps", type=int, help="region pre-training of the vision tower (0: none)")
    tiny.add_argument("--stage1-steps", type=int, help="steps of stage 1, pretraining on captions (default 6000)")
    tiny.add_argument("--stage2-steps", type=int,
                      help="steps of stage 2, finetuning on the questions (default 20000)")
    tiny.add_argument("--train-images", type=int, help="images of the generated training split (default 24000)")
    tiny.add_argument("--test-images", type=int, help="images of the held-out evaluation split (default 300)")
    tiny.add_argument("--fusion", choices=("channel", "token", "average"),
                      help="how the vision features are fused: concatenated along channels (the paper's, default), "
                      "side by side as tokens, or averaged")
    tiny.add_argument("--features", nargs="+", help="vision feature sources (default: depth caption ocr grounding)")
    tiny.add_argument(
        "--checkpoint-steps",
        type=int,
        help="checkpoint every N steps under --work-dir; the same command again resumes an interrupted run",
    )
    tiny.add_argument("--threads", type=int, help="torch threads (the bundled model: 1; results depend on it)")
    tiny.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    tiny.set_defaults(handler=run_train_tiny)

    bundle = commands.add_parser(
        "bundle-tiny", help="ship a train-tiny output as the package's florence-vl-tiny, or --check it against that"
    )
    bundle.add_argument("model_dir", help="a folder written by `florence-vl train-tiny`")
    bundle.add_argument("--target", help="default: the package's florence_vl_tiny folder")
    bundle.add_argument("--check", action="store_true",
                        help="only compare the weights with the bundled model's; exit 1 if any tensor differs")
    bundle.add_argument("--hardware", help="for the model card (default: what the training report recorded)")
    bundle.set_defaults(handler=run_bundle_tiny)

    ablations = commands.add_parser(
        "ablations", help="fusion (channel/token/average) and feature (depth/breadth/all) ablations of florence-vl-tiny"
    )
    ablations.add_argument("output_dir", help="where ablations.json, ablations.md and the finished runs go; the "
                           "same command again resumes an interrupted sweep")
    ablations.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                           help="every variant is trained once per seed (default: 0 1 2)")
    ablations.add_argument("--variants", nargs="+", help="which variants to train (default: all five: "
                           "'channel (all)', 'token (all)', 'average (all)', 'depth only', 'breadth only')")
    ablations.add_argument("--stage0-steps", type=int,
                           help="region pre-training steps of the vision tower, once per seed (default 4000)")
    ablations.add_argument("--stage1-steps", type=int, help="default: 1000 (ablations.ABLATION_STEPS)")
    ablations.add_argument("--stage2-steps", type=int, help="default: 1500 (ablations.ABLATION_STEPS)")
    ablations.add_argument("--train-images", type=int, help="images of the generated training split (default 24000)")
    ablations.add_argument("--test-images", type=int, help="images of the held-out evaluation split (default 300)")
    ablations.set_defaults(handler=run_ablations_command)

    evaluate = commands.add_parser("eval-shapes", help="ShapesVQA exact-match accuracy of a model, per question type")
    evaluate.add_argument("--model", help="a Florence-VL folder (default: the bundled florence-vl-tiny)")
    evaluate.add_argument("--data", help="a split from make-shapes-data (default: a fresh one, see --num-images)")
    evaluate.add_argument("--num-images", type=int, default=300,
                          help="images of the fresh split, when --data is not given (default 300)")
    evaluate.add_argument("--seed", type=int, default=12345, help="seed of the fresh split")
    evaluate.add_argument("--json", help="also write the result to this file")
    evaluate.set_defaults(handler=run_eval_shapes)


def run_train_tiny(args) -> int:
    from .shapes_recipe import TinyRecipe, train_tiny

    logging.basicConfig(level=logging.WARNING)
    values = {"seed": args.seed, "stage0_steps": args.stage0_steps, "stage1_steps": args.stage1_steps,
              "stage2_steps": args.stage2_steps,
              "train_images": args.train_images, "test_images": args.test_images, "fusion": args.fusion,
              "vision_feature_sources": args.features}  # fmt: skip
    recipe = TinyRecipe(**{key: value for key, value in values.items() if value is not None})
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        report = train_tiny(args.output_dir, args.work_dir, recipe, overwrite=args.overwrite,
                            checkpoint_steps=args.checkpoint_steps)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_accuracy(report["evaluation"]))
    stage0 = f"stage 0 {report['stage0']['seconds']:.0f}s, " if "stage0" in report else ""
    print(f"{stage0}stage 1 {report['stage1']['seconds']:.0f}s, stage 2 {report['stage2']['seconds']:.0f}s; "
          f"saved to {args.output_dir}")  # fmt: skip
    return 0


def run_bundle_tiny(args) -> int:
    from .bundle import bundle_tiny, default_bundle_dir, different_tensors

    if args.check:
        bundled = Path(args.target or default_bundle_dir())
        try:
            differ = different_tensors(args.model_dir, bundled)
        except FileNotFoundError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        listed = f": {', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}" if differ else ""
        print(f"{len(differ)} tensors differ between {args.model_dir} and {bundled}{listed}")
        return 1 if differ else 0
    try:
        target = bundle_tiny(args.model_dir, args.target, args.hardware)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"bundled {args.model_dir} as {target}")
    return 0


def run_ablations_command(args) -> int:
    from .ablations import ABLATION_STEPS, format_table, run_ablations
    from .shapes_recipe import TinyRecipe

    logging.basicConfig(level=logging.WARNING)
    values = {"stage0_steps": args.stage0_steps, "stage1_steps": args.stage1_steps,
              "stage2_steps": args.stage2_steps,
              "train_images": args.train_images, "test_images": args.test_images}  # fmt: skip
    recipe = TinyRecipe(**{**ABLATION_STEPS, **{key: value for key, value in values.items() if value is not None}})
    try:
        table = run_ablations(args.output_dir, args.seeds, args.variants, recipe)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_table(table))
    return 0


def format_accuracy(result: dict) -> str:
    rows = [f"{'type':10s} {'accuracy':>9s} {'correct':>8s} {'total':>6s}"]
    for kind, entry in result["per_type"].items():
        rows.append(f"{kind:10s} {entry['accuracy']:9.1%} {entry['correct']:8d} {entry['total']:6d}")
    rows.append(f"{'overall':10s} {result['accuracy']:9.1%} {result['correct']:8d} {result['total']:6d}")
    return "\n".join(rows)


def run_eval_shapes(args) -> int:
    import tempfile

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .. import tiny_model_dir
    from ..shapes import make_shapes_data
    from .evaluate import evaluate_shapes

    try:
        folder = args.model or tiny_model_dir()
    except FileNotFoundError as error:
        print(f"error: {error} (or pass --model)", file=sys.stderr)
        return 1
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype="float32")
    processor = AutoProcessor.from_pretrained(folder)
    with tempfile.TemporaryDirectory() as scratch:
        data = args.data
        if data is None:
            data = Path(scratch) / "split"
            make_shapes_data(data, args.num_images, seed=args.seed, split_name="eval")
        result = evaluate_shapes(model, processor, data)
    print(format_accuracy(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
