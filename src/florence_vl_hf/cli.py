"""`florence-vl` command line."""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

DEMO_QUESTION = "What shapes are in the image?"

def _demo_tiny(args) -> int:
    import PIL.Image
    from transformers import pipeline

    from . import __version__, tiny_model_dir
    from .errors import CommandError, require_at_least
    from .processing import bundled_file

    started = time.perf_counter()
    if args.question is not None and not args.question.strip():
        raise CommandError("--question is empty: ask a question, or leave it out for the bundled example's questions")
    require_at_least("--max-new-tokens", args.max_new_tokens, 1)
    example = json.loads(bundled_file("shapes_vqa_example.json").read_text())
    if args.question is not None:
        questions = [{"question": args.question, "answer": None}]
    elif args.image is not None:  # the example's answers are about the example's image only
        questions = [{"question": DEMO_QUESTION, "answer": None}]
    else:
        questions = example["questions"]
    image_path = Path(args.image or bundled_file("shapes_vqa_example.png"))
    try:
        with PIL.Image.open(image_path) as opened:
            image = opened.convert("RGB")
    except (OSError, PIL.Image.DecompressionBombError) as error:
        raise CommandError(f"--image {image_path} cannot be read as an image: {error}") from error
    folder = tiny_model_dir()
    pipe = pipeline("image-text-to-text", model=str(folder))
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    print(f"florence_vl_hf {__version__}: florence-vl-tiny ({pipe.model.num_parameters() / 1e6:.1f}M parameters, "
          f"{size / 1e6:.1f} MB bf16, trained from scratch on ShapesVQA) from {folder}")  # fmt: skip
    print(f"pipeline('image-text-to-text') on {image_path.name}:")
    for item in questions:
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": item["question"]}]}]  # fmt: skip
        reply = pipe(text=messages, max_new_tokens=args.max_new_tokens)[0]["generated_text"][-1]["content"].strip()
        verdict = "" if item["answer"] is None else ("  (right)" if reply == item["answer"] else
                                                     f"  (expected {item['answer']!r})")  # fmt: skip
        print(f"  {item['question']:55s} -> {reply!r}{verdict}")
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


def _add_push_options(parser, repo_flag: bool):
    if repo_flag:
        parser.add_argument("--push-to-hub", metavar="REPO_ID", help="after a passed verification, upload to this repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--revision", help="branch to push to (created if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", help="commit message of the upload")
    parser.add_argument("--token", help="Hub token (default: huggingface_hub login or HF_TOKEN)")


def _push_folder(args, folder, repo_id) -> int:
    from .conversion.errors import PushError
    from .conversion.hub import push_folder

    try:
        url = push_folder(
            folder,
            repo_id,
            private=args.private,
            revision=args.revision,
            create_pr=args.create_pr,
            commit_message=args.commit_message,
            token=args.token,
        )
    except PushError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"pushed {folder} to {url}")
    return 0


def _push(args) -> int:
    return _push_folder(args, args.folder, args.repo_id)


def _convert(args) -> int:
    from .conversion import ConversionError, convert_checkpoint
    from .errors import CommandError

    if args.push_to_hub and args.no_verify:
        raise CommandError("--push-to-hub cannot be combined with --no-verify: only verified conversions are pushed")
    try:
        report = convert_checkpoint(
            args.source,
            args.output_dir,
            revision=args.source_revision,
            token=args.token,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            verify=not args.no_verify,
            verify_dtype=args.verify_dtype,
            verify_device=args.verify_device,
            repo_id=args.push_to_hub or args.repo_id,
            florence2_config_dir=args.florence2_config,
        )
    except ConversionError as error:
        print(f"error: {error} (nothing was written to {args.output_dir})", file=sys.stderr)
        return 1
    return _push_folder(args, args.output_dir, args.push_to_hub) if args.push_to_hub else 0


