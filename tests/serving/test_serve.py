"""`florence-vl serve`: the OpenAI-compatible server as a real process on 127.0.0.1, driven by the `openai` client;
answers equal to the model's own `generate` on the processor's chat inputs. The request checks are also tested as
pure functions."""

import base64
import functools
import http.server
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import florence_vl_hf
from florence_vl_hf.build import build_random_model, save_hub_folder
from florence_vl_hf.serving import BadRequest, chat_from_messages, open_image
from florence_vl_hf.tiny import tiny_config

ASSETS = Path(florence_vl_hf.__file__).parent / "assets"
IMAGES = [ASSETS / "shapes_vqa_example.png", ASSETS / "shapes.png"]
NEW_TOKENS = 6


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text):
    return {"type": "text", "text": text}


# ---- the request checks, as pure functions ----


def test_chat_from_messages_converts_openai_parts_to_the_processor_format():
    chat, urls = chat_from_messages(
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [image_part("data:image/png;base64,AA=="), text_part("What is it?")]},
         {"role": "assistant", "content": None}],
        max_images=1,
    )  # fmt: skip
    assert chat == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": []},
    ]
    assert urls == ["data:image/png;base64,AA=="]


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        (["hello"], "messages[0] must be an object"),
        ([{"content": "hi"}], "messages[0] has no `role`"),
        ([{"role": "user", "content": 5}], "messages[0].content must be a string or a list"),
        (user({"type": "text"}), "messages[0].content[0] is a text part without a `text`"),
        (user({"type": "image_url", "image_url": {}}), "content[0] is an image part without an `image_url.url`"),
        (user({"type": "input_audio", "input_audio": {}}), "content[0] has type 'input_audio'"),
        (user(image_part("a.png"), image_part("b.png")), "the request has 2 images; this server takes at most 1"),
    ],
)
def test_chat_from_messages_names_the_problem(messages, problem):
    with pytest.raises(BadRequest, match=problem.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        chat_from_messages(messages, max_images=1)


def test_open_image_reads_data_urls_and_paths_and_names_what_is_wrong(tmp_path):
    expected = Image.open(IMAGES[0]).convert("RGB")
    for source in (data_url(IMAGES[0]), str(IMAGES[0]), f"file://{IMAGES[0]}"):
        assert open_image(source, 0).convert("RGB").tobytes() == expected.tobytes()
    (tmp_path / "text.png").write_text("not an image")
    refused = {
        "data:image/png;base64,AAAA": "image 0 could not be read: its data is not an image format",
        "data:image/png;base64,@@@": "image 0 could not be read: Error",
        "data:image/png,rawbytes": "must be base64-encoded",
        str(tmp_path / "missing.png"): "no such file",
        str(tmp_path / "text.png"): "not an image format",
        "http://127.0.0.1:9/image.png": "image 0 could not be fetched from 'http://127.0.0.1:9/image.png'",
    }
    for source, problem in refused.items():
        with pytest.raises(BadRequest, match=problem):
            open_image(source, 0)


# ---- a real server ----


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, folder, log_path, *extra):
        self.port = free_port()
        self.log_path = log_path
        self.process = subprocess.Popen(
            [sys.executable, "-m", "florence_vl_hf.cli", "serve", str(folder), "--served-model-name", "florence-vl",
             "--port", str(self.port), "--dtype", "float32", *extra],
            stdout=log_path.open("w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while True:
            assert self.process.poll() is None, log_path.read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up in 3 minutes"
                time.sleep(0.5)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0)

    def close(self):
        self.process.terminate()
        self.process.wait(30)


@pytest.fixture(scope="module")
def image_host():
    """The test images over http on 127.0.0.1 (the http(s) image URL path, without the internet)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(ASSETS))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module", params=["phi3", "llama3"])
def served(request, tmp_path_factory):
    """The bundled florence-vl-tiny (Phi-3.5) and a random tiny Llama-3.1 model, each served by `florence-vl serve`,
    with the model and processor loaded here for the references."""
    root = tmp_path_factory.mktemp(f"serve-{request.param}")
    if request.param == "phi3":
        folder = florence_vl_hf.tiny_model_dir()
    else:
        model, processor = build_random_model(tiny_config("llama3"), seed=0)
        folder = save_hub_folder(model, processor, root / "model")
        model.generation_config.save_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    server = Server(folder, root / "server.log")
    yield server, model, processor
    server.close()


def reference(model, processor, images, question, new_tokens=NEW_TOKENS):
    """What a user of the model computes: the processor's chat inputs, greedy `generate`, decoded."""
    messages = user(*({"type": "image", "path": str(path)} for path in images), {"type": "text", "text": question})
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    tokens = generated[0, inputs["input_ids"].shape[1] :]
    return processor.tokenizer.decode(tokens, skip_special_tokens=True), inputs["input_ids"].shape[1], len(tokens)


CASES = [([IMAGES[0]], "What color is the circle?"), ([IMAGES[1]], "How many shapes are there?"),
         ([], "Say something about shapes.")]  # fmt: skip


@pytest.mark.slow
def test_openai_client_gets_the_answers_of_generate(served, image_host):
    server, model, processor = served
    for images, question in CASES:
        text, prompt_tokens, completion_tokens = reference(model, processor, images, question)
        for url_of in (data_url, str, lambda path: f"{image_host}/{Path(path).name}"):
            answer = server.client.chat.completions.create(
                model="florence-vl", messages=user(*(image_part(url_of(p)) for p in images), text_part(question)),
                max_tokens=NEW_TOKENS, temperature=0,
            )  # fmt: skip
            assert answer.choices[0].message.content == text
            assert answer.choices[0].message.role == "assistant"
            assert answer.choices[0].finish_reason == ("length" if completion_tokens == NEW_TOKENS else "stop")
            assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, completion_tokens)
            if not images:
                break


