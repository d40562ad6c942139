"""The alignment-loss analysis (paper section 4): loss, training of P, features, subsets, plot and command."""

import argparse
import json
import math

import pytest
import torch
from PIL import Image

from florence_vl_hf.lab.alignment import (
    FEATURE_NAMES,
    alignment_curve,
    alignment_loss,
    extract_features,
    feature_names,
    feature_subsets,
    final_loss,
    make_projection,
    plot_curves,
    run_alignment,
)
from florence_vl_hf.lab.alignment import PALETTE, moving_average
from florence_vl_hf.lab.alignment_cli import add_alignment_parser
from florence_vl_hf.modeling.configuration_florence_vl import DEFAULT_TASK_PROMPTS


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The projections are tiny: one thread is much faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _synthetic(seed, num_pairs, vision_dim, text_dim, related=True):
    generator = torch.Generator().manual_seed(seed)
    vision = torch.randn(num_pairs, vision_dim, generator=generator)
    mapping = torch.randn(vision_dim, text_dim, generator=generator)
    text = vision @ mapping if related else torch.randn(num_pairs, text_dim, generator=generator)
    return vision, text, mapping


def test_loss_equals_hand_computed_cross_entropy():
    vision = [[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]]
    text = [[1.0, 0.0], [0.0, 5.0], [-1.0, -1.0]]

    # Unit vectors: v = (0.6, 0.8), (1, 0), (0, -1); t = (1, 0), (0, 1), (-1, -1)/sqrt(2). Row i of the similarity
    # matrix is (v_i . t_j)_j; its loss is -s_ii + log(sum_j exp(s_ij)).
    r = 1 / math.sqrt(2)
    rows = [
        -0.6 + math.log(math.exp(0.6) + math.exp(0.8) + math.exp(-1.4 * r)),
        -0.0 + math.log(math.exp(1.0) + math.exp(0.0) + math.exp(-r)),
        -r + math.log(math.exp(0.0) + math.exp(-1.0) + math.exp(r)),
    ]
    expected = sum(rows) / 3
    got = alignment_loss(torch.tensor(vision), torch.tensor(text))
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # Scaling a vector changes nothing (L2 normalisation); a temperature divides the logits.
    assert alignment_loss(torch.tensor(vision) * 7, torch.tensor(text) / 3).item() == pytest.approx(expected, abs=1e-6)
    assert alignment_loss(torch.tensor(vision), torch.tensor(text), temperature=0.5).item() != pytest.approx(expected)


def test_first_step_loss_is_the_loss_of_the_initial_projection():
    vision, text, _ = _synthetic(0, 8, 5, 6)
    # With batch == N every batch is a permutation of all pairs, and the loss is invariant to permuting pairs.
    losses = alignment_curve(vision, text, steps=3, batch_size=8, seed=11)
    projection = make_projection(5, 6, seed=11)
    assert losses[0] == pytest.approx(alignment_loss(projection(vision), text).item(), abs=1e-6)
    assert losses[1] != losses[0]  # P trains


def test_alignable_pairs_reach_the_oracle_loss_and_unrelated_pairs_stay_at_chance():
    batch = 16
    vision, text, mapping = _synthetic(0, 512, 16, 32)
    losses = alignment_curve(vision, text, steps=300, batch_size=batch, lr=1e-2, seed=0)
    # The loss of the exact map (P = the generating map), averaged over random batches.
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randperm(512, generator=generator)[:batch] for _ in range(200)]
    oracle = sum(alignment_loss(vision[i] @ mapping, text[i]).item() for i in batches) / len(batches)
    # No batch of unit vectors does better than a regular simplex with v_i = t_i.
    floor = math.log(1 + (batch - 1) * math.exp(-batch / (batch - 1)))
    assert losses[0] > math.log(batch) - 0.2
    assert floor < final_loss(losses) < oracle + 0.05
    assert final_loss(losses) < math.log(batch) - 0.7

    vision, text, _ = _synthetic(0, 4096, 8, 16, related=False)
    losses = alignment_curve(vision, text, steps=300, batch_size=batch, lr=1e-2, seed=0)
    assert abs(final_loss(losses) - math.log(batch)) < 0.08


