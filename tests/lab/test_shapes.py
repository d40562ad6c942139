"""ShapesVQA v1 generator against the spec (shared/specs/shapes-vqa.md).

Most checks re-measure the rendered pixels (shape extents, kinds from fill ratios, colours, the word's ink) and derive
captions and answers from those measurements, rather than trusting the generator's own bookkeeping.
"""

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from florence_vl_hf.lab.shapes import (
    COLORS,
    QUESTION_TYPES,
    SHAPES,
    WORDS,
    Scene,
    Shape,
    caption,
    make_shapes_data,
    questions,
    render,
    sample_scene,
    score,
)

SPEC_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
SPEC_WORDS = "CAT DOG SUN BOX RED CAR HAT PEN MAP CUP BUS KEY FOX OWL BEE ANT EGG JAR TOY ZIP".split()
CAPTION_RE = re.compile(r"^([123]) (shape|shapes): (.+)\. (?:The text says ([A-Z]+)\.|There is no text\.)$")


def measure_shapes(image: Image.Image, scene: Scene) -> list[dict]:
    """Per shape, from the pixels only: inclusive pixel extent, centre, colour, and kind from the fill ratio.

    The scene is used only to know which colour to look for near each shape; the extent found must be checked by
    the caller against the scene's box.
    """
    pixels = np.asarray(image).astype(int)
    measured = []
    for shape in scene.shapes:
        x0, y0, x1, y1 = shape.box
        centre_rgb = tuple(int(v) for v in pixels[(y0 + y1) // 2, (x0 + x1) // 2])
        mask = (pixels == centre_rgb).all(-1)
        ys, xs = np.nonzero(mask)
        extent = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
        area = (extent[2] - extent[0] + 1) * (extent[3] - extent[1] + 1)
        fill = mask.sum() / area
        kind = "square" if fill > 0.95 else "circle" if 0.7 < fill < 0.85 else "triangle" if 0.4 < fill < 0.6 else "?"
        color = min(SPEC_COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(SPEC_COLORS[c], centre_rgb)))
        measured.append(
            {
                "extent": extent,
                "center": ((extent[0] + extent[2]) / 2, (extent[1] + extent[3]) / 2),
                "rgb": centre_rgb,
                "color": color,
                "kind": kind,
            }
        )
    return measured


def expected_questions(measured: list[dict], word: str | None, width: int) -> dict:
    """The spec's table applied to measured shapes: fixed questions, and position answers by unordered pair."""
    kinds = Counter(m["kind"] for m in measured)
    colors = Counter(m["color"] for m in measured)
    pairs = Counter((m["color"], m["kind"]) for m in measured)
    fixed = {("count", "How many shapes are there?", str(len(measured)))}
    fixed |= {("text", "What word is written in the image?", word if word else "none")}
    for m in measured:
        if kinds[m["kind"]] == 1:
            fixed.add(("color", f"What color is the {m['kind']}?", m["color"]))
        if colors[m["color"]] == 1:
            fixed.add(("shape", f"What shape is {m['color']}?", m["kind"]))
    position = {}
    unique = [m for m in measured if pairs[(m["color"], m["kind"])] == 1]
    for a in unique:
        for b in unique:
            if a is not b and abs(a["center"][0] - b["center"][0]) >= 0.15 * width:
                position[(f"{a['color']} {a['kind']}", f"{b['color']} {b['kind']}")] = (
                    "left" if a["center"][0] < b["center"][0] else "right"
                )
    return {"fixed": fixed, "position": position}


def pixel_gap(a: tuple, b: tuple) -> int:
    """Largest axis gap between two inclusive pixel extents (negative when they overlap on both axes)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = random.Random(1234)
    return [sample_scene(rng) for _ in range(200)]


@pytest.fixture(scope="module")
def rendered(scenes) -> list[tuple[Scene, Image.Image, list[dict]]]:
    out = []
    for scene in scenes[:80]:
        image = render(scene)
        out.append((scene, image, measure_shapes(image, scene)))
    return out


def test_constants_match_spec():
    assert COLORS == SPEC_COLORS
    assert set(SHAPES) == {"circle", "square", "triangle"}
    assert list(WORDS) == SPEC_WORDS
    assert QUESTION_TYPES == ("count", "color", "shape", "text", "position")


def test_image_size_and_background(rendered):
    for scene, image, measured in rendered:
        assert image.mode == "RGB"
        width, height = image.size
        assert 160 <= width <= 320 and 160 <= height <= 320
        pixels = np.asarray(image).astype(int)
        outside = np.ones(pixels.shape[:2], dtype=bool)
        for m in measured:
            x0, y0, x1, y1 = m["extent"]
            outside[y0 : y1 + 1, x0 : x1 + 1] = False
        if scene.text_box is not None:
            left, top, right, bottom = scene.text_box
            outside[top:bottom, left:right] = False
        grey = pixels[outside]
        g = int(grey[0, 0])
        assert 215 <= g <= 255 and g == scene.background
        assert (grey == g).all(), "every pixel outside the shapes and the word is the background grey"


def test_shapes_measured_from_pixels(rendered):
    for scene, image, measured in rendered:
        assert 1 <= len(scene.shapes) <= 3
        short = min(image.size)
        for shape, m in zip(scene.shapes, measured):
            assert m["extent"] == shape.box, "the painted pixels span exactly the box (x0, y0, x0 + s, y0 + s)"
            s = m["extent"][2] - m["extent"][0]
            assert s == m["extent"][3] - m["extent"][1]
            assert round(0.18 * short) <= s <= round(0.30 * short)
            assert m["extent"][2] < image.width and m["extent"][3] < image.height
            assert m["kind"] == shape.kind
            assert m["color"] == shape.color
            base = SPEC_COLORS[m["color"]]
            for channel, base_channel in zip(m["rgb"], base):
                assert max(0, base_channel - 15) <= channel <= min(255, base_channel + 15)


def test_triangle_vertices():
    scene = Scene(200, 200, 240, (Shape("triangle", "blue", (40, 80, 220), (20, 30, 80, 90)),))
    pixels = np.asarray(render(scene)).astype(int)
    blue = (pixels == (40, 80, 220)).all(-1)
    assert blue[30, 50], "apex at (x0 + s/2, y0)"
    assert not blue[30, 40] and not blue[30, 60]
    assert blue[90, 20] and blue[90, 80], "base corners (x0, y0 + s) and (x0 + s, y0 + s)"
    assert blue[90].sum() == 61 and not blue[91].any()


def test_boxes_keep_4px_gap(rendered, scenes):
    for scene, image, measured in rendered:
        extents = [m["extent"] for m in measured]
        for i in range(len(extents)):
            for j in range(i + 1, len(extents)):
                assert pixel_gap(extents[i], extents[j]) >= 4
        if scene.text_box is not None:
            left, top, right, bottom = scene.text_box
            text_extent = (left, top, right - 1, bottom - 1)
            for extent in extents:
                assert pixel_gap(extent, text_extent) >= 4
    gaps = []
    for scene in scenes:
        boxes = scene.boxes
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
                assert gap >= 4
                gaps.append(gap)
    assert min(gaps) < 10, "rejection sampling places boxes close together sometimes"


def test_word_drawn_with_default_font(rendered):
    with_word = [(s, im) for s, im, _ in rendered if s.word is not None]
    without = [(s, im) for s, im, _ in rendered if s.word is None]
    assert with_word and without
    for scene, image in with_word:
        assert scene.word in SPEC_WORDS
        short = min(image.size)
        assert round(0.12 * short) <= scene.font_size <= round(0.18 * short)
        left, top, right, bottom = scene.text_box
        assert 0 <= left and 0 <= top and right <= image.width and bottom <= image.height
        crop = np.asarray(image.crop(scene.text_box)).astype(int)
        assert (crop == 0).all(-1).any(), "black ink inside the text box"

        font = ImageFont.load_default(size=scene.font_size)
        reference = Image.new("RGB", image.size, (scene.background,) * 3)
        draw = ImageDraw.Draw(reference)
        l0, t0, _, _ = draw.textbbox((0, 0), scene.word, font=font)
        origin = (left - l0, top - t0)
        assert draw.textbbox(origin, scene.word, font=font) == scene.text_box
        draw.text(origin, scene.word, fill=(0, 0, 0), font=font)
        assert (np.asarray(reference.crop(scene.text_box)) == crop).all()

        ink = ~(np.asarray(image).astype(int) == scene.background).all(-1)
        for shape in scene.shapes:
            x0, y0, x1, y1 = shape.box
            ink[y0 : y1 + 1, x0 : x1 + 1] = False
        ys, xs = np.nonzero(ink)
        assert xs.min() >= left and xs.max() < right and ys.min() >= top and ys.max() < bottom
    for scene, image in without:
        pixels = np.asarray(image).astype(int)
        assert not (pixels == 0).all(-1).any()
        assert not (pixels < 100).all(-1).any()


def test_captions_left_to_right_from_pixels(rendered):
    for scene, _, measured in rendered:
        match = CAPTION_RE.match(caption(scene))
        assert match, caption(scene)
        n, noun, items, word = match.groups()
        assert int(n) == len(measured) and noun == ("shape" if n == "1" else "shapes")
        assert word == scene.word
        ordered = sorted(measured, key=lambda m: m["center"][0])
        expected_items = [f"{'an' if m['color'] == 'orange' else 'a'} {m['color']} {m['kind']}" for m in ordered]
        assert items.split(", ") == expected_items


def test_answers_recomputed_from_pixels(rendered):
    rng = random.Random(7)
    for scene, image, measured in rendered:
        asked = questions(scene, rng)
        assert all(set(q) == {"type", "question", "answer"} for q in asked)
        expected = expected_questions(measured, scene.word, image.width)
        fixed = [(q["type"], q["question"], q["answer"]) for q in asked if q["type"] != "position"]
        assert len(fixed) == len(set(fixed)) and set(fixed) == expected["fixed"]
        named = set()
        for q in (q for q in asked if q["type"] == "position"):
            m = re.fullmatch(r"Is the (\w+ \w+) left or right of the (\w+ \w+)\?", q["question"])
            assert m, q["question"]
            assert expected["position"][m.groups()] == q["answer"]
            named.add(frozenset(m.groups()))
        assert len(named) == len([q for q in asked if q["type"] == "position"])
        assert named == {frozenset(pair) for pair in expected["position"]}


def test_position_order_is_random():
    scene = Scene(
        300,
        200,
        230,
        (
            Shape("circle", "red", (220, 40, 40), (10, 10, 50, 50)),
            Shape("square", "blue", (40, 80, 220), (200, 10, 240, 50)),
        ),
    )
    rng = random.Random(0)
    asked = [next(q for q in questions(scene, rng) if q["type"] == "position") for _ in range(100)]
    orders = Counter((q["question"], q["answer"]) for q in asked)
    assert set(orders) == {
        ("Is the red circle left or right of the blue square?", "left"),
        ("Is the blue square left or right of the red circle?", "right"),
    }
    assert all(25 <= c <= 75 for c in orders.values())


def test_spec_caption_examples():
    two = Scene(
        240,
        200,
        240,
        (
            Shape("triangle", "orange", (245, 140, 30), (150, 20, 200, 70)),
            Shape("circle", "red", (220, 40, 40), (10, 100, 60, 150)),
        ),
        word="FOX",
        font_size=30,
        text_box=(10, 20, 60, 40),
    )
    assert caption(two) == "2 shapes: a red circle, an orange triangle. The text says FOX."
    one = Scene(200, 200, 215, (Shape("square", "blue", (40, 80, 220), (50, 50, 100, 100)),))
    assert caption(one) == "1 shape: a blue square. There is no text."


def test_hand_built_questions():
    # W = 300, so a position question needs centres 45 apart: red circle (x 50) vs blue circle (x 80) is too close.
    scene = Scene(
        300,
        240,
        230,
        (
            Shape("circle", "red", (220, 40, 40), (30, 10, 70, 50)),
            Shape("square", "red", (220, 40, 40), (180, 10, 220, 50)),
            Shape("circle", "blue", (40, 80, 220), (60, 120, 100, 160)),
        ),
        word="KEY",
        font_size=30,
        text_box=(200, 150, 250, 170),
    )
    asked = questions(scene, random.Random(0))
    fixed = {(q["type"], q["question"], q["answer"]) for q in asked if q["type"] != "position"}
    assert fixed == {
        ("count", "How many shapes are there?", "3"),
        ("color", "What color is the square?", "red"),
        ("shape", "What shape is blue?", "circle"),
        ("text", "What word is written in the image?", "KEY"),
    }
    position = {q["question"]: q["answer"] for q in asked if q["type"] == "position"}
    assert len(position) == 2
    truth = {
        frozenset({"red circle", "red square"}): {"red circle": "left", "red square": "right"},
        frozenset({"red square", "blue circle"}): {"red square": "right", "blue circle": "left"},
    }
    for question, answer in position.items():
        first, second = re.fullmatch(r"Is the (\w+ \w+) left or right of the (\w+ \w+)\?", question).groups()
        assert truth[frozenset({first, second})][first] == answer

    duplicate = Scene(
        300,
        240,
        230,
        (
            Shape("circle", "red", (220, 40, 40), (10, 10, 50, 50)),
            Shape("circle", "red", (220, 40, 40), (200, 10, 240, 50)),
        ),
    )
    asked = {(q["type"], q["answer"]) for q in questions(duplicate, random.Random(0))}
    assert asked == {("count", "2"), ("text", "none")}


def test_distribution_plausible(scenes):
    rng = random.Random(99)
    n = len(scenes)
    per_image = [Counter(q["type"] for q in questions(s, rng)) for s in scenes]
    assert all(c["count"] == 1 and c["text"] == 1 for c in per_image)
    # Exact expectations per image: color 11/9 = 1.22, shape 57/36 = 1.58.
    assert 1.0 <= sum(c["color"] for c in per_image) / n <= 1.45
    assert 1.35 <= sum(c["shape"] for c in per_image) / n <= 1.8
    assert 0.4 <= sum(c["position"] for c in per_image) / n <= 1.3
    counts = Counter(len(s.shapes) for s in scenes)
    assert all(0.2 <= counts[k] / n <= 0.47 for k in (1, 2, 3))
    assert 0.38 <= sum(s.word is not None for s in scenes) / n <= 0.62
    shapes = [sh for s in scenes for sh in s.shapes]
    assert all(0.2 <= c / len(shapes) <= 0.47 for c in Counter(sh.kind for sh in shapes).values())
    assert len(Counter(sh.color for sh in shapes)) == 6
    assert len(Counter(s.word for s in scenes if s.word)) >= 15
    deviations = [c - b for sh in shapes for c, b in zip(sh.rgb, SPEC_COLORS[sh.color]) if 15 <= b <= 240]
    assert min(deviations) == -15 and max(deviations) == 15
    widths = [s.width for s in scenes]
    assert min(widths) < 175 and max(widths) > 305
    assert sum(s.width != s.height for s in scenes) > 0.9 * n
    backgrounds = [s.background for s in scenes]
    assert min(backgrounds) <= 217 and max(backgrounds) >= 253


def test_score_hand_computed():
    result = score(
        [
            ("count", " 2 \n", "2"),
            ("count", "3", "2"),
            ("color", "red", "red"),
            ("color", "Red", "red"),
            ("text", "none", "none"),
            ("position", "left", "left"),
            ("position", "left.", "left"),
            ("position", "right", "left"),
        ]
    )
    assert result["correct"] == 4 and result["total"] == 8 and result["accuracy"] == pytest.approx(0.5)
    per_type = result["per_type"]
    assert set(per_type) == set(QUESTION_TYPES)
    assert per_type["count"] == {"accuracy": 0.5, "correct": 1, "total": 2}
    assert per_type["color"] == {"accuracy": 0.5, "correct": 1, "total": 2}
    assert per_type["text"] == {"accuracy": 1.0, "correct": 1, "total": 1}
    assert per_type["position"]["correct"] == 1 and per_type["position"]["accuracy"] == pytest.approx(1 / 3)
    assert per_type["shape"] == {"accuracy": 0.0, "correct": 0, "total": 0}
    with pytest.raises(ValueError):
        score([("colour", "red", "red")])


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_shapes_data(tmp_path):
    a = make_shapes_data(tmp_path / "a", 12, seed=5, split_name="val")
    make_shapes_data(tmp_path / "b", 12, seed=5, split_name="val")
    make_shapes_data(tmp_path / "c", 12, seed=6, split_name="val")
    files_a, files_b, files_c = (_tree_bytes(tmp_path / name) for name in "abc")
    assert files_a == files_b
    assert files_a.keys() == files_c.keys() and files_a != files_c
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"], "no temporary folders left behind"

    root = tmp_path / "a"
    captions = json.loads((root / "captions.json").read_text())
    instructions = json.loads((root / "instructions.json").read_text())
    rows = [json.loads(line) for line in (root / "questions.jsonl").read_text().splitlines()]
    scenes = [json.loads(line) for line in (root / "scenes.jsonl").read_text().splitlines()]
    assert len(captions) == len(scenes) == 12 and a.num_images == 12
    assert len(instructions) == len(rows) == a.num_questions
    assert sum(a.question_counts.values()) == a.num_questions
    assert a.question_counts["count"] == a.question_counts["text"] == 12
    assert len({c["image"] for c in captions}) == 12 and len({c["id"] for c in captions}) == 12

    for sample, entry in zip(captions, scenes):
        assert sample["image"] == entry["image"] and sample["image"].startswith("images/")
        image = Image.open(root / sample["image"])
        assert image.format == "PNG" and image.mode == "RGB"
        scene = Scene.from_dict(entry["scene"])
        assert (np.asarray(image) == np.asarray(render(scene))).all()
        human, gpt = sample["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n") and len(human["value"]) > 8
        assert gpt == {"from": "gpt", "value": caption(scene)}

    for sample, row in zip(instructions, rows):
        assert set(row) == {"id", "image", "question", "answer", "type"}
        assert sample["id"] == row["id"] and sample["image"] == row["image"] and sample["type"] == row["type"]
        assert sample["conversations"] == [
            {"from": "human", "value": f"<image>\n{row['question']}"},
            {"from": "gpt", "value": row["answer"]},
        ]
    by_image = {e["image"]: Scene.from_dict(e["scene"]) for e in scenes}
    for row in rows:
        image = Image.open(root / row["image"]).convert("RGB")
        scene = by_image[row["image"]]
        expected = expected_questions(measure_shapes(image, scene), scene.word, image.width)
        if row["type"] == "position":
            pair = re.fullmatch(r"Is the (\w+ \w+) left or right of the (\w+ \w+)\?", row["question"]).groups()
            assert expected["position"][pair] == row["answer"]
        else:
            assert (row["type"], row["question"], row["answer"]) in expected["fixed"]

    prefix = make_shapes_data(tmp_path / "d", 5, seed=5, split_name="val")
    assert prefix.num_images == 5
    assert _tree_bytes(tmp_path / "d")["images/val_000004.png"] == files_a["images/val_000004.png"]


# The files of make_shapes_data(dir, 12, seed=3) as the generator wrote them before its steps were split out of one
# function: the data files by their bytes, the images by their decoded pixels (a PNG's bytes are the encoder's
# choice, which can change with Pillow or zlib while the image stays the same).
SEED_3_SPLIT = {
    "captions.json": "291d3d593dc2c363",
    "images/train_000000.png": "d51c5ec730a0c2e5 RGB 220x311",
    "images/train_000001.png": "e8af68a888023155 RGB 312x259",
    "images/train_000002.png": "d347954b3eb6c4cd RGB 309x219",
    "images/train_000003.png": "e373dc2b8c60bf75 RGB 306x305",
    "images/train_000004.png": "7ba5f0aa726cf72e RGB 283x182",
    "images/train_000005.png": "b9831fce39893eac RGB 169x239",
    "images/train_000006.png": "d6e337b91ca8c120 RGB 289x229",
    "images/train_000007.png": "67859352ec4fa224 RGB 310x175",
    "images/train_000008.png": "2fed66b6706ec507 RGB 216x228",
    "images/train_000009.png": "b804a28b9aa631f1 RGB 318x248",
    "images/train_000010.png": "3393f48871b279d1 RGB 216x168",
    "images/train_000011.png": "a5414cf364128bd6 RGB 173x316",
    "instructions.json": "2c9c4c6e0542476f",
    "meta.json": "aa85ddf39c37d6af",
    "questions.jsonl": "7f7f4586075416fd",
    "scenes.jsonl": "be9b0af5bf449c65",
}


def _split_fingerprint(root: Path) -> dict[str, str]:
    fingerprint = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix == ".png":
            with Image.open(path) as image:
                pixels = hashlib.sha256(np.asarray(image).tobytes()).hexdigest()[:16]
                fingerprint[str(path.relative_to(root))] = f"{pixels} {image.mode} {image.width}x{image.height}"
        else:
            fingerprint[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return fingerprint


def test_make_shapes_data_writes_the_pinned_seed_3_split(tmp_path):
    summary = make_shapes_data(tmp_path / "split", 12, seed=3)
    assert _split_fingerprint(tmp_path / "split") == SEED_3_SPLIT
    assert (summary.num_images, summary.output_dir) == (12, tmp_path / "split")


def test_make_shapes_data_refuses_non_empty(tmp_path):
    out = tmp_path / "out"
    make_shapes_data(out, 2, seed=0)
    before = _tree_bytes(out)
    with pytest.raises(FileExistsError):
        make_shapes_data(out, 3, seed=1)
    assert _tree_bytes(out) == before
    make_shapes_data(out, 3, seed=1, overwrite=True)
    assert json.loads((out / "meta.json").read_text())["num_images"] == 3
    assert len(list((out / "images").iterdir())) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    make_shapes_data(empty, 1, seed=0)
    assert (empty / "captions.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]
