"""ShapesVQA v1: a small synthetic visual question answering task (see the spec, shared/specs/shapes-vqa.md).

Scenes are sampled with an explicit `random.Random`, rendered with Pillow, and turned into LLaVA-format caption data
(pre-training) and single-turn question/answer data (instruction tuning). `score` computes the spec's exact-match
accuracies. This module is a tool for training and checking tiny models; it is not part of the Hub payload.

Choices the spec leaves open, fixed here:
- A shape's box is (x0, y0, x0 + s, y0 + s) and Pillow fills it inclusively, so x0 + s <= W - 1 and y0 + s <= H - 1
  keep every painted pixel inside the image. The word's text box is `textbbox`'s (left, top, right, bottom), with
  0 <= left, right <= W, 0 <= top, bottom <= H.
- Two boxes keep their distance when they are at least 4 apart along x or along y (a.x1 + 4 <= b.x0 or the like),
  measured on the box coordinates above.
- Only a shape's position is redrawn on a rejected try; its type, colour and size stay. After 100 failed tries the
  whole scene (size, background, word, shapes) is drawn again.
- Shapes are ordered left to right by box centre x, ties (shapes stacked vertically) by centre y.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..files import replace_dir, sibling_prefix

SPEC_VERSION = "ShapesVQA v1"

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
WORDS: tuple[str, ...] = tuple(
    "CAT DOG SUN BOX RED CAR HAT PEN MAP CUP BUS KEY FOX OWL BEE ANT EGG JAR TOY ZIP".split()
)
QUESTION_TYPES: tuple[str, ...] = ("count", "color", "shape", "text", "position")

IMAGE_SIZE_RANGE = (160, 320)
BACKGROUND_RANGE = (215, 255)
COUNT_RANGE = (1, 3)
COLOR_JITTER = 15
SHAPE_SIZE_FRACTION = (0.18, 0.30)
FONT_SIZE_FRACTION = (0.12, 0.18)
WORD_PROBABILITY = 0.5
MIN_GAP = 4
MAX_TRIES = 100
POSITION_MIN_DX_FRACTION = 0.15
TEXT_COLOR = (0, 0, 0)

CAPTION_PROMPT = "Describe the image."
COUNT_QUESTION = "How many shapes are there?"
TEXT_QUESTION = "What word is written in the image?"
NO_TEXT_ANSWER = "none"

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Shape:
    """One shape: `box` is (x0, y0, x0 + s, y0 + s); `rgb` is the jittered colour it is painted with."""

    kind: str
    color: str
    rgb: tuple[int, int, int]
    box: Box

    @property
    def size(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


@dataclass(frozen=True)
class Scene:
    """One ShapesVQA image before rendering. `text_box` is the word's `ImageDraw.textbbox`; None without a word."""

    width: int
    height: int
    background: int
    shapes: tuple[Shape, ...]
    word: str | None = None
    font_size: int | None = None
    text_box: Box | None = None

    def __post_init__(self) -> None:
        if (self.word is None) != (self.font_size is None) or (self.word is None) != (self.text_box is None):
            raise ValueError("word, font_size and text_box must be given together")

    @property
    def boxes(self) -> list[Box]:
        """Every box that must keep its distance: the shapes' and, when there is a word, its text box."""
        return [s.box for s in self.shapes] + ([self.text_box] if self.text_box is not None else [])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        shapes = tuple(
            Shape(kind=s["kind"], color=s["color"], rgb=tuple(s["rgb"]), box=tuple(s["box"])) for s in data["shapes"]
        )
        text_box = tuple(data["text_box"]) if data.get("text_box") is not None else None
        return cls(
            width=data["width"],
            height=data["height"],
            background=data["background"],
            shapes=shapes,
            word=data.get("word"),
            font_size=data.get("font_size"),
            text_box=text_box,
        )


@dataclass(frozen=True)
class ShapesDataSummary:
    """What `make_shapes_data` wrote."""

    output_dir: Path
    num_images: int
    num_questions: int
    question_counts: dict[str, int] = field(default_factory=dict)


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@lru_cache(maxsize=1)
def _measure_draw() -> ImageDraw.ImageDraw:
    return ImageDraw.Draw(Image.new("RGB", (1, 1)))


