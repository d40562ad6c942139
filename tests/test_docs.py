"""The Python blocks of the README and of every page in docs/ run as written, offline: only Hub repo ids are swapped
for local folders. The relative links between the pages resolve.

Each page's blocks run in order in one namespace of the page's own, as a reader pasting that page into a fresh
session would (so a page builds or loads every model it uses), in a temporary working directory that holds the
reader's own files the pages name: `sign.jpg` and a ShapesVQA split in `shapes/`.
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
from florence_vl_hf.lab.shapes import make_shapes_data
from florence_vl_hf.processing import asset_dir
from florence_vl_hf.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
LINKED_PAGES = [*PAGES, ROOT / "benchmarks" / "README.md"]  # pages whose relative links must resolve
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
FENCED_BLOCK = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+)$", re.MULTILINE)
# The Hub repositories the blocks name, and which local stand-in each gets (built by `hub_stand_ins`).
HUB_IDS = {
    "microsoft/Florence-2-large-ft": "florence2",
    "microsoft/Phi-3.5-mini-instruct": "phi3",
    "jiuhai/florence-vl-3b-sft": "original",
}
# Quoted "a/b" strings of the blocks that are paths in the reader's working directory, not Hub ids.
READER_PATHS = {"shapes/instructions.json"}
CHAT_SERVER_URL = '"http://localhost:8000/v1"'


def page_name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block of a page."""
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in PYTHON_BLOCK.finditer(text)]


PAGES_WITH_CODE = [page for page in PAGES if python_blocks(page)]


def all_blocks() -> list[tuple[str, int, str]]:
    return [(page_name(page), line, code) for page in PAGES for line, code in python_blocks(page)]


def with_local_folders(code: str, folders: dict[str, Path]) -> str:
    for hub_id, name in HUB_IDS.items():
        code = code.replace(f'"{hub_id}"', repr(str(folders[name])))
    return code


def test_every_block_is_valid_python_and_every_hub_id_has_a_stand_in():
    blocks = all_blocks()
    assert len(blocks) >= 5
    assert python_blocks(README), "the README has no usage example"
    for name, line, code in blocks:
        compile(code, f"{name}:{line}", "exec")
    named = set(re.findall(r'"([\w.-]+/[\w.-]+)"', "".join(code for _, _, code in blocks)))
    assert set(HUB_IDS) <= named, f"HUB_IDS names repos the pages no longer use: {set(HUB_IDS) - named}"
    assert named - set(HUB_IDS) <= READER_PATHS, f"Hub ids without a stand-in: {named - set(HUB_IDS) - READER_PATHS}"


def test_the_readme_keeps_the_quick_start_and_the_set_up():
    """.ci/run and scripts/lock.sh refer to the README's test command and its locked set-up."""
    text = README.read_text(encoding="utf-8")
    assert "## Quick start (two commands, fresh machine)" in text
    for needed in ("bash scripts/demo.sh", "bash scripts/test.sh", "requirements-lock.txt", "bash scripts/lock.sh",
                   "pip install -c requirements-lock.txt -e ."):  # fmt: skip
        assert needed in text, needed


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation other than - and _ dropped, spaces as -."""
    text = FENCED_BLOCK.sub("", page.read_text(encoding="utf-8"))
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in HEADING.findall(text)}


def relative_links(page: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCED_BLOCK.sub("", page.read_text(encoding="utf-8")))
    return [target for target in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def test_heading_anchors_follow_github():
    assert heading_anchors(DOCS / "usage.md") >= {"processor-florencevlprocessor", "bf16-and-int8-on-cpu"}


@pytest.mark.parametrize("page", LINKED_PAGES, ids=page_name)
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
            broken.append(f"{target}: no heading #{anchor}")
    assert broken == []


def test_the_index_lists_every_page():
    listed = {(DOCS / target.partition("#")[0]).resolve() for target in relative_links(DOCS / "index.md")}
    assert set(PAGES) - {README, DOCS / "index.md"} <= listed
    assert DOCS / "index.md" in {(ROOT / target).resolve() for target in relative_links(README)}


@pytest.fixture(scope="module")
def hub_stand_ins(tmp_path_factory):
    """Local folders in the layouts of the Hub repos: an original-layout checkpoint (whose vision_tower/ is a
    Microsoft-layout Florence-2, as microsoft/Florence-2-large-ft is) and a Phi-3-shaped causal LM with its tokenizer."""
    hub = tmp_path_factory.mktemp("hub")
    original = make_fixture(hub / "florence-vl-3b-sft", "phi3")
    text_config = tiny_config("phi3").text_config
    text_config.vocab_size = 32064
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(text_config).save_pretrained(hub / "phi3")
    AutoTokenizer.from_pretrained(str(asset_dir("phi-3.5-mini-instruct"))).save_pretrained(hub / "phi3")
    return {"original": original, "florence2": original / "vision_tower", "phi3": hub / "phi3"}


@pytest.fixture(scope="module")
def chat_server():
    """`florence-vl serve` in this process (the bundled florence-vl-tiny as "florence-vl-3b") on a free port: the
    client blocks talk to it instead of localhost:8000."""
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


# What each page's blocks leave behind is what the page says they make: (namespace, working directory) -> None.
def _check_readme(namespace, work):
    assert namespace["pipe"].model.__class__.__name__ == "FlorenceVLForConditionalGeneration"
    assert namespace["reply"].strip() == "square"  # the answer the README's comment gives for the last question


def _check_usage(namespace, work):
    assert namespace["model"].__class__.__name__ == "FlorenceVLForConditionalGeneration"
    assert (work / "tiny-int8" / "config.json").is_file()
    assert namespace["out"].shape[0] == 1


def _check_conversion(namespace, work):
    assert (work / "florence-vl-3b-sft-hf" / "model.safetensors").is_file()
    assert namespace["report"] is not None


def _check_training(namespace, work):
    assert (work / "stage2" / "config.json").is_file()
    assert namespace["result"].metrics["train_loss"] > 0 and namespace["result"].skipped == {}


def _check_serving(namespace, work):
    assert namespace["reply"].choices[0].finish_reason in ("stop", "length")


CHECKS = {
    "README.md": _check_readme,
    "docs/usage.md": _check_usage,
    "docs/conversion.md": _check_conversion,
    "docs/training.md": _check_training,
    "docs/serving.md": _check_serving,
}


def test_every_checked_page_has_python_blocks():
    assert set(CHECKS) <= {page_name(page) for page in PAGES_WITH_CODE}


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=page_name)
def test_page_blocks_run_as_written(page, hub_stand_ins, request, tmp_path, monkeypatch, shapes_image):
    work = tmp_path / "reader"
    work.mkdir()
    monkeypatch.chdir(work)
    shapes_image.save("sign.jpg")
    make_shapes_data("shapes", num_images=2, seed=0)
    blocks = python_blocks(page)
    server_url = request.getfixturevalue("chat_server") if any(CHAT_SERVER_URL in code for _, code in blocks) else None
    namespace = {"__name__": "__docs__"}
    for line, code in blocks:
        code = with_local_folders(code, hub_stand_ins)
        if server_url is not None:
            code = code.replace(CHAT_SERVER_URL, repr(server_url))
        exec(compile(code, f"{page_name(page)}:{line}", "exec"), namespace)
    check = CHECKS.get(page_name(page))
    if check is not None:
        check(namespace, work)
