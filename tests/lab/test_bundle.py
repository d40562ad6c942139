import json

import pytest
import torch
from micro_recipe import MICRO
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from florence_vl_hf.cli import main
from florence_vl_hf.lab.bundle import MODEL_FILES, PAYLOAD_FILES, bundle_tiny, different_tensors, payload_sources
from florence_vl_hf.lab.shapes_recipe import TinyRecipe, train_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("micro")
    train_tiny(folder / "model", folder / "work", TinyRecipe(**MICRO))
    return folder / "model"


def test_the_bundle_loads_with_the_auto_classes_and_holds_the_trained_weights(trained, tmp_path):
    target = bundle_tiny(trained, tmp_path / "package" / "florence_vl_tiny", hardware="a test machine")
    assert sorted(p.name for p in (tmp_path / "package").iterdir()) == ["florence_vl_tiny"]
    names = {p.name for p in target.iterdir()}
    assert names == {*MODEL_FILES, *PAYLOAD_FILES, "README.md", "LICENSE-phi-3.5-tokenizer",
                     "NOTICE-phi-3.5-tokenizer.md"}
    for name, source in payload_sources().items():  # copies of the package's current sources, outside the package
        assert not (target / name).is_symlink() and (target / name).read_bytes() == source.read_bytes()
    auto_map = json.loads((target / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
    assert different_tensors(trained, target) == []
    model = AutoModelForImageTextToText.from_pretrained(target)
    saved = AutoModelForImageTextToText.from_pretrained(trained)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
    assert AutoProcessor.from_pretrained(target).tokenizer.vocab_size == 32000
    report = json.loads((trained / "training_report.json").read_text())
    card = (target / "README.md").read_text()
    assert f"**{100 * report['evaluation']['accuracy']:.1f}%** overall" in card and "a test machine" in card
    for kind, entry in report["evaluation"]["per_type"].items():
        assert f"| {kind} | {100 * entry['accuracy']:.1f}% | {entry['total']} |" in card

    # Bundling again replaces the folder whole; a changed tensor is found by the check.
    bundle_tiny(trained, target)
    assert sorted(p.name for p in (tmp_path / "package").iterdir()) == ["florence_vl_tiny"]
    weights = load_file(target / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    assert different_tensors(trained, target) == [name]


def test_bundle_refuses_what_it_must_not_ship(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="training_report.json missing"):
        bundle_tiny(trained.parent / "work", tmp_path / "target")
    weights = load_file(trained / "model.safetensors")
    for dtype, error in ((torch.float32, "over the 25000000 budget"), (torch.float16, r"\['F16'\].* ships bf16")):
        other = tmp_path / str(dtype)
        other.mkdir()
        for name in MODEL_FILES:
            (other / name).write_bytes((trained / name).read_bytes())
        save_file({k: v.to(dtype) for k, v in weights.items()}, other / "model.safetensors")
        with pytest.raises(ValueError, match=error):
            bundle_tiny(other, tmp_path / "target")
    assert not (tmp_path / "target").exists() and not list(tmp_path.glob(".target.staging-*"))


def test_bundle_tiny_command_bundles_and_checks(trained, tmp_path, capsys):
    target = tmp_path / "florence_vl_tiny"
    assert main(["bundle-tiny", str(trained), "--target", str(target)]) == 0
    assert main(["bundle-tiny", str(trained), "--target", str(target), "--check"]) == 0
    assert "0 tensors differ" in capsys.readouterr().out
    other = tmp_path / "other"
    train_tiny(other, tmp_path / "work", TinyRecipe(**{**MICRO, "seed": 1}))
    assert main(["bundle-tiny", str(other), "--target", str(target), "--check"]) == 1
    assert "tensors differ" in capsys.readouterr().out
