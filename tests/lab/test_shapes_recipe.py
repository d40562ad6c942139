import json
import math
import re
from dataclasses import asdict, replace

import pytest
import torch
from micro_recipe import MICRO
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

from florence_vl_hf.lab.shapes import QUESTION_TYPES, Scene, Shape
from florence_vl_hf.lab.ablations import VARIANTS, format_table, run_ablations
from florence_vl_hf.build import build_random_model
from florence_vl_hf.lab import shapes_recipe
from florence_vl_hf.lab.shapes_recipe import (
    TinyRecipe,
    further_left_questions,
    init_position_tables,
    record_recipe,
    reinit_davit,
    stage2_data,
    tiny_shapes_config,
    train_tiny,
    zero_davit_mixers,
)



pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_architecture_fits_the_size_budget():
    config = tiny_shapes_config()
    from florence_vl_hf.modeling import FlorenceVLForConditionalGeneration

    with torch.device("meta"):
        model = FlorenceVLForConditionalGeneration(config)
    parameters = sum(p.numel() for p in model.parameters())  # tied embeddings are counted once
    assert parameters * 2 <= 25e6
    assert config.num_image_tokens == 65 and config.text_config.vocab_size == 32064


def test_further_left_questions_by_hand(tmp_path):
    # W = 300: the red circle (x 50) and the blue circle (x 80) are too close for a position question, so they get
    # no further-left question either.
    scene = Scene(300, 240, 230, (
        Shape("circle", "red", (220, 40, 40), (30, 10, 70, 50)),
        Shape("square", "red", (220, 40, 40), (180, 10, 220, 50)),
        Shape("circle", "blue", (40, 80, 220), (60, 120, 100, 160)),
    ))  # fmt: skip
    (tmp_path / "scenes.jsonl").write_text(json.dumps({"id": "x", "image": "images/x.png", "scene": scene.to_dict()}))
    truth = {frozenset({"red circle", "red square"}): "the red circle",
             frozenset({"red square", "blue circle"}): "the blue circle"}  # fmt: skip
    orders = set()
    for seed in range(8):
        entries = further_left_questions(tmp_path, seed)
        assert len({e["id"] for e in entries}) == 2 and {e["image"] for e in entries} == {"images/x.png"}
        found = {}
        for entry in entries:
            human, gpt = entry["conversations"]
            a, b = re.fullmatch(r"<image>\nWhich is further left, the (\w+ \w+) or the (\w+ \w+)\?",
                                human["value"]).groups()  # fmt: skip
            found[frozenset({a, b})] = gpt["value"]
            orders.add((a, b))
        assert found == truth
        assert further_left_questions(tmp_path, seed) == entries
    assert len(orders) == 4  # both naming orders of both pairs occur

    count, position = ({"id": f"x_q0{i}", "image": "images/x.png", "type": kind, "conversations": []}
                       for i, kind in enumerate(("count", "position")))  # fmt: skip
    (tmp_path / "instructions.json").write_text(json.dumps([position, count]))
    further = further_left_questions(tmp_path, 0)
    once = TinyRecipe(stage2_position_repeats=1)
    assert stage2_data(tmp_path, once) == [position, count, *further]
    assert stage2_data(tmp_path, replace(once, stage2_further_left=False)) == [position, count]
    repeated = stage2_data(tmp_path, TinyRecipe(stage2_position_repeats=3))
    assert repeated == [position, count, *further, *[position, *further] * 2]



def test_record_recipe_writes_once_and_names_the_fields_that_differ(tmp_path):
    path = tmp_path / "recipe.json"
    assert record_recipe(path, {"a": 1, "b": (1, 2)}) == []
    assert json.loads(path.read_text()) == {"a": 1, "b": [1, 2]}
    assert record_recipe(path, {"a": 1, "b": [1, 2]}) == []  # the same recipe, once through JSON
    assert record_recipe(path, {"a": 2, "c": None}) == ["a", "b", "c"]
    assert json.loads(path.read_text()) == {"a": 1, "b": [1, 2]}

def test_reinit_davit_redraws_only_davit_conv_and_linear_weights():
    model, _ = build_random_model(tiny_shapes_config(), seed=0)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    reinit_davit(model, 0.1, seed=3)
    backbone = model.model.vision_tower.backbone
    redrawn = {f"model.vision_tower.backbone.{name}.weight" for name, module in backbone.named_modules()
               if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))}  # fmt: skip
    after = model.state_dict()
    assert {name for name in after if not torch.equal(after[name], before[name])} == redrawn
    weights = torch.cat([after[name].flatten() for name in redrawn])
    assert weights.std().item() == pytest.approx(0.1, rel=0.02) and abs(weights.mean().item()) < 2e-3
    again, _ = build_random_model(tiny_shapes_config(), seed=0)
    reinit_davit(again, 0.1, seed=3)
    assert all(torch.equal(again.state_dict()[name], after[name]) for name in redrawn)


