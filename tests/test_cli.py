import json

import pytest

from florence_vl_hf.cli import main


@pytest.mark.slow
def test_demo_converts_a_fixture_reloads_remotely_and_answers(tmp_path, capsys):
    output = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(output), "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    original = json.loads((output / "original" / "config.json").read_text())
    assert original["model_type"] == "llava_phi"  # the source is in the original layout
    config = json.loads((output / "converted" / "config.json").read_text())
    assert config["model_type"] == "florence_vl"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
    report = json.loads((output / "converted" / "conversion_report.json").read_text())
    assert report["verification"]["passed"]
    assert "trust_remote_code=True in a process where florence_vl_hf cannot be imported" in printed
    assert "transformers_modules." in printed  # the class really came from the saved folder
    assert "-> '" in printed and "PASSED" in printed


def test_demo_refuses_a_non_empty_output_dir(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("precious")
    assert main(["demo", "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --output-dir {tmp_path.resolve()} is not empty (use --overwrite to replace it)"]
    assert (tmp_path / "keep.txt").read_text() == "precious"