@pytest.mark.slow
def test_streamed_answer_is_the_whole_answer_in_pieces(served):
    server, model, processor = served
    images, question = CASES[0]
    text, prompt_tokens, completion_tokens = reference(model, processor, images, question, new_tokens=12)
    chunks = list(server.client.chat.completions.create(
        model="florence-vl", messages=user(image_part(data_url(images[0])), text_part(question)), max_tokens=12,
        temperature=0, stream=True, stream_options={"include_usage": True},
    ))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == text
    assert [chunk.choices[0].finish_reason for chunk in chunks][-1] in ("stop", "length")
    assert chunks[-1].usage.prompt_tokens == prompt_tokens
    assert chunks[-1].usage.completion_tokens == completion_tokens


@pytest.mark.slow
def test_stop_strings_end_the_answer_before_them(served):
    server, model, processor = served
    images, question = CASES[2]
    text = reference(model, processor, images, question, new_tokens=12)[0]
    stop = text[len(text) // 2 :][:3]
    assert stop.strip(), text
    for stream in (False, True):
        answer = server.client.chat.completions.create(
            model="florence-vl", messages=user(text_part(question)), max_tokens=12, temperature=0, stop=[stop],
            stream=stream,
        )  # fmt: skip
        got = "".join(c.choices[0].delta.content or "" for c in answer) if stream else answer.choices[0].message.content
        assert got == text[: text.find(stop)]


@pytest.mark.slow
def test_concurrent_requests_each_get_their_own_answer(served):
    server, model, processor = served
    expected = [reference(model, processor, images, question)[0] for images, question in CASES] * 2

    def ask(case):
        images, question = case
        answer = server.client.chat.completions.create(
            model="florence-vl", messages=user(*(image_part(data_url(p)) for p in images), text_part(question)),
            max_tokens=NEW_TOKENS, temperature=0,
        )  # fmt: skip
        return answer.choices[0].message.content

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(ask, CASES * 2)) == expected


@pytest.mark.slow
def test_bad_requests_get_a_400_naming_the_problem_and_the_server_keeps_serving(served, tmp_path):
    server, model, processor = served
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    image = image_part(data_url(IMAGES[0]))
    limit = model.config.text_config.max_position_embeddings
    bad = [
        ({"messages": user(image_part("data:image/png;base64,AAAA"), text_part("?"))}, 400, "image 0 could not be read"),
        ({"messages": user(image_part(str(tmp_path / "broken.png")))}, 400, "image 0 could not be read"),
        ({"messages": user(image_part(str(tmp_path / "none.png")))}, 400, "no such file"),
        ({"messages": user(image, image, text_part("?"))}, 400, "the request has 2 images; this server takes at most 1"),
        ({"messages": user(text_part("shapes " * limit))}, 400, f"the model takes at most {limit} positions"),
        ({"messages": user(text_part("?")), "max_tokens": limit}, 400, f"the model takes at most {limit} positions"),
        ({"messages": [{"content": "hi"}]}, 400, "messages[0] has no `role`"),
        ({"messages": user(text_part("?")), "temperature": "hot"}, 400, "`temperature` must be a number"),
        ({"messages": user(text_part("?")), "n": 2}, 400, "`n` must be in [1, 1]"),
        ({"messages": user(text_part("?")), "model": "gpt-4"}, 404, "model 'gpt-4' is not served here"),
    ]
    for body, status, problem in bad:
        body = {"model": "florence-vl", **body}
        with pytest.raises(openai.APIStatusError) as refused:
            server.client.chat.completions.create(**body)
        assert refused.value.status_code == status, body
        assert problem in refused.value.message, refused.value.message
        assert server.process.poll() is None
    text = reference(model, processor, *CASES[0])[0]
    answer = server.client.chat.completions.create(
        model="florence-vl", messages=user(image, text_part(CASES[0][1])), max_tokens=NEW_TOKENS, temperature=0
    )
    assert answer.choices[0].message.content == text


def test_serve_command_refuses_bad_options_and_names_a_model_it_cannot_load(tmp_path, capsys):
    from florence_vl_hf.cli import main

    assert main(["serve", str(tmp_path), "--max-images", "-1"]) == 1
    assert capsys.readouterr().err.strip() == "error: --max-images must be at least 0, got -1"
    assert main(["serve", str(tmp_path), "--max-tokens", "0"]) == 1
    assert capsys.readouterr().err.strip() == "error: --max-tokens must be at least 1, got 0"
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 1
    assert capsys.readouterr().err.strip() == "error: --port must be between 0 and 65535, got 70000"
    assert main(["serve", str(tmp_path / "nowhere")]) == 1
    assert f"error: no such model folder: {tmp_path / 'nowhere'}" in capsys.readouterr().err
    assert main(["serve", str(tmp_path)]) == 1
    assert f"error: {tmp_path} has no config.json" in capsys.readouterr().err
    tiny_config("phi3").text_config.save_pretrained(tmp_path / "phi3")
    assert main(["serve", str(tmp_path / "phi3")]) == 1
    assert "is a 'phi3' model, not a Florence-VL one" in capsys.readouterr().err