def test_zero_davit_mixers_leaves_each_block_its_mlp_branch():
    model, _ = build_random_model(tiny_shapes_config(), seed=0)
    reinit_davit(model, 0.1, seed=3)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    zero_davit_mixers(model)
    after = model.state_dict()
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    assert changed and all(not after[name].any() for name in changed)
    assert {name.rsplit(".", 2)[-2] for name in changed} == {"proj", "conv1", "conv2"}
    block = model.model.vision_tower.backbone.blocks[1][0]
    hidden = torch.randn(2, 64, 8, 8)
    for part in (block.spatial_block, block.channel_block):
        tokens = hidden.flatten(2).transpose(1, 2)
        expected = (tokens + part.ffn(part.norm2(tokens))).transpose(1, 2).reshape(hidden.shape)
        torch.testing.assert_close(part(hidden), expected)


def test_init_position_tables_gives_each_cell_the_sin_cos_of_its_row_and_column():
    model, _ = build_random_model(tiny_shapes_config(), seed=0)
    init_position_tables(model, 3.0)
    position_embed = model.model.vision_tower.image_projector.image_position_embed
    table = position_embed(torch.zeros(1, 128, 8, 8))[0]  # channels: 64 for the column, then 64 for the row
    for row, column, channel in ((0, 0, 0), (2, 5, 1), (7, 3, 20), (4, 6, 40), (5, 1, 63)):
        k = channel % 32
        wave = math.sin if channel < 32 else math.cos
        assert table[channel, row, column].item() == pytest.approx(3.0 * wave(column * 100 ** (-k / 32)), abs=1e-6)
        assert table[64 + channel, row, column].item() == pytest.approx(3.0 * wave(row * 100 ** (-k / 32)), abs=1e-6)


def test_train_tiny_applies_the_mixer_and_position_inits(tmp_path, monkeypatch):
    seen = {}

    def capture(model, *args):
        seen["model"] = model
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes_recipe, "_train_stages", capture)
    with pytest.raises(KeyboardInterrupt):
        recipe = TinyRecipe(**MICRO, vision_zero_mixers=True, vision_position_init_scale=2.0)
        train_tiny(tmp_path / "model", tmp_path / "work", recipe)
    columns = seen["model"].model.vision_tower.image_projector.image_position_embed.column_embeddings.weight
    assert columns[1, 0].item() == pytest.approx(2.0 * math.sin(1.0)) and columns[0, 32].item() == 2.0
    block = seen["model"].model.vision_tower.backbone.blocks[0][0]
    assert not block.spatial_block.window_attn.proj.weight.any() and not block.channel_block.conv2.weight.any()
    assert block.spatial_block.ffn.fc1.weight.any() and not (tmp_path / "model").exists()


def test_train_tiny_runs_both_stages_and_saves_a_loadable_bf16_model(tmp_path):
    report = train_tiny(tmp_path / "model", tmp_path / "work", TinyRecipe(**MICRO))
    assert len(report["stage0"]["losses"]) == 1 and "held_out_accuracy" in report["stage0"]
    assert len(report["stage1"]["losses"]) == 2 and len(report["stage2"]["losses"]) == 2
    evaluation = report["evaluation"]
    assert set(evaluation["per_type"]) == set(QUESTION_TYPES)
    assert evaluation["total"] == sum(1 for _ in (tmp_path / "work").glob("shapes-test-*/questions.jsonl")
                                      for _ in open(_))  # fmt: skip
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "model")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    AutoProcessor.from_pretrained(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "training_report.json").read_text())
    assert saved["recipe"]["stage1_steps"] == 2 and not list(tmp_path.glob(".model.staging-*"))
    with pytest.raises(FileExistsError):
        train_tiny(tmp_path / "model", tmp_path / "work", TinyRecipe(**MICRO))


def test_same_seed_same_weights(tmp_path):
    first = train_tiny(tmp_path / "a", tmp_path / "work", TinyRecipe(**MICRO))
    second = train_tiny(tmp_path / "b", tmp_path / "work", TinyRecipe(**MICRO))
    assert first["stage0"]["losses"] == second["stage0"]["losses"]
    assert first["stage1"]["losses"] == second["stage1"]["losses"]
    without = train_tiny(tmp_path / "c", tmp_path / "work", TinyRecipe(**{**MICRO, "stage0_steps": 0}))
    assert "stage0" not in without and without["stage1"]["losses"] != first["stage1"]["losses"]
    a = AutoModelForImageTextToText.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForImageTextToText.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_cached_stage0_gives_the_weights_of_a_run_that_trains_it(tmp_path, monkeypatch):
    recipe = TinyRecipe(**MICRO)
    train_tiny(tmp_path / "straight", tmp_path / "work", recipe)
    train_tiny(tmp_path / "first", tmp_path / "work", recipe, stage0_cache=tmp_path / "stage0")
    assert sorted(p.name for p in (tmp_path / "stage0").iterdir()) == ["stage0.json", "stage0.safetensors"]

    def no_stage0(*args, **kwargs):
        raise AssertionError("stage 0 ran again")

    monkeypatch.setattr(shapes_recipe, "pretrain_regions", no_stage0)
    report = train_tiny(tmp_path / "cached", tmp_path / "work", recipe, stage0_cache=tmp_path / "stage0")
    straight = json.loads((tmp_path / "straight" / "training_report.json").read_text())
    assert report["stage0"]["losses"] == straight["stage0"]["losses"]
    assert report["stage1"]["losses"] == straight["stage1"]["losses"]
    a = AutoModelForImageTextToText.from_pretrained(tmp_path / "straight").state_dict()
    b = AutoModelForImageTextToText.from_pretrained(tmp_path / "cached").state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    # another variant starts from the same tower; another stage-0 recipe is refused
    train_tiny(tmp_path / "token", tmp_path / "work", TinyRecipe(**MICRO, fusion="token"),
               stage0_cache=tmp_path / "stage0")  # fmt: skip
    with pytest.raises(ValueError, match="stage 0 of another recipe"):
        train_tiny(tmp_path / "other", tmp_path / "work", TinyRecipe(**{**MICRO, "stage0_lr": 5e-4}),
                   stage0_cache=tmp_path / "stage0")  # fmt: skip


