"""Broken sources fail with a message naming the problem, and leave nothing at OUTPUT_DIR (nor a staging folder)."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from florence_vl_hf.conversion import ConversionError, PushError, VerificationError, convert_checkpoint
from florence_vl_hf.lab.fixture import make_fixture
from florence_vl_hf.conversion import convert as convert_module
from florence_vl_hf.conversion.hub import REPORT_NAME, foreign_auto_map_entries, push_folder
from florence_vl_hf.conversion.keys import Mapped


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    return make_fixture(root / "src", "phi3", seed=5, shards=2), make_fixture(root / "src-bin", "llama3", seed=6,
                                                                                weights_format="bin", shards=1)


@pytest.fixture
def source(pristine, tmp_path):
    return shutil.copytree(pristine[0], tmp_path / "src")


def shard_holding(folder, key):
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return folder / weight_map[key]


def edit_shard(folder, key, edit):
    """Apply `edit(tensors)` to the shard holding `key` and keep the index consistent."""
    path = shard_holding(folder, key)
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != path.name or k in tensors}
    index["weight_map"].update({k: path.name for k in tensors})
    index_path.write_text(json.dumps(index))


def assert_fails_cleanly(source, tmp_path, match, error=ConversionError):
    output = tmp_path / "out"
    with pytest.raises(error, match=match):
        convert_checkpoint(source, output, log=quiet)
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_tensor(source, tmp_path):
    edit_shard(source, "model.layers.1.mlp.down_proj.weight", lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    assert_fails_cleanly(source, tmp_path, r"lacks 1 tensors .*model\.language_model\.layers\.1\.mlp\.down_proj\.weight")


def test_unknown_extra_tensor(source, tmp_path):
    edit_shard(source, "model.norm.weight", lambda t: t.update({"model.mm_projector.extra.weight": torch.ones(2)}))
    assert_fails_cleanly(source, tmp_path, r"Unknown tensor 'model\.mm_projector\.extra\.weight'")


def test_extra_tensor_without_a_place_in_the_model(source, tmp_path):
    extra = "model.vision_tower.vision_tower.vision_tower.convs.7.proj.weight"  # a 3rd DaViT stage the config lacks
    edit_shard(source, "model.norm.weight", lambda t: t.update({extra: torch.ones(2)}))
    assert_fails_cleanly(source, tmp_path, r"no place in the Florence-VL model.*convs\.7\.proj\.weight")


def test_wrong_shape(source, tmp_path):
    key = "model.mm_projector.encoder_mlp.2.1.weight"
    edit_shard(source, key, lambda t: t.update({key: t[key][:, :-1].clone()}))
    assert_fails_cleanly(source, tmp_path, r"Shape mismatch for 'model\.mm_projector\.encoder_mlp\.2\.1\.weight'.*\(64, 63\)")


def test_truncated_safetensors_shard(source, tmp_path):
    path = shard_holding(source, "model.norm.weight")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_fails_cleanly(source, tmp_path, rf"Cannot read .*{path.name} \(truncated or corrupted\?\)")


def test_truncated_bin_file(pristine, tmp_path):
    source = shutil.copytree(pristine[1], tmp_path / "src")
    path = source / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:-4096])
    assert_fails_cleanly(source, tmp_path, r"Cannot read .*pytorch_model\.bin \(truncated or corrupted\?\)")


def test_index_listing_a_tensor_its_shard_lacks(source, tmp_path):
    index_path = source / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.ghost.weight"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    assert_fails_cleanly(source, tmp_path, r"lists \['model\.layers\.0\.ghost\.weight'\]")


def test_vision_weights_that_disagree(source, tmp_path):
    path = source / "vision_tower" / "pytorch_model.bin"
    tensors = torch.load(path, weights_only=True)
    tensors["image_proj_norm.weight"] = tensors["image_proj_norm.weight"] + 0.5
    torch.save(tensors, path)
    assert_fails_cleanly(
        source, tmp_path,
        r"vision_tower:pytorch_model\.bin:image_proj_norm\.weight and main:.*image_proj_norm\.weight .*differ \(max abs difference 0\.5",
    )  # fmt: skip


def test_a_pickle_that_is_not_weights_only_is_refused(source, tmp_path):
    path = source / "vision_tower" / "pytorch_model.bin"
    torch.save({"image_proj_norm.weight": torch.ones(2), "payload": shutil.rmtree}, path)  # arbitrary object
    assert_fails_cleanly(source, tmp_path, r"Cannot read .*vision_tower/pytorch_model\.bin")


def test_unsupported_llava_settings(source, tmp_path):
    config = json.loads((source / "config.json").read_text())
    config["mm_patch_merge_type"] = "spatial_unpad"
    (source / "config.json").write_text(json.dumps(config))
    assert_fails_cleanly(source, tmp_path, "mm_patch_merge_type='spatial_unpad'")


def test_verification_catches_a_mapping_error(source, tmp_path, monkeypatch):
    """If the converter forgot to transpose image_projection (square in the tiny config, so shapes agree), the
    independent reference disagrees and the conversion fails."""
    for name in ("llava_to_florence_vl", "florence2_to_florence_vl"):
        original = getattr(convert_module, name)

        def forgetful(key, original=original):
            mapped = original(key)
            return Mapped(mapped.target, False, mapped.dropped)

        monkeypatch.setattr(convert_module, name, forgetful)
    assert_fails_cleanly(source, tmp_path, "does not match the source", error=VerificationError)


def test_a_failed_overwrite_keeps_the_previous_output(source, pristine, tmp_path):
    output = tmp_path / "out"
    convert_checkpoint(pristine[0], output, verify=False, log=quiet)
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    edit_shard(source, "model.norm.weight", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ConversionError, match="model.language_model.norm.weight"):
        convert_checkpoint(source, output, overwrite=True, log=quiet)
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_missing_im_patch_setting_takes_the_original_loaders_default(source, tmp_path):
    """builder.py: getattr(config, "mm_use_im_patch_token", True) adds an <im_patch> token, a different vocabulary."""
    config = json.loads((source / "config.json").read_text())
    del config["mm_use_im_patch_token"]
    (source / "config.json").write_text(json.dumps(config))
    assert_fails_cleanly(source, tmp_path, r"mm_use_im_patch_token=True \(its default\)")


def test_legacy_non_zip_bin_files_are_read_without_mmap(source, tmp_path):
    path = source / "vision_tower" / "pytorch_model.bin"
    torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
    report = convert_checkpoint(source, tmp_path / "out", log=quiet)
    assert report["verification"]["passed"] and report["tensors"]["checked_duplicates"] > 0


# ---- stored dtypes and values --------------------------------------------------------------------------------------


def retag(path, key, dtype):
    """Rewrite the safetensors header so that `key` declares `dtype` (same byte size): the data is reinterpreted."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    header[key]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    path.write_bytes(raw[:8] + text.ljust(length, b" ") + raw[8 + length :])