def text_bbox_at_origin(word: str, font_size: int) -> Box:
    """`textbbox((0, 0), word)` in `load_default(size=font_size)`; boxes at other origins are shifts of it."""
    left, top, right, bottom = _measure_draw().textbbox((0, 0), word, font=_font(font_size))
    return int(left), int(top), int(right), int(bottom)


def boxes_apart(a: Box, b: Box, gap: int = MIN_GAP) -> bool:
    """True when the boxes neither overlap nor come closer than `gap` (separated by >= gap along x or along y)."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _jitter(rng: random.Random, base: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in base)
    return r, g, b


def _try_sample_scene(rng: random.Random) -> Scene | None:
    width = rng.randint(*IMAGE_SIZE_RANGE)
    height = rng.randint(*IMAGE_SIZE_RANGE)
    background = rng.randint(*BACKGROUND_RANGE)
    short = min(width, height)
    placed: list[Box] = []

    word: str | None = None
    font_size: int | None = None
    text_box: Box | None = None
    if rng.random() < WORD_PROBABILITY:
        word = rng.choice(WORDS)
        font_size = round(rng.uniform(*FONT_SIZE_FRACTION) * short)
        left, top, right, bottom = text_bbox_at_origin(word, font_size)
        if right - left > width or bottom - top > height:
            return None
        x = rng.randint(-left, width - right)
        y = rng.randint(-top, height - bottom)
        text_box = (x + left, y + top, x + right, y + bottom)
        placed.append(text_box)

    shapes: list[Shape] = []
    for _ in range(rng.randint(*COUNT_RANGE)):
        kind = rng.choice(SHAPES)
        color = rng.choice(list(COLORS))
        rgb = _jitter(rng, COLORS[color])
        size = round(rng.uniform(*SHAPE_SIZE_FRACTION) * short)
        for _ in range(MAX_TRIES):
            x0 = rng.randint(0, width - 1 - size)
            y0 = rng.randint(0, height - 1 - size)
            box = (x0, y0, x0 + size, y0 + size)
            if all(boxes_apart(box, other) for other in placed):
                break
        else:
            return None
        placed.append(box)
        shapes.append(Shape(kind=kind, color=color, rgb=rgb, box=box))

    return Scene(width, height, background, tuple(shapes), word, font_size, text_box)


def sample_scene(rng: random.Random) -> Scene:
    """Draw one scene per the spec, starting over with a fresh scene whenever an item cannot be placed."""
    while True:
        scene = _try_sample_scene(rng)
        if scene is not None:
            return scene


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image: flat grey background, filled shapes (no anti-aliasing), the word in black."""
    image = Image.new("RGB", (scene.width, scene.height), (scene.background,) * 3)
    draw = ImageDraw.Draw(image)
    if scene.word is not None:
        assert scene.font_size is not None and scene.text_box is not None
        left, top, _, _ = text_bbox_at_origin(scene.word, scene.font_size)
        origin = (scene.text_box[0] - left, scene.text_box[1] - top)
        draw.text(origin, scene.word, fill=TEXT_COLOR, font=_font(scene.font_size))
    for shape in scene.shapes:
        x0, y0, x1, y1 = shape.box
        if shape.kind == "circle":
            draw.ellipse(shape.box, fill=shape.rgb)
        elif shape.kind == "square":
            draw.rectangle(shape.box, fill=shape.rgb)
        elif shape.kind == "triangle":
            draw.polygon([(x0 + shape.size / 2, y0), (x0, y1), (x1, y1)], fill=shape.rgb)
        else:
            raise ValueError(f"unknown shape {shape.kind!r}")
    return image


def left_to_right(shapes: Sequence[Shape]) -> list[Shape]:
    """Shapes ordered by box centre x, ties (shapes stacked vertically) by centre y."""
    return sorted(shapes, key=lambda s: (s.center[0], s.center[1]))


