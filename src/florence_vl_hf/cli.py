"""`florence-vl` command line."""

import argparse
import json
import sys
import time
from pathlib import Path

DEMO_QUESTION = "What shapes are in the image?"

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
    from . import __version__
    from .build import build_random_model, save_hub_folder
    from .isolation import run_without_package
    from .processing import asset_dir
    from .tiny import tiny_config

    output_dir = Path(args.output_dir).resolve()
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite:
        print(f"error: {output_dir} is not empty (use --overwrite)", file=sys.stderr)
        return 2
    image = asset_dir("phi-3.5-mini-instruct").parent / "shapes.png"
    started = time.perf_counter()
    config = tiny_config("phi3", image_size=args.image_size)
    model, processor = build_random_model(config, seed=args.seed)
    save_hub_folder(model, processor, output_dir)
    params = sum(p.numel() for p in model.parameters())
    print(f"florence_vl_hf {__version__}: built a random Florence-VL ({params / 1e6:.1f}M parameters, "
          f"{config.num_image_tokens} image tokens per {config.image_size}px image, real Phi-3.5 tokenizer, seed "
          f"{args.seed})")
    print(f"saved a Hub-ready folder to {output_dir}:")
    for path in sorted(output_dir.iterdir()):
        print(f"  {path.name:32s} {path.stat().st_size:>12,d} bytes")

    code = _REMOTE_PIPELINE.format(
        folder=str(output_dir), image=str(image), question=args.question, max_new_tokens=args.max_new_tokens
    )
    result = run_without_package(code)
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"reloaded it with trust_remote_code=True in a process where florence_vl_hf cannot be imported "
          f"(model class {reply['model_class']})")
    print(f"pipeline('image-text-to-text') on {image.name}: {args.question!r}")
    print(f"  -> {reply['answer']!r}  (random weights: the words are noise, the plumbing is real)")
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="florence-vl", description="Florence-VL on Hugging Face Transformers")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="build a small random Florence-VL, save it Hub-ready, reload it with trust_remote_code, run the pipeline",
    )
    demo.add_argument("--output-dir", required=True, help="where to write the Hub-ready folder")
    demo.add_argument("--overwrite", action="store_true", help="allow a non-empty output directory")
    demo.add_argument("--image-size", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--question", default=DEMO_QUESTION)
    demo.add_argument("--max-new-tokens", type=int, default=12)
    demo.set_defaults(handler=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
