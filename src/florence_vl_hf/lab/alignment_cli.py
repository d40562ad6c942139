"""`florence-vl alignment`: the paper's alignment-loss curves for every DBFusion feature subset of a model."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ..files import write_text_atomic
from .alignment import feature_subsets


def add_alignment_parser(commands) -> argparse.ArgumentParser:
    """Register the ``alignment`` command on an ``add_subparsers()`` object; its handler is ``args.handler``."""
    parser = commands.add_parser(
        "alignment",
        help="alignment-loss curves (paper section 4, Figure 5) of a model's vision features with its LLM",
        description="Extract mean-pooled vision features (depth + one per task prompt) and mean-pooled last-layer "
        "LLM caption representations for image-caption pairs, then train only a linear projection P per feature "
        "subset (all, remove X, depth only) to minimise the cross-entropy of softmax(F^v F^t^T) against the "
        "identity matching (no temperature, AdamW). Prints the final loss (mean of the last 10% of steps) per "
        "subset and plots the curves.",
    )
    parser.add_argument("--model", required=True, help="a Florence-VL folder or Hub repo id")
    parser.add_argument("--data", required=True, metavar="CAPTIONS.json",
                        help="LLaVA-format JSON list or JSON lines; the caption is the last gpt turn")  # fmt: skip
    parser.add_argument("--image-folder", help="folder the samples' 'image' paths are relative to "
                        "(default: the folder of --data)")  # fmt: skip
    parser.add_argument("--output", required=True, metavar="PNG", help="where to write the plot")
    parser.add_argument("--json", metavar="FILE", help="also write the curves and settings as JSON")
    parser.add_argument("--steps", type=int, default=1000, help="training steps of P per subset (default 1000)")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per step (default 64)")
    parser.add_argument("--num-pairs", type=int, help="use the first N pairs of the file (default: all)")
    parser.add_argument("--distinct-captions", action="store_true",
                        help="keep only the first pair of each caption (synthetic data repeats captions)")
    parser.add_argument("--seed", type=int, default=0, help="seed of P's initialisation and of the batches")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="divides the cosine similarities (default 1: none, as the paper writes the loss)")  # fmt: skip
    parser.add_argument("--extract-batch-size", type=int, default=16, help="pairs per model forward (default 16)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the model (default: bfloat16 on GPU, float32 on CPU)")  # fmt: skip
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--smooth", type=int, help="moving-average window of the plot (default: steps // 50)")
    parser.set_defaults(handler=run_alignment_command)
    return parser


def load_caption_pairs(data, image_folder=None, num_pairs=None, distinct_captions=False
                       ) -> tuple[list[Path], list[str], int]:  # fmt: skip
    """(image paths, captions, number of samples skipped) from a LLaVA-format file: every sample with one image
    and a gpt turn, the caption being its last gpt turn; the first ``num_pairs`` of them when given.
    ``distinct_captions``: only the first sample of each caption (a repeated caption in a batch is a second right
    answer that the contrastive loss counts as wrong); the others are counted as skipped."""
    from ..training.data import load_conversations

    folder = Path(image_folder) if image_folder else Path(data).parent
    paths, captions, skipped, seen = [], [], 0, set()
    for sample in load_conversations(data):
        image = sample.get("image")
        if isinstance(image, list) and len(image) == 1:
            image = image[0]
        turns = [turn.get("value") for turn in sample.get("conversations") or [] if turn.get("from") == "gpt"]
        if not isinstance(image, str) or not turns or not isinstance(turns[-1], str) or not turns[-1].strip():
            skipped += 1
            continue
        if distinct_captions and turns[-1].strip() in seen:
            skipped += 1
            continue
        seen.add(turns[-1].strip())
        paths.append(folder / image)
        captions.append(turns[-1].strip())
        if num_pairs is not None and len(paths) == num_pairs:
            break
    return paths, captions, skipped


def format_table(curves: dict, subsets: dict, features, fraction: float = 0.1) -> str:
    from .alignment import final_loss

    rows = [("subset", "features", "P (in -> out)", "final loss")]
    width = {name: features.vision[name].shape[1] for name in features.names}
    for name, losses in curves.items():
        subset = subsets[name]
        rows.append((name, "+".join(subset), f"{sum(width[f] for f in subset)} -> {features.text.shape[1]}",
                     f"{final_loss(losses, fraction):.4f}"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) if i < 3 else cell.rjust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in rows
    )


def run_alignment_command(args) -> int:
    """Load the image-caption pairs, extract their features with the model, train P on every feature subset, then
    print the final losses and write the plot (and the JSON)."""
    loaded = _load_pairs(args)
    if loaded is None:
        return 1
    paths, captions, skipped = loaded
    features, device, dtype = _extract(args, paths, captions, skipped)
    subsets = feature_subsets(features.names)
    curves = _train_curves(args, features, subsets, paths, captions, device)
    _write_results(args, features, subsets, curves, len(paths), dtype)
    return 0


def _load_pairs(args) -> tuple[list[Path], list[str], int] | None:
    """The options checked and the pairs of `--data` read: (image paths, captions, samples skipped), or None once an
    error is printed."""
    from ..errors import require_at_least

    require_at_least("--steps", args.steps, 1)
    require_at_least("--batch-size", args.batch_size, 2)
    require_at_least("--num-pairs", args.num_pairs, 2)
    require_at_least("--extract-batch-size", args.extract_batch_size, 1)
    try:
        paths, captions, skipped = load_caption_pairs(args.data, args.image_folder, args.num_pairs,
                                                      args.distinct_captions)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return None
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        print(f"error: {len(missing)} images are missing, e.g. {missing[0]} (check --image-folder)", file=sys.stderr)
        return None
    if len(paths) < 2:
        print(f"error: {args.data} has {len(paths)} usable image-caption pairs; need at least 2", file=sys.stderr)
        return None
    return paths, captions, skipped


def _extract(args, paths, captions, skipped):
    """(the pooled features of every pair, the device, the dtype name): the model is loaded, used, and freed."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .. import FlorenceVLConfig  # noqa: F401  (registers florence_vl with the Auto classes)
    from .alignment import extract_features

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    started = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=getattr(torch, dtype)).to(device).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    print(f"loaded {args.model} ({dtype} on {device}); {len(paths)} image-caption pairs from {args.data}"
          + (f" ({skipped} samples skipped: no image or caption, or a repeated caption)" if skipped else ""))  # fmt: skip
    last = [time.perf_counter()]

    def progress(line: str) -> None:  # at most one line every 30 s
        if time.perf_counter() - last[0] >= 30:
            last[0] = time.perf_counter()
            print(f"  {line}", flush=True)

    features = extract_features(model, processor, paths, captions, batch_size=args.extract_batch_size, log=progress)
    del model
    print(f"extracted features {list(features.names)} in {time.perf_counter() - started:.1f}s")
    return features, device, dtype