def test_ablation_sweep_writes_a_table_and_resumes(tmp_path, monkeypatch):
    variants = ["token (all)", "depth only"]
    stage0_calls = []
    pretrain_regions = shapes_recipe.pretrain_regions
    monkeypatch.setattr(shapes_recipe, "pretrain_regions",
                        lambda *args, **kwargs: stage0_calls.append(1) or pretrain_regions(*args, **kwargs))
    table = run_ablations(tmp_path, seeds=[0], variants=variants, recipe=TinyRecipe(**MICRO), log=lambda _: None)
    assert len(stage0_calls) == 1  # one stage 0 per seed, shared by the variants
    rows = {row["variant"]: row for row in table["rows"]}
    assert rows["token (all)"]["image_tokens"] == 4 * rows["depth only"]["image_tokens"]
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 2
    assert "| token (all) | 260 |" in (tmp_path / "ablations.md").read_text()
    # A second call finds both runs done and trains nothing.
    again = run_ablations(tmp_path, seeds=[0], variants=variants, recipe=TinyRecipe(**MICRO),
                          log=lambda line: pytest.fail(f"retrained: {line}"))  # fmt: skip
    assert format_table(again) == format_table(table)
    with pytest.raises(ValueError, match="sweep of another recipe"):
        run_ablations(tmp_path, seeds=[0], variants=variants, recipe=TinyRecipe(**{**MICRO, "stage2_steps": 3}))
    with pytest.raises(ValueError, match="Unknown variants"):
        run_ablations(tmp_path, variants=["nope"])
    assert set(VARIANTS) >= set(variants)


class _Interrupt(TrainerCallback):
    def __init__(self, stage_steps: int, at_step: int):
        self.stage_steps, self.at_step = stage_steps, at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps == self.stage_steps and state.global_step == self.at_step:
            raise KeyboardInterrupt(f"interrupted at step {state.global_step}")


@pytest.mark.parametrize("stage_steps", [3, 4], ids=["in stage 1", "in stage 2"])
def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, stage_steps):
    recipe = TinyRecipe(**{**MICRO, "stage1_steps": 3, "stage2_steps": 4})
    train_tiny(tmp_path / "straight", tmp_path / "work", recipe)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(tmp_path / "resumed", tmp_path / "work", recipe, checkpoint_steps=1,
                   callbacks=[_Interrupt(stage_steps, at_step=2)])  # fmt: skip
    run = tmp_path / "work" / "train-tiny-run"
    assert (run / "stage0.json").is_file() and (run / "stage1.json").is_file() == (stage_steps == 4)
    # a finished stage's Trainer checkpoints are removed, the interrupted stage's kept
    assert sorted(p.name for p in run.glob("checkpoints-*")) == ["checkpoints-stage2" if stage_steps == 4
                                                                  else "checkpoints-stage1"]  # fmt: skip
    assert not (tmp_path / "resumed").exists() and not list(tmp_path.glob(".resumed.staging-*"))
    with pytest.raises(ValueError, match="another recipe .*stage2_steps"):
        train_tiny(tmp_path / "other", tmp_path / "work", TinyRecipe(**{**asdict(recipe), "stage2_steps": 5}),
                   checkpoint_steps=1)  # fmt: skip
    report = train_tiny(tmp_path / "resumed", tmp_path / "work", recipe, checkpoint_steps=1)
    assert report["stage1" if stage_steps == 3 else "stage2"]["resumed"] and not run.exists()
    straight = json.loads((tmp_path / "straight" / "training_report.json").read_text())
    assert report["stage0"]["losses"] == straight["stage0"]["losses"]
    assert report["stage1"]["losses"] == straight["stage1"]["losses"]
    assert report["stage2"]["losses"] == straight["stage2"]["losses"]
    a = AutoModelForImageTextToText.from_pretrained(tmp_path / "straight").state_dict()
    b = AutoModelForImageTextToText.from_pretrained(tmp_path / "resumed").state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_checkpointing_needs_a_work_dir(tmp_path):
    with pytest.raises(ValueError, match="work_dir"):
        train_tiny(tmp_path / "model", None, TinyRecipe(**MICRO), checkpoint_steps=10)
