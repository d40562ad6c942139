"""`florence-vl bench`: speed and memory of Florence-VL, side by side with the original algorithm and the bare LLM.

For each model shape, one random-weight checkpoint is written three ways and loaded by three implementations:

- ours: `FlorenceVLForConditionalGeneration` (DaViT once per image, the three task prompts in one BART-encoder call,
  no Florence-2 decoder or LM head);
- original: the algorithm as the original code runs it, expressed with transformers' native
  `Florence2ForConditionalGeneration` (decoder included) called through `generate(max_new_tokens=1)` on the three
  [image tokens; task prompt] inputs of every image (attending to every position, as the original does), the DaViT
  tokens and encoder outputs captured on the way; then the projector and the LLM on `inputs_embeds`;
- bare LLM: `AutoModelForCausalLM` with the same text weights, decoding as many tokens from the same cache length.

Times are medians over repeats after a warm-up, with the implementations interleaved so that machine noise hits both
sides of each ratio alike. Decode times come from a clock inside `generate` (one tick per generated token), so they
exclude the prefill. Peak memory comes from a fresh worker process per implementation.
"""

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from statistics import median

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CompileConfig,
    Florence2Config,
    Florence2ForConditionalGeneration,
    LlamaConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import logging as transformers_logging
from torch.utils.flop_counter import FlopCounterMode

from .build import save_hub_folder
from .conversion.parts import from_pretrained_parts
from .conversion.source import florence2_config, read_json
from .modeling import FlorenceVLConfig, FlorenceVLForConditionalGeneration
from .modeling.configuration_florence_vl import DEPTH_FEATURE
from .modeling.modeling_florence_vl import FlorenceVLMultiModalProjector
from .processing import asset_dir, build_processor, florence2_image_processor
from .tiny import tiny_config

SHAPE_NAMES = ("tiny", "base", "large")
QUESTION = "What is in the image?"
TEMPLATE = "phi3"  # every shape uses the Phi-3.5 vocabulary (32064 rows) and chat template


@dataclass
class Shape:
    name: str
    florence2: dict  # Florence2Config keyword arguments: vision_config, text_config (BART, decoder included)
    text: object  # the LLM's config
    image_size: int
    dtype: torch.dtype


def _bart(d_model: int, layers: int, heads: int) -> dict:
    return {
        "model_type": "bart",
        "vocab_size": 51289,
        "d_model": d_model,
        "encoder_layers": layers,
        "decoder_layers": layers,
        "encoder_attention_heads": heads,
        "decoder_attention_heads": heads,
        "encoder_ffn_dim": 4 * d_model,
        "decoder_ffn_dim": 4 * d_model,
        "max_position_embeddings": 1024,
    }


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def get_shape(name: str, dtype: str | None = None) -> Shape:
    """tiny: the test configs. base: Florence-2-base with a Llama-shaped 0.5B LLM. large: Florence-2-large +
    Phi-3.5-mini (the shapes of the released 3B model), in bf16. `dtype` (a DTYPES name) overrides the shape's."""
    shape = _named_shape(name)
    if dtype is None:
        return shape
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return replace(shape, dtype=DTYPES[dtype])


def _named_shape(name: str) -> Shape:
    if name == "tiny":
        config = tiny_config("phi3")
        florence2 = {"vision_config": config.vision_config.vision_config.to_dict(),
                     "text_config": config.vision_config.text_config.to_dict()}  # fmt: skip
        return Shape(name, florence2, config.text_config, config.image_size, torch.float32)
    if name == "base":
        vision = {"embed_dim": [128, 256, 512, 1024], "depths": [1, 1, 9, 1], "num_heads": [4, 8, 16, 32],
                  "num_groups": [4, 8, 16, 32], "window_size": 12, "projection_dim": 768}  # fmt: skip
        text = LlamaConfig(
            vocab_size=32064, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
            intermediate_size=4864, max_position_embeddings=4096, bos_token_id=1, eos_token_id=32000,
            pad_token_id=32000, tie_word_embeddings=False,
        )  # fmt: skip
        return Shape(name, {"vision_config": vision, "text_config": _bart(768, 6, 12)}, text, 768, torch.float32)
    if name == "large":
        florence2 = florence2_config(read_json(asset_dir("florence-2-large") / "config.json"))
        parts = {"vision_config": florence2.vision_config.to_dict(), "text_config": florence2.text_config.to_dict()}
        text = AutoConfig.from_pretrained(str(asset_dir("phi-3.5-mini-instruct")))
        return Shape(name, parts, text, 768, torch.bfloat16)
    raise ValueError(f"Unknown shape {name!r}: choose from {', '.join(SHAPE_NAMES)}")