def test_curve_is_deterministic_in_the_seed():
    vision, text, _ = _synthetic(3, 40, 6, 4)
    first = alignment_curve(vision, text, steps=15, batch_size=8, seed=5)
    torch.manual_seed(123)  # the global RNG plays no part
    assert alignment_curve(vision, text, steps=15, batch_size=8, seed=5) == first
    assert alignment_curve(vision, text, steps=15, batch_size=8, seed=6) != first
    assert len(first) == 15
    assert final_loss([4.0] * 18 + [1.0, 3.0]) == 2.0  # the last 10%: 2 of 20 steps


def test_feature_subsets():
    assert FEATURE_NAMES == ("depth", *DEFAULT_TASK_PROMPTS) == ("depth", "caption", "ocr", "grounding")
    subsets = feature_subsets(FEATURE_NAMES)
    assert list(subsets) == ["all", "remove depth", "remove caption", "remove ocr", "remove grounding", "depth only"]
    assert subsets["all"] == FEATURE_NAMES
    assert subsets["remove ocr"] == ("depth", "caption", "grounding")
    assert subsets["remove depth"] == ("caption", "ocr", "grounding")
    assert subsets["depth only"] == ("depth",)
    assert feature_subsets(("depth",)) == {"all": ("depth",)}


@pytest.fixture(scope="module")
def pairs():
    colours = ["red", "navy", "green"]
    images = [Image.new("RGB", (40 + 9 * i, 30 + 5 * i), colour) for i, colour in enumerate(colours)]
    for i, image in enumerate(images):
        image.putpixel((i, 2 * i), (255, 255, 0))
    captions = ["A red square.", "Two blue circles to the left of a big green triangle, and the word STOP.", "Hi"]
    return images, captions


@pytest.fixture(scope="module")
def features(tiny_phi3, pairs):
    model, processor = tiny_phi3
    return extract_features(model, processor, *pairs, batch_size=2)


def test_extract_features_equal_direct_computation(tiny_phi3, pairs, features):
    model, processor = tiny_phi3
    images, captions = pairs
    assert features.names == feature_names(model.config) == FEATURE_NAMES
    width, hidden = model.config.vision_config.text_config.d_model, model.config.text_config.hidden_size
    assert {name: tuple(v.shape) for name, v in features.vision.items()} == {name: (3, width) for name in FEATURE_NAMES}
    assert features.text.shape == (3, hidden)
    with torch.no_grad():
        for i, (image, caption) in enumerate(zip(images, captions)):
            inputs = processor(images=image, text="<image>", return_tensors="pt")
            depth, breadth, _ = model.model.vision_tower(inputs["pixel_values"], inputs["task_prompt_ids"], None)
            torch.testing.assert_close(features.vision["depth"][i], depth[0].mean(0), rtol=1e-5, atol=1e-5)
            for p, name in enumerate(model.config.task_prompt_names):
                torch.testing.assert_close(features.vision[name][i], breadth[0, p].mean(0), rtol=1e-5, atol=1e-5)
            ids = torch.tensor([processor.tokenizer(caption)["input_ids"]])
            direct = model.model.language_model(input_ids=ids).last_hidden_state[0].mean(0)
            torch.testing.assert_close(features.text[i], direct, rtol=1e-4, atol=1e-5)
    # Concatenation of a subset follows its order.
    concat = features.concat(feature_subsets()["remove ocr"])
    assert concat.shape == (3, 3 * width)
    for k, name in enumerate(("depth", "caption", "grounding")):
        assert torch.equal(concat[:, k * width : (k + 1) * width], features.vision[name])
    # The features are plain tensors a projection can be trained on.
    assert not features.text.is_inference()


