"""The README's Python snippets run as written, offline: only Hub repo ids are swapped for local folders.

The snippets run in order in one namespace, as a reader pasting them into one session would (the training snippet
trains the model that `from_pretrained_parts` built), in a temporary working directory that holds the reader's own
files the README names: `sign.jpg` and a ShapesVQA split in `shapes/`.
"""

import re
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from florence_vl_hf.lab.fixture import make_fixture
from florence_vl_hf.processing import asset_dir
from florence_vl_hf.lab.shapes import make_shapes_data
from florence_vl_hf.tiny import tiny_config

README = Path(__file__).resolve().parents[1] / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
# The Hub repositories the snippets name, and which local stand-in each gets (built by `hub_stand_ins`).
HUB_IDS = {
    "microsoft/Florence-2-large-ft": "florence2",
    "microsoft/Phi-3.5-mini-instruct": "phi3",
    "jiuhai/florence-vl-3b-sft": "original",
}


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block of the README."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in PYTHON_BLOCK.finditer(text)]


def with_local_folders(code: str, folders: dict[str, Path]) -> str:
    for hub_id, name in HUB_IDS.items():
        code = code.replace(f'"{hub_id}"', repr(str(folders[name])))
    return code


def test_every_snippet_is_valid_python_and_every_hub_id_has_a_stand_in():
    blocks = python_blocks()
    assert len(blocks) >= 5
    for line, code in blocks:
        compile(code, f"README.md:{line}", "exec")
    named = set(re.findall(r'"([\w.-]+/[\w.-]+)"', "".join(code for _, code in blocks)))
    assert set(HUB_IDS) <= named, f"HUB_IDS names repos the README no longer uses: {set(HUB_IDS) - named}"


@pytest.fixture
def hub_stand_ins(tmp_path):
    """Local folders in the layouts of the Hub repos: an original-layout checkpoint (whose vision_tower/ is a
    Microsoft-layout Florence-2, as microsoft/Florence-2-large-ft is) and a Phi-3-shaped causal LM with its tokenizer."""
    original = make_fixture(tmp_path / "hub" / "florence-vl-3b-sft", "phi3")
    text_config = tiny_config("phi3").text_config
    text_config.vocab_size = 32064
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(text_config).save_pretrained(tmp_path / "hub" / "phi3")
    AutoTokenizer.from_pretrained(str(asset_dir("phi-3.5-mini-instruct"))).save_pretrained(tmp_path / "hub" / "phi3")
    return {"original": original, "florence2": original / "vision_tower", "phi3": tmp_path / "hub" / "phi3"}


@pytest.fixture
def chat_server():
    """`florence-vl serve` in this process (the bundled florence-vl-tiny as "florence-vl-3b") on a free port: the
    README's client snippet talks to it instead of localhost:8000."""
    import uvicorn

    import florence_vl_hf
    from florence_vl_hf.serving import build_app, load_chat_server

    app = build_app(load_chat_server(str(florence_vl_hf.tiny_model_dir()), name="florence-vl-3b", dtype="float32"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server stopped while starting"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(10)


@pytest.mark.slow
def test_readme_snippets_run_as_written(hub_stand_ins, chat_server, tmp_path, monkeypatch, shapes_image):
    work = tmp_path / "reader"
    work.mkdir()
    monkeypatch.chdir(work)
    shapes_image.save("sign.jpg")
    make_shapes_data("shapes", num_images=2, seed=0)
    namespace = {"__name__": "__readme__"}
    for line, code in python_blocks():
        code = with_local_folders(code, hub_stand_ins).replace('"http://localhost:8000/v1"', repr(chat_server))
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    # What the snippets leave behind is what the README says they make.
    assert namespace["model"].__class__.__name__ == "FlorenceVLForConditionalGeneration"
    assert (work / "florence-vl-3b-sft-hf" / "model.safetensors").is_file()
    assert namespace["report"] is not None
    assert (work / "stage2" / "config.json").is_file()
    assert namespace["result"].metrics["train_loss"] > 0 and namespace["result"].skipped == {}
    assert namespace["reply"].choices[0].finish_reason in ("stop", "length")