def questions(scene: Scene, rng: random.Random) -> list[dict[str, str]]:
    """Every question the spec's table asks of the scene, as dicts with keys type, question, answer.

    Order: count, color (by shape type in SHAPES order), shape (by colour in COLORS order), text, position (pairs in
    the scene's shape order). `rng` only decides the order in which each position pair is named.
    """
    kinds = Counter(s.kind for s in scene.shapes)
    colors = Counter(s.color for s in scene.shapes)

    out = [{"type": "count", "question": COUNT_QUESTION, "answer": str(len(scene.shapes))}]
    for kind in SHAPES:
        if kinds[kind] == 1:
            shape = next(s for s in scene.shapes if s.kind == kind)
            out.append({"type": "color", "question": f"What color is the {kind}?", "answer": shape.color})
    for color in COLORS:
        if colors[color] == 1:
            shape = next(s for s in scene.shapes if s.color == color)
            out.append({"type": "shape", "question": f"What shape is {color}?", "answer": shape.kind})
    out.append({"type": "text", "question": TEXT_QUESTION, "answer": scene.word if scene.word else NO_TEXT_ANSWER})

    for first, second in position_pairs(scene):
        a, b = (second, first) if rng.random() < 0.5 else (first, second)
        out.append(
            {
                "type": "position",
                "question": f"Is the {a.color} {a.kind} left or right of the {b.color} {b.kind}?",
                "answer": "left" if a.center[0] < b.center[0] else "right",
            }
        )
    return out


def position_pairs(scene: Scene) -> list[tuple[Shape, Shape]]:
    """The pairs a position question is asked about, in the scene's shape order: both (colour, shape) pairs occur
    once and the box centres are at least POSITION_MIN_DX_FRACTION of the width apart in x."""
    pairs = Counter((s.color, s.kind) for s in scene.shapes)
    unique = [s for s in scene.shapes if pairs[(s.color, s.kind)] == 1]
    return [
        (first, second)
        for i, first in enumerate(unique)
        for second in unique[i + 1 :]
        if abs(first.center[0] - second.center[0]) >= POSITION_MIN_DX_FRACTION * scene.width
    ]


def caption(scene: Scene) -> str:
    """E.g. `2 shapes: a red circle, an orange triangle. The text says FOX.`"""
    n = len(scene.shapes)
    items = ", ".join(
        f"{'an' if s.color == 'orange' else 'a'} {s.color} {s.kind}" for s in left_to_right(scene.shapes)
    )
    text = f" The text says {scene.word}." if scene.word else " There is no text."
    return f"{n} {'shape' if n == 1 else 'shapes'}: {items}.{text}"


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@dataclass(frozen=True)
class _SplitImage:
    """One image of a split being written: its id, its path inside the split, its scene and its questions."""

    image_id: str
    image_path: str
    scene: Scene
    questions: list[dict[str, str]]


