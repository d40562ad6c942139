"""Multi-process training: under torchrun on the CPU the processes train as one gloo group (the same losses and weights
as one process at the same global batch), and settings that cannot train as asked are refused."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

import florence_vl_hf
from florence_vl_hf.cli import main
from florence_vl_hf.lab.shapes import make_shapes_data
from florence_vl_hf.tiny import tiny_config
from florence_vl_hf.training import TrainingSetupError, train, training_arguments
from florence_vl_hf.training.api import check_sharding, fsdp_arguments

STEPS = 3


@pytest.fixture
def run_setup(tmp_path):
    """A tiny config without dropout (processes draw different random numbers) and 8 ShapesVQA captions."""
    config = tiny_config("phi3")
    config.vision_config.text_config.dropout = 0.0  # the BART encoder's; every other dropout of the tiny model is 0
    config.save_pretrained(tmp_path / "config")
    make_shapes_data(tmp_path / "data", 8, seed=3)
    return tmp_path


def train_argv(folder: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--stage", "pretrain", "--config", str(folder / "config"), "--template", "phi3",
            "--data", str(folder / "data" / "captions.json"), "--image-folder", str(folder / "data"),
            "--output-dir", str(output), "--per-device-batch-size", "2", "--global-batch-size", "4",
            "--learning-rate", "1e-3", "--warmup", "0", "--max-steps", str(STEPS), "--logging-steps", "1",
            "--save-steps", str(STEPS), "--disable-progress-bar", *extra]  # fmt: skip


def losses(output: Path) -> list[float]:
    state = json.loads((output / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.slow
def test_two_gloo_processes_train_like_one_process_at_the_same_global_batch(run_setup, one_thread, capsys):
    folder = run_setup
    # One process: per-device batch 2, 2 accumulation steps.
    code = main(train_argv(folder, folder / "one"))
    assert code == 0, capsys.readouterr().err
    # Two processes under torchrun, no ACCELERATE_USE_CPU: per-device batch 2, no accumulation.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ACCELERATE_", "WORLD_SIZE"))}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(florence_vl_hf.__file__).parents[1]), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "florence_vl_hf.cli", *train_argv(folder, folder / "two")],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    summaries = [line for line in launched.stdout.splitlines() if line.startswith('{"output_dir"')]
    assert len(summaries) == 1  # the first process prints the summary (and writes the folder)
    state = json.loads((folder / "two" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 2 and state["global_step"] == STEPS

    # The distributed sampler gives the two processes the halves of the batch one process accumulates over (step 3
    # starts the second epoch, reshuffled alike): the same samples per optimizer step. fp32 throughout; the gloo
    # all-reduce adds the two halves' gradients where one process accumulates them, so only the summation order can
    # differ (measured: bit-identical on this machine).
    one, two = losses(folder / "one"), losses(folder / "two")
    assert len(one) == STEPS and one[0] != one[-1]
    assert two == pytest.approx(one, rel=1e-6, abs=0)
    weights_one = load_file(folder / "one" / "model.safetensors")
    weights_two = load_file(folder / "two" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for key, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[key], tensor, rtol=0, atol=1e-5, msg=key)


def test_a_global_batch_the_processes_cannot_split_is_refused(tmp_path, monkeypatch, capsys):
    with pytest.raises(TrainingSetupError, match=r"global batch 6 is not a multiple of the per-device batch 4 x 1"):
        training_arguments(tmp_path, "pretrain", "phi3", global_batch_size=6)
    with pytest.raises(TrainingSetupError, match=r"global batch 2 is not a multiple of .* 4 x 1 process = 4"):
        training_arguments(tmp_path, "pretrain", "phi3", global_batch_size=2)  # used to train at batch 4
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun (the refusals come before any process group)
    with pytest.raises(TrainingSetupError, match=r"per-device batch 2 x 2 processes = 4"):
        training_arguments(tmp_path, "pretrain", "phi3", global_batch_size=6, per_device_train_batch_size=2)
    with pytest.raises(TrainingSetupError, match=r"world_size=4, but 2 processes were launched"):
        training_arguments(tmp_path, "pretrain", "phi3", global_batch_size=16, world_size=4)
    monkeypatch.delenv("WORLD_SIZE")
    tiny_config("phi3").save_pretrained(tmp_path / "config")
    code = main(["train", "--stage", "pretrain", "--config", str(tmp_path / "config"), "--data", "x.json",
                 "--output-dir", str(tmp_path / "o"), "--global-batch-size", "6"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: The global batch 6") and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.accelerator.is_available(), reason="the CPU refusals")
@pytest.mark.parametrize("option, value, message", [
    ("--fsdp", "full_shard auto_wrap", r"error: FSDP \(--fsdp\) needs GPUs: accelerate runs FSDP on GPUs only"),
    ("--deepspeed", "zero2.json", r"error: DeepSpeed \(--deepspeed\) needs GPUs"),
])  # fmt: skip
def test_sharding_on_the_cpu_is_refused(tmp_path, capsys, option, value, message):
    tiny_config("phi3").save_pretrained(tmp_path / "config")
    code = main(["train", "--stage", "pretrain", "--config", str(tmp_path / "config"), "--data", "x.json",
                 "--output-dir", str(tmp_path / "o"), "--global-batch-size", "4", option, value])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert re.match(message, err)
    assert not (tmp_path / "o").exists()


def test_processes_that_do_not_form_one_group_are_refused(fresh_phi3, data_folder, tmp_path, monkeypatch):
    model, processor = fresh_phi3
    folder, samples = data_folder
    args = training_arguments(tmp_path / "o", "pretrain", "phi3", global_batch_size=4)
    assert args.world_size == 1  # the devices are set up (as TrainingArguments made without use_cpu under torchrun)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainingSetupError, match=r"2 processes were launched \(WORLD_SIZE=2\) but they do not form"):
        train(model, processor, samples, stage="pretrain", args=args, image_folder=folder)
    assert not (tmp_path / "o").exists()


def test_sharding_accelerate_did_not_engage_is_refused(monkeypatch):
    # what accelerate does with FSDP on the CPU under torchrun (use_cpu=True given by hand): plain DDP, no error
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = SimpleNamespace(fsdp=True, fsdp_config={"reshard_after_forward": True}, deepspeed=None)
    trainer = SimpleNamespace(args=args, is_fsdp_enabled=False, is_deepspeed_enabled=False,
                              accelerator=SimpleNamespace(distributed_type="MULTI_CPU"))  # fmt: skip
    with pytest.raises(TrainingSetupError, match=r"FSDP \(fsdp_config \{'reshard_after_forward': True\}\) did not "
                                                 r"engage on this setup \(MULTI_CPU, 2"):  # fmt: skip
        check_sharding(trainer)
    trainer.args.fsdp, trainer.args.deepspeed = False, "zero2.json"
    with pytest.raises(TrainingSetupError, match=r"DeepSpeed \(zero2.json\) did not engage"):
        check_sharding(trainer)
    trainer.args.deepspeed = None
    check_sharding(trainer)


@pytest.mark.parametrize("options, config", [
    ("full_shard auto_wrap", {"reshard_after_forward": True}),
    ("shard_grad_op offload", {"reshard_after_forward": False, "cpu_offload": True}),
])  # fmt: skip
def test_fsdp_words_become_fsdp_config_without_transformers_deprecated_string(options, config, tmp_path):
    # The mapping is transformers' own reading of the legacy words (TrainingArguments._apply_legacy_fsdp_to_config,
    # FSDP2); the conftest guard fails the test if TrainingArguments logs a deprecation.
    assert fsdp_arguments(options) == {"fsdp": True, "fsdp_config": config}
    args = TrainingArguments(output_dir=str(tmp_path), **fsdp_arguments(options))
    assert args.fsdp is True and {k: args.fsdp_config[k] for k in config} == config


@pytest.mark.parametrize("options, problem", [("full_shard zero3", "expected some of full_shard"), ("", "expected"),
                                              ("full_shard shard_grad_op", "exclude each other")])  # fmt: skip
def test_unknown_fsdp_words_are_refused(options, problem):
    with pytest.raises(TrainingSetupError, match=problem):
        fsdp_arguments(options)