def test_caption_representation_ignores_padding(tiny, pairs):
    # Both LLM families (Llama-3.1's tokenizer adds BOS, Phi-3.5's does not): batched equals one at a time.
    model, processor = tiny
    images, captions = pairs
    together = extract_features(model, processor, images, captions, batch_size=3)
    for i in range(3):
        alone = extract_features(model, processor, images[i : i + 1], captions[i : i + 1])
        torch.testing.assert_close(together.text[i], alone.text[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(together.vision["ocr"][i], alone.vision["ocr"][0], rtol=1e-4, atol=1e-5)


def test_run_alignment_on_a_tiny_model(tiny_phi3, pairs, features):
    model, processor = tiny_phi3
    curves = run_alignment(model, processor, *pairs, ["all", "remove ocr"], steps=4, batch_size=3, features=features)
    assert list(curves) == ["all", "remove ocr"] and all(len(c) == 4 for c in curves.values())
    expected = alignment_curve(features.concat(FEATURE_NAMES), features.text, steps=4, batch_size=3)
    assert curves["all"] == expected
    with pytest.raises(ValueError, match="unknown subset"):
        run_alignment(model, processor, *pairs, ["remove nothing"], steps=1, features=features)


def test_plot_writes_png_with_every_line(tmp_path):
    curves = {
        "all": [3.0 - 0.01 * i for i in range(100)],
        "remove ocr": [3.5 - 0.005 * i for i in range(100)],
        "depth only": [4.0 + 0.3 * math.sin(i / 5) for i in range(100)],
    }
    path = plot_curves(curves, tmp_path / "plots" / "curve.png", title="alignment", width=640, height=400, smooth=1)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (640, 400)
        histogram = image.convert("RGB").getcolors(maxcolors=640 * 400)
        counts = {colour: 0 for colour in PALETTE[:3]}
        dark = 0
        for count, pixel in histogram:
            if pixel in counts:
                counts[pixel] += count
            dark += count * (sum(pixel) < 150)
    # Each line is far longer than its 22-pixel legend swatch; the axes, ticks and text are drawn in black.
    assert all(count > 400 for count in counts.values()), counts
    assert dark > 1000
    assert PALETTE[3] not in {pixel for _, pixel in histogram}
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["curve.png"]  # no temporary file left
    assert moving_average([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]


def test_alignment_command(tmp_path, tiny_phi3, capsys):
    from florence_vl_hf.build import save_hub_folder
    from florence_vl_hf.lab.shapes import make_shapes_data

    data = tmp_path / "shapes"
    make_shapes_data(data, 12, seed=0, split_name="val")
    save_hub_folder(*tiny_phi3, tmp_path / "model")
    parser = argparse.ArgumentParser(prog="florence-vl")
    add_alignment_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([
        "alignment", "--model", str(tmp_path / "model"), "--data", str(data / "captions.json"),
        "--image-folder", str(data), "--output", str(tmp_path / "curves.png"), "--json", str(tmp_path / "c.json"),
        "--steps", "20", "--batch-size", "8", "--num-pairs", "10", "--seed", "1",
    ])  # fmt: skip
    assert args.handler(args) == 0
    lines = capsys.readouterr().out.splitlines()
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["num_pairs"] == 10 and report["settings"]["batch_size"] == 8
    assert list(report["curves"]) == list(feature_subsets())
    for name, losses in report["curves"].items():
        assert len(losses) == 20
        row = [line for line in lines if line.startswith(name + "  ")]
        assert len(row) == 1 and row[0].endswith(f"{final_loss(losses):.4f}"), lines
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size == (800, 500)
    # The same pairs and settings through the API give the same curves.
    captions = json.loads((data / "captions.json").read_text())[:10]
    images = [data / sample["image"] for sample in captions]
    texts = [sample["conversations"][-1]["value"] for sample in captions]
    api = run_alignment(*tiny_phi3, images, texts, ["all"], steps=20, batch_size=8, seed=1)
    assert api["all"] == pytest.approx(report["curves"]["all"], abs=1e-5)


def test_distinct_captions_keep_the_first_pair_of_each_caption(tmp_path):
    from florence_vl_hf.lab.alignment_cli import load_caption_pairs

    def sample(i, caption):
        return {"id": str(i), "image": f"{i}.png",
                "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": caption}]}

    captions = ["a red circle", "a blue square", "a red circle", "a green triangle", "a blue square"]
    (tmp_path / "c.json").write_text(json.dumps([sample(i, c) for i, c in enumerate(captions)]))
    paths, texts, skipped = load_caption_pairs(tmp_path / "c.json", distinct_captions=True)
    assert [p.name for p in paths] == ["0.png", "1.png", "3.png"] and skipped == 2
    assert texts == ["a red circle", "a blue square", "a green triangle"]
    paths, texts, skipped = load_caption_pairs(tmp_path / "c.json", num_pairs=2, distinct_captions=True)
    assert texts == ["a red circle", "a blue square"]
    paths, texts, skipped = load_caption_pairs(tmp_path / "c.json")
    assert texts == captions and skipped == 0