def _serve(args) -> int:
    from .errors import CommandError, require_at_least

    require_at_least("--max-images", args.max_images, 0)
    require_at_least("--max-tokens", args.max_tokens, 1)
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port must be between 0 and 65535, got {args.port}")
    from .serving import serve

    try:
        serve(args.model, host=args.host, port=args.port, log_level=args.log_level, name=args.served_model_name,
              device=args.device, dtype=args.dtype, revision=args.revision, max_images=args.max_images,
              max_tokens=args.max_tokens)  # fmt: skip
    except (ImportError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _versions() -> str:
    import torch
    import transformers

    from . import __version__

    return f"florence-vl {__version__} (transformers {transformers.__version__}, torch {torch.__version__})"


class _PrintVersions(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):  # imports torch only when asked
        print(_versions())
        parser.exit()


def add_demo_tiny_parser(commands) -> argparse.ArgumentParser:
    tiny_demo = commands.add_parser(
        "demo-tiny", help="ask the bundled florence-vl-tiny about a ShapesVQA image through pipeline('image-text-to-text')"
    )
    tiny_demo.add_argument("--image", help="an image (default: the bundled ShapesVQA example)")
    tiny_demo.add_argument(
        "--question",
        help=f"one question (default: the bundled example's questions, graded against its answers; "
        f"with --image, {DEMO_QUESTION!r}, not graded)",
    )
    tiny_demo.add_argument("--max-new-tokens", type=int, default=8, help="the most tokens per answer (default: 8)")
    tiny_demo.set_defaults(handler=_demo_tiny)
    return tiny_demo


def add_convert_parser(commands) -> argparse.ArgumentParser:
    convert = commands.add_parser(
        "convert",
        help="convert an original Florence-VL checkpoint (folder or Hub repo id) into a verified Hub-ready folder",
    )
    convert.add_argument("source", help="original checkpoint: a local folder or a Hub repo id (jiuhai/florence-vl-3b-sft)")
    convert.add_argument("output_dir", help="folder to write (refused if not empty, unless --overwrite)")
    convert.add_argument("--source-revision", help="revision (branch, tag or commit) of a Hub source")
    convert.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                         help="dtype of the written weights (default: bfloat16, as the official weights)")
    convert.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR (atomically)")
    convert.add_argument("--no-verify", action="store_true", help="skip the verification (the folder cannot be pushed)")
    convert.add_argument("--verify-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                         help="compute dtype of the verification forwards (default: float32)")
    convert.add_argument("--verify-device", help="device of the verification (default: cuda if available, else cpu)")
    convert.add_argument("--repo-id", help="repo id the model card's usage code names (default: --push-to-hub, else "
                         "the output folder's name)")
    convert.add_argument("--florence2-config", metavar="DIR", help="Florence-2 config.json + preprocessor_config.json "
                         "to use when the source has no vision_tower/ (default: the bundled Florence-2-large files)")
    _add_push_options(convert, repo_flag=True)
    convert.set_defaults(handler=_convert)
    return convert


def add_push_parser(commands) -> argparse.ArgumentParser:
    push = commands.add_parser("push", help="upload a converted, verified folder to the Hugging Face Hub")
    push.add_argument("folder", help="a folder written by `florence-vl convert`")
    push.add_argument("repo_id", help="Hub repository id, e.g. user/florence-vl-3b-sft-hf")
    _add_push_options(push, repo_flag=False)
    push.set_defaults(handler=_push)
    return push


def add_serve_parser(commands) -> argparse.ArgumentParser:
    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible chat-completions server (POST /v1/chat/completions) for a Florence-VL model"
    )
    serve.add_argument("model", help="a Florence-VL folder or Hub repo id")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default: 8000)")
    serve.add_argument("--served-model-name", help="the `model` name requests use (default: MODEL as given)")
    serve.add_argument("--device", help="device of the model (default: cuda if available, else cpu)")
    serve.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                       help="compute dtype (default: auto, the checkpoint's)")
    serve.add_argument("--revision", help="revision of a Hub repo")
    serve.add_argument("--max-images", type=int, default=1,
                       help="images per request (default: 1, as the original was trained and evaluated)")
    serve.add_argument("--max-tokens", type=int, default=512,
                       help="answer length for requests that do not set max_tokens (default: 512)")
    serve.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn's log level (default: warning)")
    serve.set_defaults(handler=_serve)
    return serve


COMMANDS_ENTRY_POINT = "florence_vl_hf.commands"


def build_parser() -> argparse.ArgumentParser:
    """The core's commands, then those that installed distributions register under the `florence_vl_hf.commands`
    entry point (a function taking the subparsers; the lab's is `florence_vl_hf.lab.cli:add_lab_commands`)."""
    from importlib.metadata import entry_points

    from .benchmark import add_bench_parser
    from .training.cli import add_train_parser

    parser = argparse.ArgumentParser(prog="florence-vl", description="Florence-VL on Hugging Face Transformers")
    parser.add_argument("--version", action=_PrintVersions, nargs=0, help="print the versions and exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_parser in (add_demo_tiny_parser, add_convert_parser, add_push_parser, add_serve_parser, add_train_parser,
                       add_bench_parser):  # fmt: skip
        add_parser(commands)
    for entry in entry_points(group=COMMANDS_ENTRY_POINT):
        entry.load()(commands)
    return parser


def main(argv=None) -> int:
    """Expected failures (CommandError, OSError) print one `error:` line and exit 1; anything else is a bug: one line
    saying so, and its traceback with --debug."""
    from .errors import CommandError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (CommandError, OSError) as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        if args.debug:
            raise
        print(f"error: unexpected {type(error).__name__}: {error} (a bug; --debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