def make_shapes_data(
    output_dir: str | os.PathLike[str],
    num_images: int,
    seed: int,
    split_name: str = "train",
    overwrite: bool = False,
) -> ShapesDataSummary:
    """Write a ShapesVQA split to `output_dir`, deterministically in `seed` (same seed -> byte-identical files).

    Layout:
    - images/{split}_{i:06d}.png
    - captions.json: LLaVA-format stage-1 data, one caption conversation per image.
    - instructions.json: LLaVA-format stage-2 data, one single-turn conversation per question, with its "type".
    - questions.jsonl: one line per question, {id, image, question, answer, type}, for scoring.
    - scenes.jsonl: one line per image, {id, image, scene}, the scene as `Scene.to_dict`.
    - meta.json: spec version, split, seed and counts.

    One `random.Random(seed)` drives everything in image order, so a split of n images is a prefix of a larger one
    with the same seed. The split is built in a temporary folder beside `output_dir` and renamed into place; a
    non-empty `output_dir` is refused unless `overwrite`.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    output = _prepare_output_dir(output_dir, overwrite)
    images = _sample_split(random.Random(seed), num_images, split_name)
    question_rows = [row for image in images for row in _question_rows(image)]
    counts = Counter(row["type"] for row in question_rows)
    question_counts = {t: counts[t] for t in QUESTION_TYPES}
    staging = Path(tempfile.mkdtemp(prefix=sibling_prefix(output, "tmp"), dir=output.parent))
    try:
        _write_images(staging, images)
        _write_json(staging / "captions.json", [_caption_entry(image) for image in images])
        _write_json(staging / "instructions.json", [_instruction_entry(row) for row in question_rows])
        _write_jsonl(staging / "questions.jsonl", question_rows)
        _write_jsonl(staging / "scenes.jsonl", [_scene_row(image) for image in images])
        _write_json(
            staging / "meta.json",
            {
                "spec": SPEC_VERSION,
                "split": split_name,
                "seed": seed,
                "num_images": num_images,
                "num_questions": len(question_rows),
                "question_counts": question_counts,
            },
        )
        _move_into_place(staging, output, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ShapesDataSummary(output, num_images, len(question_rows), question_counts)


def _prepare_output_dir(output_dir: str | os.PathLike[str], overwrite: bool) -> Path:
    """`output_dir` made absolute, its parent created; refused if it is a file, or a non-empty folder without
    `overwrite`."""
    output = Path(output_dir).absolute()
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"{output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} is not empty; pass overwrite=True to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    return output


def _sample_split(rng: random.Random, num_images: int, split_name: str) -> list[_SplitImage]:
    """The split's scenes and questions; each image's scene is drawn, then its questions, before the next image."""
    images = []
    for i in range(num_images):
        image_id = f"{split_name}_{i:06d}"
        scene = sample_scene(rng)
        images.append(_SplitImage(image_id, f"images/{image_id}.png", scene, questions(scene, rng)))
    return images


def _write_images(folder: Path, images: Iterable[_SplitImage]) -> None:
    (folder / "images").mkdir()
    for image in images:
        render(image.scene).save(folder / image.image_path, format="PNG")


def _caption_entry(image: _SplitImage) -> dict[str, Any]:
    return {
        "id": image.image_id,
        "image": image.image_path,
        "conversations": [
            {"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"},
            {"from": "gpt", "value": caption(image.scene)},
        ],
    }


def _question_rows(image: _SplitImage) -> list[dict[str, str]]:
    """questions.jsonl's rows of one image: {id, image, type, question, answer}."""
    return [
        {"id": f"{image.image_id}_q{k:02d}", "image": image.image_path, **question}
        for k, question in enumerate(image.questions)
    ]


def _instruction_entry(row: dict[str, str]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "image": row["image"],
        "type": row["type"],
        "conversations": [
            {"from": "human", "value": f"<image>\n{row['question']}"},
            {"from": "gpt", "value": row["answer"]},
        ],
    }


def _scene_row(image: _SplitImage) -> dict[str, Any]:
    return {"id": image.image_id, "image": image.image_path, "scene": image.scene.to_dict()}


def _move_into_place(staging: Path, output: Path, overwrite: bool) -> None:
    # mkdtemp made the staging folder private (0o700); the split gets the permissions a plain mkdir would give it.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} is not empty; pass overwrite=True to replace it")
    replace_dir(staging, output)


def score(predictions: Iterable[tuple[str, str, str]]) -> dict[str, Any]:
    """Exact-match accuracy of (type, predicted_text, expected_answer) triples, the prediction stripped of white space.

    Returns {"accuracy", "correct", "total", "per_type": {type: {"accuracy", "correct", "total"}}} with every
    QUESTION_TYPES entry present; accuracy is 0.0 where total is 0.
    """
    correct: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for qtype, predicted, expected in predictions:
        if qtype not in QUESTION_TYPES:
            raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")
        total[qtype] += 1
        correct[qtype] += int(predicted.strip() == expected)

    def entry(c: int, t: int) -> dict[str, Any]:
        return {"accuracy": c / t if t else 0.0, "correct": c, "total": t}

    result = entry(sum(correct.values()), sum(total.values()))
    result["per_type"] = {t: entry(correct[t], total[t]) for t in QUESTION_TYPES}
    return result
