import json
from types import SimpleNamespace

import pytest
import torch
from conftest import write_samples
from transformers import AutoModelForImageTextToText

from florence_vl_hf.cards import check_card_metadata
from florence_vl_hf.cli import main
from florence_vl_hf.tiny import tiny_config


def run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr()


def test_train_from_a_config_then_resume_then_finetune_with_lora(data_folder, tmp_path, capsys):
    folder, samples = data_folder
    data = write_samples(folder, samples)
    tiny_config("phi3").save_pretrained(tmp_path / "config")
    common = ["--data", str(data), "--image-folder", str(folder), "--per-device-batch-size", "3",
              "--global-batch-size", "3", "--learning-rate", "3e-3", "--warmup", "0", "--save-steps", "2",
              "--logging-steps", "1", "--disable-progress-bar"]  # fmt: skip
    out = tmp_path / "stage1"
    code, captured = run(["train", "--stage", "pretrain", "--config", str(tmp_path / "config"), "--template", "phi3",
                          "--output-dir", str(out), "--max-steps", "2", "--vision-tower-start-step", "1", *common],
                         capsys)  # fmt: skip
    assert code == 0, captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["metrics"]["epoch"] > 0
    assert (out / "checkpoint-2").is_dir()

    # Resuming the same run (same options) to 4 steps continues from checkpoint-2.
    code, captured = run(["train", "--stage", "pretrain", "--config", str(tmp_path / "config"), "--template", "phi3",
                          "--output-dir", str(out), "--max-steps", "4", "--resume-from-checkpoint",
                          "--vision-tower-start-step", "1", *common], capsys)  # fmt: skip
    assert code == 0, captured.err
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps == [1, 2, 3, 4]

    # Stage 2 with LoRA from the stage-1 folder; the merged model loads with the Auto classes.
    out2 = tmp_path / "stage2"
    code, captured = run(["train", "--stage", "finetune", "--model", str(out), "--output-dir", str(out2),
                          "--max-steps", "2", "--lora", "--lora-r", "4", "--merge-lora", "--cache-images", "8", *common], capsys)  # fmt: skip
    assert code == 0, captured.err
    assert (out2 / "adapter_config.json").is_file()
    # every folder the run wrote is a Hub repository with a model card the Hub can list
    for written, library in ((out, "transformers"), (out2, "peft"), (out2 / "merged", "transformers")):
        card = check_card_metadata((written / "README.md").read_text(), needs={"library_name": library})
        assert card.data.pipeline_tag == "image-text-to-text" and card.data.license == "mit", written
    assert "(pretrain stage, 4 optimizer steps on 3 samples)" in (out / "README.md").read_text()
    merged = AutoModelForImageTextToText.from_pretrained(out2 / "merged")
    stage1 = AutoModelForImageTextToText.from_pretrained(out)
    torch.testing.assert_close(merged.model.vision_tower.state_dict(), stage1.model.vision_tower.state_dict())
    assert any(
        not torch.equal(a, b)
        for a, b in zip(merged.model.multi_modal_projector.parameters(), stage1.model.multi_modal_projector.parameters())
    )


def test_train_reports_bad_input_clearly(tmp_path, capsys):
    code, captured = run(["train", "--stage", "finetune", "--model", str(tmp_path / "nowhere"),
                          "--data", "x.json", "--output-dir", str(tmp_path / "o")], capsys)  # fmt: skip
    assert code == 1 and "could not load the model" in captured.err


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
    from florence_vl_hf.training import ablations

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
