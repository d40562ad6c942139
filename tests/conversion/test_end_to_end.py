"""The README's main job as a user runs it: make-fixture -> convert (verified) -> trust_remote_code -> pipeline, in
processes where florence_vl_hf cannot be imported; and the model card's usage code, run as written."""

import json
import re

import pytest

from florence_vl_hf.cli import main
from florence_vl_hf.conversion.card import EXAMPLE_IMAGE
from florence_vl_hf.isolation import run_without_package
from florence_vl_hf.processing import asset_dir

SHAPES = asset_dir("phi-3.5-mini-instruct").parent / "shapes.png"
PIPELINE = """
import json
from transformers import pipeline
pipe = pipeline("image-text-to-text", model={folder!r}, trust_remote_code=True, dtype="float32")
messages = [{{"role": "user", "content": [{{"type": "image", "url": {image!r}}},
                                         {{"type": "text", "text": {question!r}}}]}}]
out = pipe(text=messages, max_new_tokens=6, generate_kwargs={{"do_sample": False}})
print(json.dumps({{"module": type(pipe.model).__module__, "answer": out[0]["generated_text"][-1]["content"]}}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("llm", ["phi3", "llama3"])
def test_fixture_convert_and_pipeline_through_trust_remote_code(llm, tmp_path, capsys):
    source, output = tmp_path / "original", tmp_path / "converted"
    assert main(["make-fixture", str(source), "--llm", llm]) == 0
    assert main(["convert", str(source), str(output), "--repo-id", f"me/florence-vl-{llm}"]) == 0
    printed = capsys.readouterr().out
    assert "verification: max abs diff image features 0, logits 0" in printed and "PASSED" in printed
    report = json.loads((output / "conversion_report.json").read_text())

    reply = json.loads(run_without_package(PIPELINE.format(folder=str(output), image=str(SHAPES),
                                                             question=report["verification"]["question"])).stdout.splitlines()[-1])
    assert reply["module"].startswith("transformers_modules.")
    # On the verification's image and question, greedy decoding through the remote-code pipeline (in float32, the
    # verification's dtype) reproduces the verified tokens.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(output))
    verified = report["verification"]["greedy_tokens"][:6]
    expected = tokenizer.decode(verified, skip_special_tokens=True)
    assert reply["answer"].strip() == expected.strip()


@pytest.mark.slow
def test_model_card_usage_code_runs_as_written(converted):
    folder, _ = converted["phi3"]
    text = (folder / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2
    for code in blocks:
        assert '"someone/florence-vl-phi3"' in code and EXAMPLE_IMAGE in code
        # Only the two things a machine without network must swap: the Hub id for the folder, the URL for a file.
        local = code.replace('"someone/florence-vl-phi3"', repr(str(folder))).replace(EXAMPLE_IMAGE, str(SHAPES))
        local = local.replace("max_new_tokens=64", "max_new_tokens=4")
        result = run_without_package(local)
        assert result.stdout.strip() != ""


def test_cli_reports_conversion_errors_without_a_traceback(tmp_path, capsys):
    assert main(["make-fixture", str(tmp_path / "src"), "--shards", "1"]) == 0
    (tmp_path / "src" / "model.safetensors").write_bytes(b"\x00" * 16)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "error: Cannot read" in err and "model.safetensors" in err and "nothing was written" in err
    assert not (tmp_path / "out").exists()
    assert main(["make-fixture", str(tmp_path / "src")]) == 1  # non-empty without --overwrite
    assert "not empty" in capsys.readouterr().err