def test_a_float_weight_whose_header_declares_integers_is_refused(source, tmp_path):
    key = "model.layers.0.mlp.down_proj.weight"
    retag(shard_holding(source, key), key, "I16")
    assert_fails_cleanly(source, tmp_path, rf"main:model-\d+-of-\d+\.safetensors:{re.escape(key)} is stored as "
                                           r"torch\.int16; the model's .* is a floating-point weight")  # fmt: skip


def test_one_tensor_whose_header_declares_another_float_type_is_refused(source, tmp_path):
    key = "model.layers.1.self_attn.o_proj.weight"
    retag(shard_holding(source, key), key, "F16")  # bf16 bits read as fp16: finite, wrong numbers
    assert_fails_cleanly(source, tmp_path, rf"1 tensors of the main weights are stored in another dtype than the "
                                           rf"other \d+ \(torch\.bfloat16\).*{re.escape(key)} \(torch\.float16\)")  # fmt: skip


@pytest.mark.parametrize("value, counts", [(float("nan"), "1 non-finite values of .* \\(1 NaN, 0 Inf\\)"),
                                           (float("inf"), "1 non-finite values of .* \\(0 NaN, 1 Inf\\)")])  # fmt: skip
def test_a_non_finite_value_in_a_row_no_prompt_reads_is_refused_by_name(source, tmp_path, value, counts):
    key = "model.embed_tokens.weight"

    def poison(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][-1, 0] = value  # the last vocabulary row: the verification prompt never looks it up

    edit_shard(source, key, poison)
    assert_fails_cleanly(source, tmp_path, rf"main:.*:{re.escape(key)} has {counts}")


def test_a_fully_nan_tensor_is_named_not_reported_as_a_logits_mismatch(source, tmp_path):
    key = "model.mm_projector.encoder_mlp.2.1.weight"
    edit_shard(source, key, lambda t: t.update({key: torch.full_like(t[key], float("nan"))}))
    assert_fails_cleanly(source, tmp_path, rf"{re.escape(key)} has 4,096 non-finite values of 4,096 \(4,096 NaN")