def prepare_checkpoints(shape: Shape, folder, seed: int = 0) -> Path:
    """Random weights written as a native Florence-2 (`florence2/`), a causal LM (`llm/`) and the Florence-VL built
    from exactly those two (`florence_vl/`, with a seeded projector)."""
    folder = Path(folder)
    torch.manual_seed(seed)
    vocab = shape.florence2["text_config"]["vocab_size"]
    # One extra embedding row serves as the native model's image placeholder (prompts never contain it).
    text_config = dict(shape.florence2["text_config"], vocab_size=vocab + 1)
    config = Florence2Config(vision_config=shape.florence2["vision_config"], text_config=text_config,
                             image_token_id=vocab)  # fmt: skip
    florence2 = Florence2ForConditionalGeneration._from_config(config, dtype=shape.dtype)
    florence2.save_pretrained(folder / "florence2")
    florence2_image_processor(shape.image_size).save_pretrained(folder / "florence2")
    del florence2
    llm = AutoModelForCausalLM.from_config(shape.text, dtype=shape.dtype)
    llm.save_pretrained(folder / "llm")
    del llm
    gc.collect()
    tokenizer = AutoTokenizer.from_pretrained(str(asset_dir("phi-3.5-mini-instruct")))
    model, processor = from_pretrained_parts(folder / "florence2", folder / "llm", tokenizer=tokenizer,
                                             template=TEMPLATE, dtype=shape.dtype, seed=seed)  # fmt: skip
    save_hub_folder(model, processor, folder / "florence_vl")
    return folder


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock(StoppingCriteria):
    """Ticks once per generated token inside `generate`; `per_token()` is the median time between ticks (decode
    steps only: the first tick comes after the prefill)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ticks: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        _sync(self.device)
        self.ticks.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def per_token(self) -> float:
        if len(self.ticks) < 2:
            raise ValueError("a decode time needs at least 2 generated tokens")
        return median(later - earlier for earlier, later in zip(self.ticks, self.ticks[1:]))


def _parameters(*modules) -> tuple[int, int]:
    """(parameter count, bytes of parameters and buffers) over the distinct storages of `modules`."""
    seen, count, size = set(), 0, 0
    for module in modules:
        for tensors, counted in ((module.parameters(), True), (module.buffers(), False)):
            for tensor in tensors:
                if tensor.data_ptr() in seen:
                    continue
                seen.add(tensor.data_ptr())
                count += tensor.numel() if counted else 0
                size += tensor.numel() * tensor.element_size()
    return count, size


class Ours:
    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype):
        self.model = FlorenceVLForConditionalGeneration.from_pretrained(folder / "florence_vl", dtype=dtype)
        self.model.to(device).eval()

    def modules(self):
        return [self.model]

    def vision(self, batch):
        return self.model.get_image_features(batch["pixel_values"], task_prompt_ids=batch["task_prompt_ids"]).pooler_output

    def first_token(self, batch):
        return self.model.generate(**batch, max_new_tokens=1, do_sample=False)

    def generate(self, batch, tokens: int, **kwargs):
        return self.model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **kwargs)

    def prefill(self, batch, features):
        inputs = {k: v for k, v in batch.items() if k not in ("pixel_values", "task_prompt_ids")}
        encoded = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        return self.model(**inputs, mm_encoder_outputs=encoded, logits_to_keep=1)


class Original:
    """The original algorithm on the same weights: full Florence-2 through generate(max_new_tokens=1) per prompt
    row, the projector, then the LLM on inputs_embeds. The LLM alone is the bare-LLM baseline."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype):
        self.florence2 = Florence2ForConditionalGeneration.from_pretrained(folder / "florence2", dtype=dtype)
        self.florence2.to(device).eval()
        self.llm = AutoModelForCausalLM.from_pretrained(folder / "llm", dtype=dtype).to(device).eval()
        self.config = FlorenceVLConfig.from_pretrained(folder / "florence_vl")
        if self.config.fusion != "channel" or not self.config.include_average_image_token:
            raise ValueError("the original algorithm is channel fusion over all tokens")
        self.projector = FlorenceVLMultiModalProjector(self.config)
        prefix = "model.multi_modal_projector."
        state = {}
        for path in sorted((folder / "florence_vl").glob("*.safetensors")):  # one file, or shards
            with safe_open(str(path), "pt") as weights:
                state.update({key[len(prefix):]: weights.get_tensor(key) for key in weights.keys()
                              if key.startswith(prefix)})  # fmt: skip
        self.projector.load_state_dict(state)
        self.projector.to(device, dtype).eval()
        self._captured = {}
        self.florence2.model.multi_modal_projector.register_forward_hook(self._capture("depth"))
        self.florence2.model.language_model.encoder.register_forward_hook(self._capture("encoder"))

    def _capture(self, name):
        def hook(module, args, output):
            self._captured[name] = output if isinstance(output, torch.Tensor) else output.last_hidden_state

        return hook

    def modules(self):
        return [self.florence2, self.projector, self.llm]

    def vision(self, batch):
        pixel_values, prompts = batch["pixel_values"], batch["task_prompt_ids"]
        num_images, num_prompts, _ = prompts.shape
        num_tokens = self.config.num_image_tokens
        image_ids = prompts.new_full((num_images * num_prompts, num_tokens), self.florence2.config.image_token_id)
        input_ids = torch.cat([image_ids, prompts.flatten(0, 1)], dim=1)
        self.florence2.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=pixel_values.repeat_interleave(num_prompts, dim=0),
            max_new_tokens=1,
            do_sample=False,
            num_beams=1,
        )
        depth = self._captured["depth"].unflatten(0, (num_images, num_prompts))[:, 0]
        breadth = self._captured["encoder"][:, :num_tokens].unflatten(0, (num_images, num_prompts))
        names = self.config.task_prompt_names
        features = [depth if source == DEPTH_FEATURE else breadth[:, names.index(source)]
                    for source in self.config.vision_feature_sources]  # fmt: skip
        return self.projector(torch.cat(features, dim=-1))

    def _embeds(self, batch, features):
        input_ids = batch["input_ids"]
        is_image = (input_ids == self.config.image_token_id).unsqueeze(-1)
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image.squeeze(-1), 0))
        return embeds.masked_scatter(is_image, features.to(embeds.dtype))

    def first_token(self, batch):
        embeds = self._embeds(batch, self.vision(batch))
        return self.llm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], max_new_tokens=1,
                                 do_sample=False)  # fmt: skip

    def generate(self, batch, tokens: int, **kwargs):
        embeds = self._embeds(batch, self.vision(batch))
        return self.llm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], max_new_tokens=tokens,
                                 min_new_tokens=tokens, do_sample=False, **kwargs)  # fmt: skip

    def bare_generate(self, batch, tokens: int, **kwargs):
        """The bare LLM on the same token ids (the `<image>` placeholders are ordinary rows of its vocabulary)."""
        return self.llm.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **kwargs)  # fmt: skip


