"""Stage 0 of florence-vl-tiny: region-level pre-training of the vision tower on ShapesVQA scenes.

Florence-VL starts from Florence-2, itself pre-trained on FLD-5B with region-level annotations (text and objects at
their boxes). florence-vl-tiny's tower starts from random weights, and trained only through the LLM it never learns
to read the word (docs/florence-vl-tiny-notes.md). Stage 0 stands in for Florence-2's pre-training, in miniature:
the DaViT and its image projector are trained with small heads on the depth feature (the projected DaViT tokens),
which are discarded afterwards:

- pooled over the image (4 learned attention queries): the number of shapes, and whether there is a word;
- the mean of the tokens in the word's text box: the word;
- the mean of the tokens in each shape's box: its colour, its type, and the grid column of its centre.

Boxes map to tokens through the processor's geometry: the image padded to a square (`image_aspect_ratio="pad"`,
centred) or stretched to one, then cut into the `grid x grid` cells of the depth feature's spatial tokens.
"""

import json
import logging
import math
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .shapes import COLORS, SHAPES, WORDS
from ..training.data import ImageCache, image_pixel_values

logger = logging.getLogger(__name__)

COLOR_NAMES = tuple(COLORS)
POOLING_QUERIES = 4
HEAD_HIDDEN_SIZE = 256


def _square_geometry(width: int, height: int, pad: bool) -> tuple[int, int, int, int]:
    """(dx, dy, square_width, square_height): where a `width x height` image's pixels land once it is padded to a
    centred square (`pad`: x + dx of a `side x side` square) or stretched to one (x of a `width x height` square)."""
    if pad:
        side = max(width, height)
        return (side - width) // 2, (side - height) // 2, side, side
    return 0, 0, width, height


def box_tokens(box, width: int, height: int, grid: int, pad: bool) -> list[int]:
    """Indices (row * grid + column) of the spatial tokens whose cells the pixel box (x0, y0, x1, y1), end-exclusive,
    of a `width x height` image covers, once the image is padded (`pad`) or stretched to a square."""
    dx, dy, scale_x, scale_y = _square_geometry(width, height, pad)
    x0, y0, x1, y1 = box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy
    columns = range(int(x0 * grid / scale_x), min(grid - 1, int((x1 - 1) * grid / scale_x)) + 1)
    rows = range(int(y0 * grid / scale_y), min(grid - 1, int((y1 - 1) * grid / scale_y)) + 1)
    return [row * grid + column for row in rows for column in columns]


def scene_targets(scene: dict, grid: int, pad: bool) -> dict:
    """The stage-0 targets of one ShapesVQA scene (scenes.jsonl's "scene")."""
    width, height = scene["width"], scene["height"]
    dx, _, square_width, _ = _square_geometry(width, height, pad)
    shapes = []
    for shape in scene["shapes"]:
        x0, _, x1, _ = shape["box"]
        column = int(((x0 + x1) / 2 + dx) * grid / square_width)
        shapes.append({
            "tokens": box_tokens(shape["box"], width, height, grid, pad),
            "color": COLOR_NAMES.index(shape["color"]),
            "kind": SHAPES.index(shape["kind"]),
            "column": min(grid - 1, column),
        })  # fmt: skip
    word = scene.get("word")
    return {
        "count": len(scene["shapes"]) - 1,
        "word": WORDS.index(word) if word is not None else -1,
        "word_tokens": box_tokens(scene["text_box"], width, height, grid, pad) if word is not None else [],
        "shapes": shapes,
    }


def _mlp(dim: int, outputs: int) -> torch.nn.Sequential:
    hidden = HEAD_HIDDEN_SIZE
    return torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, outputs))


class RegionHeads(torch.nn.Module):
    """The stage-0 heads over the depth feature's `grid * grid` spatial tokens of width `dim`."""

    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.queries = torch.nn.Parameter(torch.zeros(POOLING_QUERIES, dim))  # zero: a plain mean to start with
        self.pooled = torch.nn.Linear(POOLING_QUERIES * dim, 3 + 2)  # count 1-3, word or not
        self.word = _mlp(dim, len(WORDS))
        self.shape = _mlp(dim, len(COLOR_NAMES) + len(SHAPES) + grid)  # colour, type, column of the centre

    def forward(self, tokens: torch.Tensor, targets: list[dict]) -> dict:
        """Logits and their targets per task, for `tokens` (batch, grid * grid, dim) of the scenes `targets`."""
        weights = (tokens @ self.queries.T / math.sqrt(tokens.shape[-1])).softmax(dim=1)
        pooled = self.pooled(torch.einsum("btq,btd->bqd", weights, tokens).flatten(1))
        device = tokens.device
        out = {
            "count": (pooled[:, :3], torch.tensor([t["count"] for t in targets], device=device)),
            "has_word": (pooled[:, 3:], torch.tensor([int(t["word"] >= 0) for t in targets], device=device)),
        }
        word_rows = [(row, t) for row, t in enumerate(targets) if t["word"] >= 0]
        if word_rows:
            means = torch.stack([tokens[row, t["word_tokens"]].mean(0) for row, t in word_rows])
            out["word"] = (self.word(means), torch.tensor([t["word"] for _, t in word_rows], device=device))
        shapes = [(row, s) for row, t in enumerate(targets) for s in t["shapes"]]
        logits = self.shape(torch.stack([tokens[row, s["tokens"]].mean(0) for row, s in shapes]))
        colors, kinds = len(COLOR_NAMES), len(SHAPES)
        for name, part in (("color", logits[:, :colors]), ("kind", logits[:, colors:colors + kinds]),
                           ("column", logits[:, colors + kinds:])):  # fmt: skip
            out[name] = (part, torch.tensor([s[name] for _, s in shapes], device=device))
        return out