def test_values_the_output_dtype_cannot_hold_are_refused(pristine, tmp_path):
    source = shutil.copytree(pristine[0], tmp_path / "src")
    key = "model.norm.weight"
    edit_shard(source, key, lambda t: t.update({key: torch.full_like(t[key], 1e30)}))  # fine in bf16, inf in fp16
    output = tmp_path / "out"
    with pytest.raises(ConversionError, match=rf"{re.escape(key)} cast to torch\.float16 has 64 non-finite"):
        convert_checkpoint(source, output, dtype="float16", verify=False, log=quiet)
    assert not output.exists()


# ---- configs and other JSON files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, content", [("config.json", "[]"), ("vision_tower/config.json", "null"),
                                           ("model.safetensors.index.json", '"weights"'),
                                           ("tokenizer_config.json", "[1, 2]"),
                                           ("vision_tower/preprocessor_config.json", "3")])  # fmt: skip
def test_json_files_that_hold_no_object_are_named(source, tmp_path, name, content):
    (source / name).write_text(content)
    kind = type(json.loads(content)).__name__
    assert_fails_cleanly(source, tmp_path, rf"{re.escape(str(source / name))} holds a JSON {kind}, not an object")


@pytest.mark.parametrize("file, edit, problem", [
    ("config.json", {"num_attention_heads": 0}, r"config\.json has num_attention_heads=0; expected a positive integer"),
    ("config.json", {"hidden_size": "64"}, r"config\.json has hidden_size='64'; expected a positive integer"),
    ("config.json", {"hidden_size": None}, r"config\.json has no 'hidden_size'"),
    ("config.json", {"num_attention_heads": 5}, r"config\.json has hidden_size=64, not a multiple of num_attention_heads=5"),
    ("config.json", {"rope_scaling": {"rope_type": "longrope"}}, r"config\.json: .*"),
    ("vision_tower/config.json", {"depths": [1]}, r"vision_tower/config\.json vision_config has depths with 1 entries; "
                                                  r"the other per-stage lists have 2"),
    ("vision_tower/config.json", {"window_size": -1}, r"vision_config has window_size=-1"),
    ("vision_tower/config.json", {"d_model": 0}, r"text_config has d_model=0"),
    ("vision_tower/preprocessor_config.json", {"size": {"height": 0, "width": 0}}, r"size .*expected a positive integer"),
])  # fmt: skip
def test_bad_config_values_are_named_with_their_file_and_key(source, tmp_path, file, edit, problem):
    path = source / file
    config = json.loads(path.read_text())
    holder = config
    if file == "vision_tower/config.json":
        holder = config["text_config"] if "d_model" in edit else config["vision_config"]
    for key, value in edit.items():
        if value is None:
            del holder[key]
        else:
            holder[key] = value
    path.write_text(json.dumps(config))
    assert_fails_cleanly(source, tmp_path, problem)


# ---- paths of the source --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/outside.safetensors", "sub/../../x.safetensors"])
def test_index_entries_outside_the_source_are_refused(source, tmp_path, name):
    shutil.copyfile(shard_holding(source, "model.norm.weight"), tmp_path / "outside.safetensors")
    index_path = source / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = name
    index_path.write_text(json.dumps(index))
    assert_fails_cleanly(source, tmp_path, rf"names the weight file '{re.escape(name)}', outside")


def test_a_vision_tower_symlink_loop_is_named(source, tmp_path):
    shutil.rmtree(source / "vision_tower")
    (source / "vision_tower").symlink_to(source / "vision_tower")
    assert_fails_cleanly(source, tmp_path, r"vision_tower is a symlink that cannot be followed: Too many levels")


def test_a_fifo_in_place_of_config_json_is_refused_without_blocking(source, tmp_path):
    (source / "config.json").unlink()
    os.mkfifo(source / "config.json")
    signal.alarm(60)  # a regression would block on open() forever
    try:
        assert_fails_cleanly(source, tmp_path, r"config\.json is not a regular file \(a FIFO")
    finally:
        signal.alarm(0)


# ---- published folders carry only the package's remote code -------------------------------------------------------