def make_batch(folder: Path, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """One bundled image and a short question through the processor, repeated `batch_size` times."""
    from PIL import Image

    config = FlorenceVLConfig.from_pretrained(folder / "florence_vl")
    processor = build_processor(config, template=TEMPLATE)
    image = Image.open(str(resources.files("florence_vl_hf") / "assets" / "shapes.png")).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    batch = {key: torch.cat([value] * batch_size).to(device) for key, value in inputs.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


def interleaved(measures: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Run each measure (a function returning seconds) `warmup` times, then `repeats` rounds in alternating order
    (A B, B A, ...: a drift of the machine hits every side alike); the median of each."""
    for _ in range(warmup):
        for measure in measures.values():
            measure()
    samples = {name: [] for name in measures}
    order = list(measures)
    for round_index in range(repeats):
        for name in order if round_index % 2 == 0 else order[::-1]:
            samples[name].append(measures[name]())
    return {name: median(values) for name, values in samples.items()}


def _timed(fn, device):
    def measure():
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - started

    return measure


def _decode_clock(generate, batch, tokens, device, **kwargs):
    def measure():
        clock = StepClock(device)
        generate(batch, tokens, stopping_criteria=StoppingCriteriaList([clock]), **kwargs)
        return clock.per_token()

    return measure


def _best_seconds(fn, device, repeats: int) -> float:
    """The fastest of `repeats` timings after two warm-ups: a peak is the best the machine does."""
    return min(_timings(fn, device, repeats))


PEAK_SIZES = {"cpu": (1024, 2048, 4096), "cuda": (4096, 8192)}


def _timings(fn, device, repeats: int) -> list[float]:
    measure = _timed(fn, device)
    for _ in range(2):
        measure()
    return [measure() for _ in range(repeats)]


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes=None, repeats: int = 8) -> dict:
    """This machine's matrix-multiply FLOP/s in `dtype`, measured so that it is stable: square torch.matmul at
    several sizes (no single size is the best everywhere: caches, AMX/tensor-core tiling), best of `repeats` after
    two warm-ups. `spread` is how far the median repeat falls below the best at the winning size: the run-to-run
    noise a later comparison must allow."""
    sizes = tuple(sizes or PEAK_SIZES.get(device.type, PEAK_SIZES["cpu"]))
    by_size, spreads = {}, {}
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        seconds = _timings(lambda: torch.matmul(a, b), device, repeats)
        by_size[size] = 2 * size**3 / min(seconds)
        spreads[size] = 1 - min(seconds) / median(seconds)
        del a, b
    best = max(by_size, key=by_size.get)
    return {
        "flops_per_second": by_size[best],
        "size": best,
        "spread": spreads[best],
        "by_size": {str(size): flops for size, flops in by_size.items()},
        "repeats": repeats,
    }


_PEAKS: dict = {}


def machine_peak(device: torch.device, dtype: torch.dtype) -> dict:
    """`matmul_peak` once per run, device and dtype: every shape's fractions divide by the same measurement."""
    key = (str(device), dtype)
    if key not in _PEAKS:
        _PEAKS[key] = matmul_peak(device, dtype)
    return _PEAKS[key]


def peak_warnings(report: dict, previous: dict | None) -> list[str]:
    """A warning for each shape whose matmul peak is below the previous run's (same dtype) by more than the larger
    of the two runs' spreads: the machine was busier or slower, and every fraction of the peak moves with it."""
    warnings = []
    for name, result in report.get("shapes", {}).items():
        before = ((previous or {}).get("shapes") or {}).get(name) or {}
        now, then = result.get("matmul_peak"), before.get("matmul_peak")
        if not now or not then or result.get("dtype") != before.get("dtype"):
            continue
        allowed = max(now["spread"], then["spread"])
        drop = 1 - now["flops_per_second"] / then["flops_per_second"]
        if drop > allowed:
            warnings.append(
                f"warning: {name}: the {result.get('dtype')} matmul peak is {now['flops_per_second'] / 1e9:.0f} "
                f"GFLOP/s, {drop:.0%} below the previous run's {then['flops_per_second'] / 1e9:.0f} (spread "
                f"{allowed:.0%}): the machine is busier than then, and the fractions of the peak are not comparable"
            )
    return warnings


def read_bandwidth(device: torch.device, repeats: int = 10) -> float:
    """This machine's memory read bandwidth in bytes/s, as decoding meets it: a matrix-vector product over a float32
    matrix far larger than the caches (512 MiB on CPU, 2 GiB on a GPU)."""
    columns = 8192
    rows = (1 << 31 if device.type == "cuda" else 1 << 29) // 4 // columns
    matrix = torch.ones(rows, columns, device=device)
    vector = torch.ones(columns, device=device)
    return matrix.numel() * 4 / _best_seconds(lambda: torch.mv(matrix, vector), device, repeats)


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _memory_needed(shape: Shape) -> int:
    with torch.device("meta"):
        florence2 = Florence2ForConditionalGeneration(Florence2Config(**shape.florence2))
        llm = AutoModelForCausalLM.from_config(shape.text)
    element = torch.finfo(shape.dtype).bits // 8
    return 3 * element * (sum(p.numel() for p in florence2.parameters()) + sum(p.numel() for p in llm.parameters()))


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} is not in /proc/self/status")


def memory_worker(kind: str, folder: Path, device: torch.device, dtype: torch.dtype, tokens: int) -> dict:
    """Peak memory of one implementation answering one question (vision, prefill, `tokens` decoded), measured in
    this process: CUDA's peak allocation, or on CPU the resident-set high-water mark above the level before loading."""
    batch = make_batch(folder, 1, device, dtype)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        except OSError:
            pass  # then the high-water mark may include a higher level from before loading (imports)
        before = _proc_status("VmRSS")
    implementation = (Ours if kind == "ours" else Original)(folder, device, dtype)
    with torch.no_grad():
        implementation.generate(batch, tokens)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _proc_status("VmHWM")
    return {"peak_bytes": peak - before, "weights_bytes": _parameters(*implementation.modules())[1]}


def _peak_memory(kind, folder, device, dtype, tokens) -> dict:
    command = [sys.executable, "-m", "florence_vl_hf.benchmark", "--memory-worker", kind, str(folder), str(device),
               str(dtype).removeprefix("torch."), str(tokens)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    if result.returncode != 0:
        raise RuntimeError(f"memory worker {kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@torch.no_grad()
def bench_shape(name: str, device: torch.device, repeats: int = 3, warmup: int = 1, decode_tokens: int = 16,
                batch_size: int = 8, work_dir=None, compile_decode: bool = False, log=print,
                dtype: str | None = None) -> dict:  # fmt: skip
    shape = get_shape(name, dtype)
    needed, available = _memory_needed(shape), _available_memory(device)
    if needed > available:
        return {"skipped": f"needs about {needed / 2**30:.1f} GiB of {device.type} memory, "
                           f"{available / 2**30:.1f} GiB available"}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=f"florence-vl-bench-{name}-", dir=work_dir) as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        prepare_checkpoints(shape, folder)
        log(f"[{name}] checkpoints written in {time.perf_counter() - started:.0f}s")
        result = {"dtype": str(shape.dtype).removeprefix("torch."), "image_size": shape.image_size}
        memory = {kind: _peak_memory(kind, folder, device, shape.dtype, decode_tokens) for kind in ("ours", "original")}
        log(f"[{name}] peak memory measured")

        ours, original = Ours(folder, device, shape.dtype), Original(folder, device, shape.dtype)
        one = make_batch(folder, 1, device, shape.dtype)
        many = make_batch(folder, batch_size, device, shape.dtype)
        result["num_image_tokens"] = ours.model.config.num_image_tokens
        result["prompt_tokens"] = int(one["input_ids"].shape[1])
        params = {"ours": _parameters(*ours.modules()), "original": _parameters(*original.modules()),
                  "bare_llm": _parameters(original.llm)}  # fmt: skip
        result["parameters"] = {kind: count for kind, (count, _) in params.items()}
        result["weights_bytes"] = {kind: size for kind, (_, size) in params.items()}
        decoder = [original.florence2.model.language_model.decoder, original.florence2.lm_head]
        result["florence2_decoder_bytes"] = _parameters(*decoder)[1] - _parameters(
            original.florence2.model.language_model.shared)[1]  # fmt: skip

        ours_features, original_features = ours.vision(one), original.vision(one)
        scale = max(1.0, original_features.abs().max().item())
        result["features_max_relative_difference"] = (ours_features - original_features).abs().max().item() / scale

        vision = interleaved({"ours": _timed(lambda: ours.vision(one), device),
                              "original": _timed(lambda: original.vision(one), device)}, repeats, warmup)  # fmt: skip
        vision_many = interleaved({"ours": _timed(lambda: ours.vision(many), device),
                                   "original": _timed(lambda: original.vision(many), device)}, repeats, 0)  # fmt: skip
        log(f"[{name}] vision timed")
        result["vision_seconds_per_image"] = {
            "ours_batch1": vision["ours"], "original_batch1": vision["original"],
            f"ours_batch{batch_size}": vision_many["ours"] / batch_size,
            f"original_batch{batch_size}": vision_many["original"] / batch_size,
        }  # fmt: skip
        result["vision_speedup_vs_original"] = vision["original"] / vision["ours"]
        result[f"vision_speedup_vs_original_batch{batch_size}"] = vision_many["original"] / vision_many["ours"]

        ttft = interleaved({"ours": _timed(lambda: ours.first_token(one), device),
                            "original": _timed(lambda: original.first_token(one), device)}, repeats, warmup)  # fmt: skip
        result["time_to_first_token_seconds"] = ttft
        result["time_to_first_token_speedup_vs_original"] = ttft["original"] / ttft["ours"]
        log(f"[{name}] time to first token timed")

        # The prefill of each decode run re-reads the image features from the cache: only decode steps are timed.
        ours.model.enable_vision_feature_cache()
        decode = {}
        for label, batch in (("batch1", one), (f"batch{batch_size}", many)):
            for cache in ("dynamic", "static"):
                kwargs = {"cache_implementation": "static"} if cache == "static" else {}
                if cache == "static" and batch is many:
                    continue
                times = interleaved({"ours": _decode_clock(ours.generate, batch, decode_tokens, device, **kwargs),
                                     "bare_llm": _decode_clock(original.bare_generate, batch, decode_tokens, device,
                                                               **kwargs)}, repeats, warmup)  # fmt: skip
                suffix = "" if cache == "dynamic" else "_static_cache"
                decode[f"ours_{label}{suffix}"] = times["ours"] * 1000
                decode[f"bare_llm_{label}{suffix}"] = times["bare_llm"] * 1000
        if compile_decode:
            # generate() compiles the decoding forward for static caches; on CPU it must be asked to.
            config = CompileConfig(mode="default" if device.type == "cpu" else "reduce-overhead", dynamic=False)
            config._compile_all_devices = True
            kwargs = {"cache_implementation": "static", "compile_config": config}
            times = interleaved({"ours": _decode_clock(ours.generate, one, decode_tokens, device, **kwargs),
                                 "bare_llm": _decode_clock(original.bare_generate, one, decode_tokens, device,
                                                           **kwargs)}, repeats, max(warmup, 1))  # fmt: skip
            decode["ours_batch1_static_cache_compiled"] = times["ours"] * 1000
            decode["bare_llm_batch1_static_cache_compiled"] = times["bare_llm"] * 1000
        ours.model.disable_vision_feature_cache()
        log(f"[{name}] decode timed")
        result["decode_ms_per_token"] = decode
        result["decode_overhead_vs_bare_llm"] = decode["ours_batch1"] / decode["bare_llm_batch1"]
        result[f"decode_overhead_vs_bare_llm_batch{batch_size}"] = (
            decode[f"ours_batch{batch_size}"] / decode[f"bare_llm_batch{batch_size}"])  # fmt: skip
        # A decode step reads every weight of the LLM once, except the input embeddings (one row per token):
        # those bytes / step time is the bandwidth it achieves; bytes / bandwidth is the per-token floor.
        llm = ours.model.model.language_model
        llm_bytes = _parameters(llm, ours.model.lm_head)[1] - _parameters(llm.get_input_embeddings())[1]
        if ours.model.config.text_config.tie_word_embeddings:
            llm_bytes += _parameters(llm.get_input_embeddings())[1]  # the LM head reads the whole tied matrix
        bandwidth = read_bandwidth(device)
        result["decode_tokens_per_second"] = {
            f"ours_batch{size}": 1000 * size / decode[f"ours_batch{size}"] for size in (1, batch_size)
        }
        result["memory_bandwidth_bytes_per_second"] = bandwidth
        result["decode_bandwidth_fraction"] = llm_bytes / (decode["ours_batch1"] / 1000) / bandwidth
        result["static_cache_decode_speedup"] = decode["ours_batch1"] / decode["ours_batch1_static_cache"]
        if compile_decode:
            result["compiled_decode_speedup"] = decode["ours_batch1"] / decode["ours_batch1_static_cache_compiled"]
            result["compiled_decode_overhead_vs_bare_llm"] = (
                decode["ours_batch1_static_cache_compiled"] / decode["bare_llm_batch1_static_cache_compiled"])

        result["peak_memory_bytes"] = {kind: memory[kind]["peak_bytes"] for kind in memory}
        result["peak_memory_ratio_vs_original"] = memory["ours"]["peak_bytes"] / memory["original"]["peak_bytes"]
        result["peak_memory_saved_bytes"] = memory["original"]["peak_bytes"] - memory["ours"]["peak_bytes"]

        measured_peak = machine_peak(device, shape.dtype)
        peak = measured_peak["flops_per_second"]
        vision_flops = count_flops(lambda: ours.vision(one))
        original_vision_flops = count_flops(lambda: original.vision(one))
        features = ours.vision(one)
        prefill_flops = count_flops(lambda: ours.prefill(one, features))
        prefill = interleaved({"prefill": _timed(lambda: ours.prefill(one, features), device)}, repeats, warmup)
        result["prefill_seconds"] = prefill["prefill"]
        result["matmul_peak_flops_per_second"] = peak
        result["matmul_peak"] = measured_peak
        result["vision_flops"] = {"ours": vision_flops, "original": original_vision_flops}
        result["prefill_flops"] = prefill_flops
        result["vision_fraction_of_matmul_peak"] = vision_flops / vision["ours"] / peak
        result["prefill_fraction_of_matmul_peak"] = prefill_flops / prefill["prefill"] / peak
        del ours, original
        gc.collect()
    return result


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": str(device)}  # fmt: skip
    import transformers

    info["transformers"] = transformers.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_benchmark(shapes, device="cpu", repeats: int = 3, warmup: int = 1, decode_tokens: int = 16,
                  batch_size: int = 8, work_dir=None, compile_decode: bool = False, log=print,
                  dtype: str | None = None) -> dict:  # fmt: skip
    device = torch.device(device)
    for name in shapes:
        get_shape(name, dtype)  # unknown names and dtypes fail before any work
    transformers_logging.disable_progress_bar()
    report = {"machine": machine_info(device), "settings": {"repeats": repeats, "warmup": warmup,
              "decode_tokens": decode_tokens, "batch_size": batch_size, "compile": compile_decode, "dtype": dtype},
              "shapes": {}}  # fmt: skip
    for name in shapes:
        report["shapes"][name] = bench_shape(name, device, repeats, warmup, decode_tokens, batch_size, work_dir,
                                             compile_decode, log=log, dtype=dtype)  # fmt: skip
    return report


def _format(value, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "bytes":
        return f"{value / 2**20:.1f} MiB" if abs(value) < 2**30 else f"{value / 2**30:.2f} GiB"
    if unit == "count":
        return f"{value / 1e6:.1f} M"
    if unit == "%":
        return f"{100 * value:.1f}%"
    return str(value)


def _pair(group: str, first: str, second: str, unit: str):
    """A table cell "first / second" from one group of a shape's results ("-" where a value is absent)."""
    return lambda result: f"{_format(result[group].get(first), unit)} / {_format(result[group].get(second), unit)}"


def format_table(report: dict) -> str:
    """A markdown table: one row per measurement, one column per shape."""
    shapes = report["shapes"]
    batch = report["settings"]["batch_size"]
    rows = [
        ("parameters, ours / original", _pair("parameters", "ours", "original", "count")),
        ("weights, ours / original", _pair("weights_bytes", "ours", "original", "bytes")),
        ("Florence-2 decoder + LM head (not loaded)", lambda r: _format(r["florence2_decoder_bytes"], "bytes")),
        ("vision per image, batch 1: ours / original",
         _pair("vision_seconds_per_image", "ours_batch1", "original_batch1", "s")),
        ("**vision speed-up vs original, batch 1**", lambda r: _format(r["vision_speedup_vs_original"], "x")),
        (f"vision per image, batch {batch}: ours / original",
         _pair("vision_seconds_per_image", f"ours_batch{batch}", f"original_batch{batch}", "s")),
        (f"vision speed-up vs original, batch {batch}",
         lambda r: _format(r[f"vision_speedup_vs_original_batch{batch}"], "x")),
        ("time to first token: ours / original",
         _pair("time_to_first_token_seconds", "ours", "original", "s")),
        ("decode per token, batch 1: ours / bare LLM",
         _pair("decode_ms_per_token", "ours_batch1", "bare_llm_batch1", "ms")),
        ("**decode overhead vs bare LLM, batch 1**", lambda r: _format(r["decode_overhead_vs_bare_llm"], "x")),
        (f"decode per token, batch {batch}: ours / bare LLM",
         _pair("decode_ms_per_token", f"ours_batch{batch}", f"bare_llm_batch{batch}", "ms")),
        (f"decode overhead vs bare LLM, batch {batch}",
         lambda r: _format(r[f"decode_overhead_vs_bare_llm_batch{batch}"], "x")),
        (f"decode tokens/s, ours, batch 1 / batch {batch}",
         lambda r: f"{r['decode_tokens_per_second']['ours_batch1']:.1f} / "
                   f"{r['decode_tokens_per_second'][f'ours_batch{batch}']:.1f}"),
        ("decode: LLM weights read per second, fraction of read bandwidth",
         lambda r: f"{_format(r['decode_bandwidth_fraction'], '%')} of "
                   f"{r['memory_bandwidth_bytes_per_second'] / 1e9:.0f} GB/s"),
        ("decode per token, static cache, batch 1: ours / bare LLM",
         _pair("decode_ms_per_token", "ours_batch1_static_cache", "bare_llm_batch1_static_cache", "ms")),
        ("decode per token, static cache + torch.compile, batch 1: ours / bare LLM",
         _pair("decode_ms_per_token", "ours_batch1_static_cache_compiled", "bare_llm_batch1_static_cache_compiled",
               "ms")),
        ("peak memory: ours / original", _pair("peak_memory_bytes", "ours", "original", "bytes")),
        ("**peak memory ratio vs original**", lambda r: _format(r["peak_memory_ratio_vs_original"], "x")),
        ("vision pass, fraction of matmul peak", lambda r: _format(r["vision_fraction_of_matmul_peak"], "%")),
        ("prefill, fraction of matmul peak", lambda r: _format(r["prefill_fraction_of_matmul_peak"], "%")),
        ("matmul peak (best size, spread)",
         lambda r: f"{r['matmul_peak_flops_per_second'] / 1e9:.0f} GFLOP/s ({r['matmul_peak']['size']}², "
                   f"{r['matmul_peak']['spread']:.1%})"),
        ("features vs original (max relative difference)",
         lambda r: f"{r['features_max_relative_difference']:.1e}"),
    ]  # fmt: skip
    lines = ["| | " + " | ".join(f"{name} ({shapes[name].get('dtype', '-')})" for name in shapes) + " |",
             "| --- |" + " --- |" * len(shapes)]  # fmt: skip
    for label, cell in rows:
        cells = [("skipped" if "skipped" in result else cell(result)) for result in shapes.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for name, result in shapes.items():
        if "skipped" in result:
            lines.append(f"\n{name}: skipped, {result['skipped']}")
    return "\n".join(lines)


def add_bench_parser(commands):
    bench = commands.add_parser(
        "bench",
        help="speed and memory against the original algorithm and the bare LLM (random weights)",
        description="Times the vision features, time to first token and decode of Florence-VL against the original "
        "algorithm (native Florence-2 through generate(max_new_tokens=1), decoder loaded) and the bare LLM, on the "
        "same random weights, and measures peak memory. Prints a markdown table.",
    )
    bench.add_argument("--shapes", default="tiny,base", help="comma-separated: tiny, base, large (default tiny,base)")
    bench.add_argument("--json", help="also write the full results to this JSON file")
    bench.add_argument("--dtype", choices=tuple(DTYPES),
                       help="the dtype of every shape (default: each shape's own: tiny and base float32, large bfloat16)")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="device to measure on (default: cuda if available, else cpu)")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median; default 3)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement (default 1)")
    bench.add_argument("--decode-tokens", type=int, default=16,
                       help="tokens generated per decode measurement (at least 3; default 16)")
    bench.add_argument("--batch-size", type=int, default=8, help="the larger batch (vision and decode)")
    bench.add_argument("--compile", action="store_true",
                       help="also time decoding with a static cache and generate()'s torch.compile (slow to compile)")
    bench.add_argument("--work-dir", help="where the temporary checkpoints are written (default: the system temp)")
    bench.set_defaults(handler=_bench)


def _bench(args) -> int:
    from .errors import CommandError, require_at_least

    shapes = [name.strip() for name in args.shapes.split(",") if name.strip()]
    unknown = [name for name in shapes if name not in SHAPE_NAMES]
    if unknown or not shapes:
        named = f"unknown shape(s) {', '.join(unknown)}" if unknown else f"no shape in {args.shapes!r}"
        raise CommandError(f"--shapes: {named}; choose from {', '.join(SHAPE_NAMES)}")
    require_at_least("--repeats", args.repeats, 1)
    require_at_least("--warmup", args.warmup, 0)
    require_at_least("--decode-tokens", args.decode_tokens, 3)
    require_at_least("--batch-size", args.batch_size, 1)
    report = run_benchmark(shapes, args.device, args.repeats, args.warmup, args.decode_tokens, args.batch_size,
                           args.work_dir, args.compile, log=lambda message: print(message, file=sys.stderr, flush=True),
                           dtype=args.dtype)  # fmt: skip
    previous = None
    if args.json and Path(args.json).is_file():
        try:
            previous = json.loads(Path(args.json).read_text())
        except ValueError:
            previous = None
    print(format_table(report))
    for warning in peak_warnings(report, previous):
        print(warning)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(staging, path)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--memory-worker":
    _, _, kind, folder, device, dtype, tokens = sys.argv
    transformers_logging.disable_progress_bar()
    print(json.dumps(memory_worker(kind, Path(folder), torch.device(device), getattr(torch, dtype), int(tokens))))
