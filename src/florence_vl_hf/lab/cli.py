"""`florence-vl` commands of the lab: the conversion demo on a fixture, fixtures, ShapesVQA data, the tiny
recipe, its bundling, ablations and evaluation, and the alignment analysis.

The core's command line finds them through the `florence_vl_hf.commands` entry point (setup.cfg); the core never
imports the lab.
"""

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from ..cli import DEMO_QUESTION
from ..families import FAMILY_NAMES

_REMOTE_PIPELINE = """
import json
from transformers import pipeline
from PIL import Image
folder, image_path, question = ({folder!r}, {image!r}, {question!r})
pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image", "image": Image.open(image_path)}},
                                         {{"type": "text", "text": question}}]}}]
out = pipe(text=messages, max_new_tokens={max_new_tokens})
print(json.dumps({{"model_class": type(pipe.model).__module__ + "." + type(pipe.model).__name__,
                  "answer": out[0]["generated_text"][-1]["content"]}}))
"""


def _demo(args) -> int:
    from .. import __version__
    from ..conversion import ConversionError, convert_checkpoint
    from .fixture import make_fixture
    from ..errors import CommandError, require_at_least
    from ..isolation import run_without_package
    from ..processing import sample_image_path

    output_dir = Path(args.output_dir).resolve()
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite:
        raise CommandError(f"--output-dir {output_dir} is not empty (use --overwrite to replace it)")
    require_at_least("--max-new-tokens", args.max_new_tokens, 1)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    image = sample_image_path()
    started = time.perf_counter()
    original, converted = output_dir / "original", output_dir / "converted"
    make_fixture(original, args.llm, seed=args.seed, image_size=args.image_size)
    size = sum(p.stat().st_size for p in original.rglob("*") if p.is_file())
    print(f"florence_vl_hf {__version__}: wrote a tiny random {args.llm} Florence-VL checkpoint in the original "
          f"LLaVA-fork layout ({size / 1e6:.1f} MB, real tokenizer files) to {original}")
    try:
        report = convert_checkpoint(original, converted, repo_id=f"florence-vl-demo-{args.llm}",
                                    log=lambda line: print(f"  {line}"))  # fmt: skip
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"converted and verified into the Hub-ready folder {converted}:")
    for path in sorted(converted.iterdir()):
        print(f"  {path.name:32s} {path.stat().st_size:>12,d} bytes")

    code = _REMOTE_PIPELINE.format(
        folder=str(converted), image=str(image), question=args.question, max_new_tokens=args.max_new_tokens
    )
    result = run_without_package(code)
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"reloaded it with trust_remote_code=True in a process where florence_vl_hf cannot be imported "
          f"(model class {reply['model_class']})")
    print(f"pipeline('image-text-to-text') on {image.name}: {args.question!r}")
    print(f"  -> {reply['answer']!r}  (random weights: the words are noise, the plumbing is real)")
    print(f"verification: {report['verification']['max_abs_diff']}, greedy tokens identical: "
          f"{report['verification']['greedy_tokens_agree']}")
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


def _make_fixture(args) -> int:
    from ..conversion import ConversionError
    from .fixture import make_fixture

    try:
        folder = make_fixture(
            args.output_dir,
            args.llm,
            seed=args.seed,
            dtype=args.dtype,
            weights_format=args.weights_format,
            shards=args.shards,
            image_size=args.image_size,
            tied_copies=not args.without_tied_copies,
            overwrite=args.overwrite,
        )
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    print(f"wrote a tiny random {args.llm} Florence-VL checkpoint in the original layout to {folder}:")
    for path in files:
        print(f"  {str(path.relative_to(folder)):40s} {path.stat().st_size:>12,d} bytes")
    return 0


