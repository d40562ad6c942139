"""Broken sources fail with a message naming the problem, and leave nothing at OUTPUT_DIR (nor a staging folder)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from florence_vl_hf.conversion import ConversionError, VerificationError, convert_checkpoint, make_fixture
from florence_vl_hf.conversion import convert as convert_module
from florence_vl_hf.conversion.keys import Mapped


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    return make_fixture(root / "src", "phi3", seed=5, shards=2), make_fixture(root / "src-bin", "llama", seed=6,
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