def depth_tokens(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The depth feature's spatial tokens, row by row (Florence-2's image projector puts the average token first)."""
    tower = model.model.vision_tower
    return tower.image_projector(tower.backbone(pixel_values).last_hidden_state)[:, 1:]


class _RegionSample(NamedTuple):
    sample_id: str
    image: str
    targets: dict


class _RegionSamples:
    """The scenes of a ShapesVQA split with their stage-0 targets; images are loaded on demand, and those that cannot
    be used are logged once and kept in `skipped` (id -> reason)."""

    def __init__(self, folder: Path, processor, grid: int, image_cache: ImageCache | None):
        self.folder = folder
        self.processor = processor
        self.image_cache = image_cache
        pad = processor.image_aspect_ratio == "pad"
        self.entries: list[_RegionSample] = []
        with open(folder / "scenes.jsonl") as lines:
            for line in lines:
                entry = json.loads(line)
                targets = scene_targets(entry["scene"], grid, pad)
                self.entries.append(_RegionSample(entry["id"], entry["image"], targets))
        self.skipped: dict[str, str] = {}

    def pixel_values(self, index: int) -> torch.Tensor | None:
        sample_id, image, _ = self.entries[index]
        path = self.folder / image
        try:
            return image_pixel_values(self.processor, path, self.image_cache)
        except ValueError as error:
            if sample_id not in self.skipped:
                self.skipped[sample_id] = str(error)
                logger.warning("Skipping %s: image %s could not be used: %s", sample_id, path, error)
            return None


def _training_batches(samples: _RegionSamples, batch_size: int, generator: torch.Generator, data_dir):
    """Endless batches (pixel values, targets) of `samples`, in epochs of an order drawn from `generator`; images
    that cannot be used are left out."""
    order: list[int] = []
    position = 0
    while True:
        rows, targets = [], []
        while len(rows) < batch_size:
            if position == len(order):
                order, position = torch.randperm(len(samples.entries), generator=generator).tolist(), 0
            index = order[position]
            position += 1
            if (pixel_values := samples.pixel_values(index)) is not None:
                rows.append(pixel_values)
                targets.append(samples.entries[index].targets)
            elif len(samples.skipped) == len(samples.entries):
                raise RuntimeError(f"None of the images in {data_dir} can be used; see the warnings")
        yield torch.cat(rows), targets


def pretrain_regions(
    model,
    processor,
    data_dir,
    steps: int,
    batch_size: int = 16,
    vision_lr: float = 3e-4,
    lr: float = 1e-3,
    seed: int = 0,
    image_cache: ImageCache | None = None,
    log_every: int = 100,
    eval_dir=None,
) -> dict:
    """Stage 0: train `model`'s DaViT (at `vision_lr`) and image projector (at `lr`) for `steps` AdamW steps on the
    scenes of the ShapesVQA split `data_dir`, through the `RegionHeads` (at `lr`, then discarded).

    Returns a report: seconds, the mean loss per `log_every` steps, skipped samples, and with `eval_dir` (another
    split) the heads' held-out accuracy per task.
    """
    grid = model.config.image_grid_side
    samples = _RegionSamples(Path(data_dir), processor, grid, image_cache)
    tower = model.model.vision_tower
    heads = RegionHeads(tower.image_projector.image_projection.out_features, grid)
    optimizer = torch.optim.AdamW(
        [
            {"params": tower.backbone.parameters(), "lr": vision_lr},
            {"params": [*tower.image_projector.parameters(), *heads.parameters()], "lr": lr},
        ],
        weight_decay=0.0,
    )
    was_training = model.training
    model.train()
    batches = _training_batches(samples, batch_size, torch.Generator().manual_seed(seed), data_dir)
    losses, window = [], []
    started = time.perf_counter()
    for step in range(1, steps + 1):
        pixel_values, targets = next(batches)
        outputs = heads(depth_tokens(model, pixel_values), targets)
        loss = sum(F.cross_entropy(logits, target) for logits, target in outputs.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        window.append(loss.item())
        if step % log_every == 0 or step == steps:
            losses.append(sum(window) / len(window))
            logger.info("stage 0 step %d/%d loss %.4f", step, steps, losses[-1])
            window = []
    report = {"seconds": time.perf_counter() - started, "losses": losses, "skipped": samples.skipped}
    if eval_dir is not None:
        report["held_out_accuracy"] = evaluate_regions(model, processor, heads, eval_dir)
    model.train(was_training)
    return report


@torch.no_grad()
def evaluate_regions(model, processor, heads: RegionHeads, data_dir, batch_size: int = 50) -> dict:
    """Accuracy of the stage-0 heads per task on the scenes of `data_dir`."""
    samples = _RegionSamples(Path(data_dir), processor, model.config.image_grid_side, None)
    model.eval()
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    usable = [i for i in range(len(samples.entries)) if samples.pixel_values(i) is not None]
    for start in range(0, len(usable), batch_size):
        batch = usable[start:start + batch_size]
        pixel_values = torch.cat([samples.pixel_values(i) for i in batch])
        outputs = heads(depth_tokens(model, pixel_values), [samples.entries[i].targets for i in batch])
        for name, (logits, target) in outputs.items():
            right[name] = right.get(name, 0) + int((logits.argmax(-1) == target).sum())
            total[name] = total.get(name, 0) + len(target)
    return {name: right[name] / total[name] for name in total}
