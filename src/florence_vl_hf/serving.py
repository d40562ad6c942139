"""`florence-vl serve MODEL`: an OpenAI-compatible chat-completions server for a Florence-VL folder or Hub repo.

A FastAPI app over the model's own `generate` (streaming through transformers' `TextIteratorStreamer`), answering
`POST /v1/chat/completions` (images as base64 data URLs, file paths or http(s) URLs; `stream`; text-only chats),
`GET /v1/models` and `GET /health`. Generation runs one request at a time; requests are read, checked and prepared
concurrently. A bad request gets an HTTP 400 whose OpenAI-style error names the problem, and the server keeps
serving. Needs the `serve` extra (`pip install "florence-vl-hf[serve]"`: FastAPI and uvicorn).

Not `transformers serve`: it loads models through transformers' own class tables (no trust_remote_code model), and
its serving modules are internal (5.25 replaced them with a multi-process engine). For GPUs at scale use vLLM
(docs/serving.md).
"""

import base64
import copy
import io
import json
import os
import threading
import time
import uuid

import PIL.Image
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, StoppingCriteria, TextIteratorStreamer
from transformers.image_utils import load_image

DEFAULT_MAX_IMAGES = 1  # Florence-VL was trained and evaluated with one image per conversation
DEFAULT_MAX_TOKENS = 512
TEXT_PARTS = ("text", "input_text")
IMAGE_PARTS = ("image_url", "input_image")
SUPPORTED_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
                    "stop", "stream", "stream_options", "n", "user"}  # fmt: skip


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400 (`status` 404 for an unknown model)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def open_image(url: str, index: int) -> PIL.Image.Image:
    """Image `index` of a request: a base64 `data:` URL, a file path (or file:// URL), or an http(s) URL."""
    try:
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if not header.endswith(";base64"):
                raise BadRequest("a data URL must be base64-encoded (data:image/png;base64,...)")
            image = PIL.Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        elif url.startswith(("http://", "https://")):
            image = load_image(url, timeout=30)
        else:
            path = url.removeprefix("file://")
            if not os.path.isfile(path):
                raise BadRequest(f"no such file {path!r} (an image is a data URL, an http(s) URL or a file path)")
            image = PIL.Image.open(path)
        image.load()
    except BadRequest as error:
        raise BadRequest(f"image {index} could not be read: {error}") from error
    except PIL.UnidentifiedImageError as error:
        raise BadRequest(f"image {index} could not be read: its data is not an image format PIL can decode") from error
    except Exception as error:  # a broken file (PIL raises OSError, SyntaxError, ...), bad base64, an unreachable URL
        fetched = url.startswith(("http://", "https://"))
        what = f"fetched from {url!r}" if fetched else "read"
        raise BadRequest(f"image {index} could not be {what}: {type(error).__name__}: {error}") from error
    return image


