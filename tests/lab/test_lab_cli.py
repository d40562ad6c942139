"""The lab's `florence-vl` commands: make-shapes-data, train-tiny, ablations, eval-shapes (and demo-tiny without the
bundled model)."""

import json
from types import SimpleNamespace

from florence_vl_hf.cli import main


def run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr()


def test_make_shapes_data_writes_a_split_and_refuses_to_overwrite(tmp_path, capsys):
    code, captured = run(["make-shapes-data", str(tmp_path / "s"), "--num-images", "3", "--seed", "5"], capsys)
    assert code == 0 and "3 ShapesVQA images" in captured.out
    captions = json.loads((tmp_path / "s" / "captions.json").read_text())
    assert len(captions) == 3 and all((tmp_path / "s" / c["image"]).is_file() for c in captions)
    code, captured = run(["make-shapes-data", str(tmp_path / "s"), "--num-images", "3"], capsys)
    assert code == 1 and "--overwrite" in captured.err


def test_demo_tiny_says_clearly_when_the_model_is_not_bundled(capsys, monkeypatch, tmp_path):
    import florence_vl_hf

    monkeypatch.setattr(florence_vl_hf, "resources", SimpleNamespace(files=lambda package: tmp_path))
    code, captured = run(["demo-tiny"], capsys)
    assert code == 1 and "florence-vl-tiny is not bundled" in captured.err and "train-tiny" in captured.err
    code, captured = run(["eval-shapes", "--num-images", "1"], capsys)
    assert code == 1 and "florence-vl-tiny is not bundled" in captured.err and "--model" in captured.err


def test_train_tiny_with_checkpoints_trains_saves_and_refuses_a_changed_recipe(tmp_path, capsys):
    work = ["--work-dir", str(tmp_path / "work"), "--train-images", "6", "--test-images", "2"]
    steps = ["--stage0-steps", "2", "--stage1-steps", "2", "--stage2-steps", "1", "--checkpoint-steps", "1"]
    code, captured = run(["train-tiny", str(tmp_path / "model"), *work, *steps], capsys)
    assert code == 0, captured.err
    assert captured.out.splitlines()[-2].startswith("overall") and f"saved to {tmp_path / 'model'}" in captured.out
    report = json.loads((tmp_path / "model" / "training_report.json").read_text())
    assert report["recipe"]["stage1_steps"] == 2 and len(report["stage1"]["losses"]) == 2
    assert len(report["stage0"]["losses"]) == 1 and "stage 0" in captured.out
    assert not (tmp_path / "work" / "train-tiny-run").exists()  # removed once the model is saved
    (tmp_path / "work" / "train-tiny-run").mkdir()
    (tmp_path / "work" / "train-tiny-run" / "recipe.json").write_text(json.dumps(report["recipe"]))
    changed = ["--stage0-steps", "2", "--stage1-steps", "3", "--stage2-steps", "1", "--checkpoint-steps", "1"]
    code, captured = run(["train-tiny", str(tmp_path / "again"), *work, *changed], capsys)
    assert code == 1 and "another recipe (differs in stage1_steps)" in captured.err
    code, captured = run(["train-tiny", str(tmp_path / "model"), *work, *steps], capsys)
    assert code == 1 and "not empty" in captured.err


def test_ablations_command_uses_the_shorter_stages_unless_told(tmp_path, capsys, monkeypatch):
    from florence_vl_hf.lab import ablations

    recipes = []

    def fake_sweep(output_dir, seeds, variants, recipe):
        recipes.append(recipe)
        return {"rows": []}

    monkeypatch.setattr(ablations, "run_ablations", fake_sweep)
    code, captured = run(["ablations", str(tmp_path), "--seeds", "0"], capsys)
    assert code == 0, captured.err
    code, captured = run(["ablations", str(tmp_path), "--stage2-steps", "7"], capsys)
    assert code == 0, captured.err
    assert (recipes[0].stage1_steps, recipes[0].stage2_steps) == (1000, 1500)
    assert (recipes[1].stage1_steps, recipes[1].stage2_steps, recipes[1].stage0_steps) == (1000, 7, 4000)
