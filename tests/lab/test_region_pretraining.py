import pytest
import torch
from PIL import Image, ImageDraw

from florence_vl_hf.build import build_random_model
from florence_vl_hf.lab.shapes import WORDS, make_shapes_data
from florence_vl_hf.lab.region_pretraining import box_tokens, depth_tokens, pretrain_regions, scene_targets
from florence_vl_hf.lab.shapes_recipe import tiny_shapes_config, zero_davit_mixers


pytestmark = pytest.mark.usefixtures("one_thread")


def test_box_tokens_by_hand():
    # 200 x 100 padded to 200 x 200 with the image 50 px down; 8 x 8 cells of 25 px.
    assert box_tokens((100, 40, 125, 65), 200, 100, 8, pad=True) == [28, 36]  # rows 3-4 (y 90-114), column 4
    assert box_tokens((0, 0, 25, 25), 200, 100, 8, pad=True) == [16]
    # Stretched instead: cells of 25 x 12.5 px.
    assert box_tokens((0, 0, 25, 25), 200, 100, 8, pad=False) == [0, 8]
    assert box_tokens((190, 90, 200, 100), 200, 100, 8, pad=False) == [63]
    # 100 x 200: padded 50 px to the right.
    assert box_tokens((0, 0, 10, 10), 100, 200, 8, pad=True) == [2]


def test_scene_targets_by_hand():
    scene = {
        "width": 200, "height": 100, "background": 230,
        "shapes": [{"kind": "square", "color": "blue", "rgb": [40, 80, 220], "box": [100, 40, 125, 65]},
                   {"kind": "triangle", "color": "orange", "rgb": [245, 140, 30], "box": [150, 5, 180, 35]}],
        "word": "FOX", "font_size": 16, "text_box": [10, 10, 50, 30],
    }  # fmt: skip
    targets = scene_targets(scene, 8, pad=True)
    assert targets["count"] == 1 and targets["word"] == WORDS.index("FOX")
    assert targets["word_tokens"] == [16, 17, 24, 25]  # rows 2-3 (y 60-79), columns 0-1 (x 10-49)
    blue, orange = targets["shapes"]
    assert (blue["color"], blue["kind"], blue["column"], blue["tokens"]) == (2, 1, 4, [28, 36])
    assert (orange["color"], orange["kind"], orange["column"]) == (5, 2, 6)  # centre x 165
    no_word = scene_targets({**scene, "word": None, "text_box": None}, 8, pad=True)
    assert no_word["word"] == -1 and no_word["word_tokens"] == []


@pytest.mark.parametrize("aspect", ["pad", "square"])
def test_box_tokens_are_the_depth_tokens_that_see_the_box(aspect):
    # With the DaViT's spatial mixers zeroed only its patch convolutions mix neighbouring cells (receptive field
    # +-15 px around each cell's corner at 128 px, plus the bicubic resize's spill): painting a box must change the
    # depth token of every cell the box covers, under the processor's own geometry, and barely any token two or more
    # cells away.
    model, processor = build_random_model(tiny_shapes_config(), seed=0)
    zero_davit_mixers(model)
    processor.image_aspect_ratio = aspect
    box = (120, 30, 150, 60)
    blank = Image.new("RGB", (200, 100), (230, 230, 230))
    painted = blank.copy()
    ImageDraw.Draw(painted).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(0, 0, 0))
    pixels = processor.image_processor(processor.preprocess_images([blank, painted]), return_tensors="pt")
    with torch.no_grad():
        tokens = depth_tokens(model.eval(), pixels["pixel_values"])
    assert tokens.shape[1] == 64
    change = (tokens[1] - tokens[0]).norm(dim=-1)
    covered = box_tokens(box, 200, 100, 8, pad=aspect == "pad")
    assert len(covered) == (4 if aspect == "pad" else 6) and (change[covered] > 0.1 * change.max()).all()
    rows, columns = {t // 8 for t in covered}, {t % 8 for t in covered}
    far = [t for t in range(64) if min(abs(t // 8 - r) for r in rows) > 1 or min(abs(t % 8 - c) for c in columns) > 1]
    assert len(far) > 40 and change[far].max() < 0.01 * change.max()


def test_pretrain_regions_trains_the_tower_alone_and_skips_a_broken_image(tmp_path):
    make_shapes_data(tmp_path / "train", 24, seed=3, split_name="train")
    make_shapes_data(tmp_path / "test", 6, seed=4, split_name="test")
    broken = sorted((tmp_path / "train" / "images").glob("*.png"))[5]
    broken.write_bytes(b"not a png")
    model, processor = build_random_model(tiny_shapes_config(), seed=0)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    was_training = model.training
    report = pretrain_regions(model, processor, tmp_path / "train", steps=30, batch_size=8, log_every=10,
                              eval_dir=tmp_path / "test")  # fmt: skip
    assert len(report["losses"]) == 3 and report["losses"][-1] < report["losses"][0]
    assert list(report["skipped"]) == [broken.stem]
    assert set(report["held_out_accuracy"]) == {"count", "has_word", "word", "color", "kind", "column"}
    assert all(0 <= value <= 1 for value in report["held_out_accuracy"].values())
    after = model.state_dict()
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    tower = ("model.vision_tower.backbone.", "model.vision_tower.image_projector.")
    assert changed and all(name.startswith(tower) for name in changed)
    assert any(name.startswith(tower[0]) for name in changed) and any(name.startswith(tower[1]) for name in changed)
    assert model.training == was_training