def chat_from_messages(messages, max_images: int) -> tuple[list[dict], list[str]]:
    """OpenAI chat `messages` -> the processor's chat format (image parts as `{"type": "image"}`) and the image
    URLs in order; BadRequest names the message and part at fault."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list of chat messages")
    chat, urls = [], []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{index}] must be an object with `role` and `content`")
        if not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{index}] has no `role`")
        content = message.get("content")
        if content is None:
            content = []
        elif isinstance(content, str):
            content = [{"type": "text", "text": content}]
        elif not isinstance(content, list):
            raise BadRequest(f"messages[{index}].content must be a string or a list of content parts")
        parts = []
        for number, part in enumerate(content):
            where = f"messages[{index}].content[{number}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in TEXT_PARTS:
                if not isinstance(part.get("text"), str):
                    raise BadRequest(f"{where} is a text part without a `text` string")
                parts.append({"type": "text", "text": part["text"]})
            elif kind in IMAGE_PARTS:
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise BadRequest(f"{where} is an image part without an `image_url.url` string")
                parts.append({"type": "image"})
                urls.append(url)
            else:
                raise BadRequest(f"{where} has type {kind!r}; this model takes 'text' and 'image_url' parts")
        chat.append({"role": message["role"], "content": parts})
    if len(urls) > max_images:
        raise BadRequest(
            f"the request has {len(urls)} images; this server takes at most {max_images} per request "
            "(florence-vl serve --max-images)"
        )
    return chat, urls


def _number(body: dict, name: str, kind, low=None, high=None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise BadRequest(f"`{name}` must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise BadRequest(f"`{name}` must be in [{low}, {high if high is not None else 'inf'}], got {value!r}")
    return kind(value)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatServer:
    """The model, its processor and what one chat-completions request needs: checks, inputs, generation."""

    def __init__(self, model, processor, name: str, max_images=DEFAULT_MAX_IMAGES, max_tokens=DEFAULT_MAX_TOKENS):
        self.model, self.processor, self.name = model, processor, name
        self.max_images, self.max_tokens = max_images, max_tokens
        self.max_positions = model.config.text_config.max_position_embeddings
        self.generation_lock = threading.Lock()

    def prepare(self, body) -> dict:
        """A request body -> the `generate` arguments; BadRequest for anything the server cannot answer."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        unknown = sorted(set(body) - SUPPORTED_FIELDS)
        if unknown:
            raise BadRequest(f"unsupported fields: {', '.join(unknown)}")
        if body.get("model") not in (None, self.name):
            raise BadRequest(f"model {body['model']!r} is not served here; this server serves {self.name!r}", 404)
        _number(body, "n", int, 1, 1)
        chat, urls = chat_from_messages(body.get("messages"), self.max_images)
        images = iter([open_image(url, index) for index, url in enumerate(urls)])
        for message in chat:
            message["content"] = [{"type": "image", "image": next(images)} if part["type"] == "image" else part
                                  for part in message["content"]]  # fmt: skip
        try:  # as a user of the model would: the processor's chat template, tokenized by the processor
            inputs = self.processor.apply_chat_template(
                chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
        except Exception as error:  # the processor's and the chat template's errors name the problem
            raise BadRequest(f"the request could not be prepared: {error}") from error
        prompt_tokens = inputs["input_ids"].shape[-1]
        room = self.max_positions - prompt_tokens
        max_tokens = _number(body, "max_completion_tokens", int, 1) or _number(body, "max_tokens", int, 1)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise BadRequest(
                f"the prompt is {prompt_tokens} tokens (images included) and {max_tokens or 1} more were asked "
                f"for; the model takes at most {self.max_positions} positions"
            )
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = max_tokens or min(self.max_tokens, room)
        temperature = _number(body, "temperature", float, 0, 2)
        top_p = _number(body, "top_p", float, 0, 1)
        if temperature == 0:
            config.do_sample = False
        elif temperature is not None:
            config.do_sample, config.temperature = True, temperature
        if top_p is not None:
            config.top_p = top_p
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
            raise BadRequest("`stop` must be a string or a list of non-empty strings")
        if stop:
            config.stop_strings = stop
        return {"inputs": inputs.to(self.model.device), "generation_config": config, "stop": stop or [],
                "seed": _number(body, "seed", int), "prompt_tokens": prompt_tokens}  # fmt: skip

    def generate(self, request: dict, streamer=None, cancelled=None) -> list[int]:
        """Greedy or sampled tokens of one prepared request (one request at a time)."""
        with self.generation_lock, torch.inference_mode():
            if request["seed"] is not None:
                torch.manual_seed(request["seed"])
            output = self.model.generate(
                **request["inputs"], generation_config=request["generation_config"], streamer=streamer,
                tokenizer=self.processor.tokenizer, stopping_criteria=[_Cancelled(cancelled or threading.Event())],
            )  # fmt: skip
        return output[0, request["prompt_tokens"] :].tolist()

    def finish_reason(self, request: dict, tokens: list[int]) -> str:
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        full = len(tokens) >= request["generation_config"].max_new_tokens
        return "length" if full and not (tokens and tokens[-1] in eos) else "stop"

    def text(self, request: dict, tokens: list[int]) -> str:
        text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [text.find(stop) for stop in request["stop"] if stop in text]
        return text[: min(cuts)] if cuts else text

    def completion(self, request: dict, tokens: list[int]) -> dict:
        return {**self._envelope("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text(request, tokens)},
                             "finish_reason": self.finish_reason(request, tokens)}],
                "usage": self._usage(request, len(tokens))}  # fmt: skip

    def stream(self, request: dict, include_usage: bool):
        """The SSE events of a streamed answer (a plain generator: Starlette runs it in its thread pool)."""
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancelled, result = threading.Event(), {}

        def run():
            try:
                result["tokens"] = self.generate(request, streamer, cancelled)
            except Exception as error:
                result["error"] = error
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        envelope = self._envelope("chat.completion.chunk")

        def event(delta, finish_reason=None, **extra):
            return "data: " + json.dumps({**envelope, "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}) + "\n\n"  # fmt: skip

        worker.start()
        try:
            yield event({"role": "assistant", "content": ""})
            held = ""
            for piece in streamer:
                held += piece
                cuts = [held.find(stop) for stop in request["stop"] if stop in held]
                if cuts:
                    held = held[: min(cuts)]
                    break
                # hold back a tail that may be the start of a stop string
                keep = max((len(s) - 1 for s in request["stop"]), default=0)
                ready, held = (held[:-keep], held[-keep:]) if keep else (held, "")
                if ready:
                    yield event({"content": ready})
            if held:
                yield event({"content": held})
            worker.join()
            if "error" in result:
                yield "data: " + json.dumps({"error": {"message": str(result["error"]), "type": "server_error"}})
                yield "\n\n"
                return
            usage = {"usage": self._usage(request, len(result["tokens"]))} if include_usage else {}
            yield event({}, self.finish_reason(request, result["tokens"]), **usage)
            yield "data: [DONE]\n\n"
        finally:
            cancelled.set()  # a client that went away stops the generation

    def _envelope(self, kind: str) -> dict:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": self.name}

    @staticmethod
    def _usage(request: dict, completion_tokens: int) -> dict:
        prompt_tokens = request["prompt_tokens"]
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_chat_server(model: str, *, name=None, device=None, dtype="auto", revision=None, **options) -> ChatServer:
    """Load MODEL (a Florence-VL folder or Hub repo id) for serving."""
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"{model} has no config.json: it is not a model folder")
    if not os.path.isdir(model) and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise ValueError(f"no such model folder: {model} (a folder, or a Hub repo id such as user/name)")
    model_type = AutoConfig.from_pretrained(model, revision=revision).model_type
    if model_type != "florence_vl":
        raise ValueError(f"{model} is a {model_type!r} model, not a Florence-VL one")
    processor = AutoProcessor.from_pretrained(model, revision=revision)
    loaded = AutoModelForImageTextToText.from_pretrained(model, revision=revision, dtype=dtype)
    loaded = loaded.to(device or _default_device()).eval()
    return ChatServer(loaded, processor, name or model, **options)


def build_app(server: ChatServer):
    """The FastAPI app serving `server`."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.concurrency import run_in_threadpool
        from fastapi.responses import JSONResponse, StreamingResponse
    except ImportError as error:
        raise ImportError('florence-vl serve needs FastAPI and uvicorn: pip install "florence-vl-hf[serve]"') from error

    app = FastAPI(title="Florence-VL")

    def error(status: int, message: str, kind="invalid_request_error"):
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the request body is not valid JSON")
        try:
            prepared = await run_in_threadpool(server.prepare, body)
        except BadRequest as refused:
            return error(refused.status, str(refused))
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(server.stream(prepared, include_usage), media_type="text/event-stream")
        tokens = await run_in_threadpool(server.generate, prepared)
        return JSONResponse(server.completion(prepared, tokens))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "owned_by": "florence-vl-hf",
                                            "max_model_len": server.max_positions}]}  # fmt: skip

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


def serve(model: str, *, host="127.0.0.1", port=8000, log_level="warning", **options) -> None:
    """Load MODEL and serve it with uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError as error:
        raise ImportError('florence-vl serve needs FastAPI and uvicorn: pip install "florence-vl-hf[serve]"') from error
    app = build_app(load_chat_server(model, **options))
    uvicorn.run(app, host=host, port=port, log_level=log_level)