def _train_curves(args, features, subsets, paths, captions, device) -> dict[str, list[float]]:
    """The loss curve of every subset, P trained on the extracted features."""
    from .alignment import run_alignment

    return run_alignment(
        None,
        None,
        paths,
        captions,
        subsets,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        temperature=args.temperature,
        weight_decay=args.weight_decay,
        device=device,
        features=features,
        log=lambda line: print(f"  trained P for {line}", flush=True),
    )


def _write_results(args, features, subsets, curves, num_pairs: int, dtype: str) -> None:
    """The settings and the table of final losses printed, the plot written, and with `--json` the curves."""
    from .alignment import final_loss, plot_curves

    batch = min(args.batch_size, num_pairs)
    tail = max(1, -(-args.steps // 10))
    print(f"alignment loss: {num_pairs} pairs, {args.steps} steps, batch {batch}, lr {args.lr:g}, seed {args.seed}; "
          f"final loss = mean of the last {tail} steps (chance: log {batch} = {math.log(batch):.4f})")  # fmt: skip
    print(format_table(curves, subsets, features))

    title = f"Alignment loss: {Path(str(args.model).rstrip('/')).name}, {num_pairs} pairs, batch {batch}"
    output = plot_curves(curves, args.output, title=title, smooth=args.smooth)
    print(f"wrote {output}")
    if args.json:
        summary = {
            "model": str(args.model),
            "data": str(args.data),
            "num_pairs": num_pairs,
            "feature_names": list(features.names),
            "settings": {"steps": args.steps, "batch_size": batch, "lr": args.lr, "weight_decay": args.weight_decay,
                         "temperature": args.temperature, "seed": args.seed, "optimizer": "AdamW",
                         "projection": "linear (with bias)", "dtype": dtype,
                         "distinct_captions": args.distinct_captions},
            "subsets": {name: list(subset) for name, subset in subsets.items()},
            "final_loss": {name: final_loss(losses) for name, losses in curves.items()},
            "curves": curves,
        }  # fmt: skip
        write_text_atomic(args.json, json.dumps(summary, indent=1) + "\n")
        print(f"wrote {args.json}")


__all__ = ["add_alignment_parser", "format_table", "load_caption_pairs", "run_alignment_command"]
