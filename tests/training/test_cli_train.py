import json

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