def test_the_source_tokenizer_s_auto_map_is_not_carried_into_the_output(source, tmp_path):
    settings = json.loads((source / "tokenizer_config.json").read_text())
    settings["auto_map"] = {"AutoTokenizer": ["someone/repo--tokenization_x.XTokenizer", None]}
    (source / "tokenizer_config.json").write_text(json.dumps(settings))
    output = tmp_path / "out"
    convert_checkpoint(source, output, verify=False, log=quiet)
    saved = json.loads((output / "tokenizer_config.json").read_text())
    assert saved["auto_map"] == {"AutoProcessor": "processing_florence_vl.FlorenceVLProcessor"}
    assert foreign_auto_map_entries(output) == []
    assert "tokenization_x" not in "".join(p.read_text() for p in output.glob("*.json"))


def test_auto_map_entries_the_package_did_not_write_are_found_and_not_pushed(pristine, tmp_path):
    output = tmp_path / "out"
    convert_checkpoint(pristine[0], output, verify=False, log=quiet)
    config = json.loads((output / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "other/repo--modeling_x.X"
    (output / "config.json").write_text(json.dumps(config))
    (output / "processor_config.json").write_text(json.dumps({"auto_map": {"AutoProcessor": "processing_x.P"}}))
    assert foreign_auto_map_entries(output) == [
        "config.json: AutoModelForCausalLM -> 'other/repo--modeling_x.X'",
        "processor_config.json: AutoProcessor -> 'processing_x.P'",
    ]
    (output / REPORT_NAME).write_text(json.dumps({"verification": {"passed": True}}))
    with pytest.raises(PushError, match=r"auto_map entries naming code the package did not write"):
        push_folder(output, "tester/florence-vl", endpoint="http://127.0.0.1:9", token="x")


# ---- OUTPUT_DIR ------------------------------------------------------------------------------------------------------


def test_an_output_dir_under_a_file_is_named(pristine, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConversionError, match=rf"Cannot create OUTPUT_DIR under {re.escape(str(tmp_path / 'file'))}: "
                                              "it is a file"):  # fmt: skip
        convert_checkpoint(pristine[0], tmp_path / "file" / "a" / "out", verify=False, log=quiet)


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "No space left on device"),
                                         (errno.EROFS, "Read-only file system")])  # fmt: skip
def test_write_faults_are_named_and_leave_no_folder_behind(pristine, tmp_path, monkeypatch, code, words):
    def fail(self, folder, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(Path(folder) / "model.safetensors"))

    monkeypatch.setattr(convert_module.FlorenceVLForConditionalGeneration, "save_pretrained", fail)
    output = tmp_path / "new" / "parents" / "out"
    with pytest.raises(ConversionError, match=rf"Cannot write OUTPUT_DIR {re.escape(str(output))}: {words}"):
        convert_checkpoint(pristine[0], output, verify=False, log=quiet)
    assert list(tmp_path.iterdir()) == []  # neither staging nor the parents this run created


def test_a_long_valid_output_name_converts(pristine, tmp_path):
    output = tmp_path / ("m" * 250)
    convert_checkpoint(pristine[0], output, verify=False, log=quiet)
    assert (output / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [output.name]


def test_staging_folders_of_dead_runs_are_removed_by_the_next_run(pristine, tmp_path):
    child = subprocess.Popen(["true"])
    child.wait()  # its pid is now free: a run with that pid died
    output = tmp_path / "out"
    stale = tmp_path / f".out.partial-{child.pid}-0123abcd"
    retired = tmp_path / f".out.old-{child.pid}-4567cdef"
    alive = tmp_path / f".out.partial-{os.getpid()}-89abcdef"  # a live run into the same folder
    other = tmp_path / f".other.partial-{child.pid}-0123abcd"
    for folder in (stale, retired, alive, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 100)
    messages = []
    convert_checkpoint(pristine[0], output, verify=False, log=messages.append)
    assert not stale.exists() and not retired.exists()
    assert alive.exists() and other.exists()
    assert f"removed {stale.name}, left next to out by a run that died (pid {child.pid})" in messages


def test_the_staging_folder_of_a_killed_conversion_is_removed_by_the_next_run(pristine, tmp_path):
    output = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "florence_vl_hf.cli", "convert", str(pristine[0]), str(output)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".out.partial-*")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    (staging,) = tmp_path.glob(".out.partial-*")  # found before the conversion could finish (it verifies)
    assert staging.name.startswith(f".out.partial-{process.pid}-") and not output.exists()
    messages = []
    convert_checkpoint(pristine[0], output, verify=False, log=messages.append)
    assert not staging.exists() and (output / "config.json").is_file()
    assert any(m.startswith(f"removed {staging.name}") for m in messages)