def _make_shapes_data(args) -> int:
    from .shapes import make_shapes_data

    try:
        summary = make_shapes_data(
            args.output_dir, args.num_images, seed=args.seed, split_name=args.split, overwrite=args.overwrite
        )
    except FileExistsError:
        print(f"error: {args.output_dir} is not empty (use --overwrite to replace it)", file=sys.stderr)
        return 1
    except (NotADirectoryError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {summary.num_images} ShapesVQA images and {summary.num_questions} questions "
          f"{dict(summary.question_counts)} to {summary.output_dir}:")  # fmt: skip
    print("  captions.json (stage 1), instructions.json (stage 2), questions.jsonl (scoring), scenes.jsonl, images/")
    return 0



def add_demo_parser(commands) -> argparse.ArgumentParser:
    demo = commands.add_parser(
        "demo",
        help="make a tiny original-layout checkpoint, convert and verify it, reload it with trust_remote_code and "
        "run the pipeline",
    )
    demo.add_argument("--output-dir", required=True,
                      help="folder to write: original/ (the tiny checkpoint) and converted/ (the Hub-ready folder)")
    demo.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    demo.add_argument("--llm", default="phi3", choices=FAMILY_NAMES,
                      help="language model family of the tiny checkpoint: phi3 (Phi-3.5) or llama3 (Llama-3.1) "
                      "(default: phi3)")
    demo.add_argument("--image-size", type=int, default=64,
                      help="side in pixels of the square input image of the tiny checkpoint (default: 64)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    demo.add_argument("--question", default=DEMO_QUESTION,
                      help=f"the question asked about the bundled image (default: {DEMO_QUESTION!r})")
    demo.add_argument("--max-new-tokens", type=int, default=12, help="the most tokens of the answer (default: 12)")
    demo.set_defaults(handler=_demo)

    return demo


def add_fixture_parser(commands) -> argparse.ArgumentParser:
    fixture = commands.add_parser(
        "make-fixture", help="write a tiny random checkpoint in the original Florence-VL layout (for tests and demos)"
    )
    fixture.add_argument("output_dir", help="folder to write (refused if not empty, unless --overwrite)")
    fixture.add_argument("--llm", default="phi3", choices=FAMILY_NAMES,
                         help="language model family: phi3 (llava_phi, Phi-3.5) or llama3 (llava_llama, Llama-3.1) "
                         "(default: phi3)")
    fixture.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    fixture.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                         help="dtype of the written weights (default: bfloat16)")
    fixture.add_argument("--weights-format", default="safetensors", choices=["safetensors", "bin"],
                         help="file format of the main weights (default: safetensors)")
    fixture.add_argument("--shards", type=int, default=2, help="number of main weight files (1: no index; default: 2)")
    fixture.add_argument("--image-size", type=int, default=32,
                         help="side in pixels of the square input image (default: 32)")
    fixture.add_argument("--without-tied-copies", action="store_true",
                         help="leave out the tied BART embed_tokens / lm_head copies (a save that kept them shared)")
    fixture.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    fixture.set_defaults(handler=_make_fixture)

    return fixture


def add_shapes_data_parser(commands) -> argparse.ArgumentParser:
    shapes = commands.add_parser(
        "make-shapes-data",
        help="generate a ShapesVQA split (synthetic images, captions and questions) in LLaVA format",
    )
    shapes.add_argument("output_dir", help="folder to write (refused if not empty, unless --overwrite)")
    shapes.add_argument("--num-images", type=int, default=1000,
                        help="images to generate, each with its caption and questions (default: 1000)")
    shapes.add_argument("--seed", type=int, default=0,
                        help="the same seed writes the same files; fewer images are a prefix of more (default: 0)")
    shapes.add_argument("--split", default="train", help="name used in ids and image file names (default: train)")
    shapes.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    shapes.set_defaults(handler=_make_shapes_data)

    return shapes


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
    from .shapes import make_shapes_data
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


def add_lab_commands(commands) -> None:
    """Registers every lab command on the `florence-vl` subparsers (the `florence_vl_hf.commands` entry point)."""
    from .alignment_cli import add_alignment_parser

    add_demo_parser(commands)
    add_fixture_parser(commands)
    add_shapes_data_parser(commands)
    add_tiny_parsers(commands)
    add_alignment_parser(commands)
