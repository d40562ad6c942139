"""`florence-vl bench`: speed and memory of Florence-VL, side by side with the original algorithm and the bare LLM.

For each model shape, one random-weight checkpoint is written three ways and loaded by three implementations:

- ours: `FlorenceVLForConditionalGeneration` (DaViT once per image, the three task prompts in one BART-encoder call,
  no Florence-2 decoder or LM head);
- original: the algorithm as the original code runs it (`conversion/reference.py`, the verification's reference too),
  expressed with transformers' native `Florence2ForConditionalGeneration` (decoder included) called through
  `generate(max_new_tokens=1)` on the three [image tokens; task prompt] inputs of every image, in one call
  (attending to every position, as the original does), the DaViT tokens and encoder outputs captured on the way;
  then the original's projector (`nn.Sequential` of Linear and GELU) and the LLM on `inputs_embeds`;
- bare LLM: `AutoModelForCausalLM` with the same text weights, decoding as many tokens from the same cache length.

Times are medians over repeats after a warm-up, with the implementations interleaved so that machine noise hits both
sides of each ratio alike. Decode times come from a clock inside `generate` (one tick per generated token), so they
exclude the prefill. Peak memory comes from a fresh worker process per implementation.
"""

import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import median

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
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
from .conversion.reference import OriginalLLM, OriginalVision, mlp_projector
from .conversion.source import florence2_config, read_json
from .families import family
from .modeling import FlorenceVLConfig, FlorenceVLForConditionalGeneration
from .processing import asset_dir, build_processor, florence2_image_processor, sample_image
from .tiny import tiny_config

SHAPE_NAMES = ("tiny", "base", "large")
QUESTION = "What is in the image?"
LLM_FAMILY = family("phi3")  # every shape uses the Phi-3.5 vocabulary (32064 rows), tokenizer and chat template


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
            vocab_size=LLM_FAMILY.checkpoint_vocab_size, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=4096,
            bos_token_id=LLM_FAMILY.bos_token_id, eos_token_id=LLM_FAMILY.eos_token_id,
            pad_token_id=LLM_FAMILY.pad_token_id, tie_word_embeddings=False,
        )  # fmt: skip
        return Shape(name, {"vision_config": vision, "text_config": _bart(768, 6, 12)}, text, 768, torch.float32)
    if name == "large":
        florence2 = florence2_config(read_json(asset_dir("florence-2-large") / "config.json"))
        parts = {"vision_config": florence2.vision_config.to_dict(), "text_config": florence2.text_config.to_dict()}
        text = AutoConfig.from_pretrained(str(LLM_FAMILY.asset_dir))
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
    tokenizer = AutoTokenizer.from_pretrained(str(LLM_FAMILY.asset_dir))
    model, processor = from_pretrained_parts(folder / "florence2", folder / "llm", tokenizer=tokenizer,
                                             template=LLM_FAMILY.name, dtype=shape.dtype, seed=seed)  # fmt: skip
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


@dataclass
class BenchSettings:
    """What one `florence-vl bench` run measures (the CLI's options)."""

    repeats: int = 3
    warmup: int = 1
    decode_tokens: int = 16
    batch_size: int = 8
    compile_decode: bool = False
    int8: bool = False  # int8 weight-only decode against bf16 (torchao, compiled, static cache)
    scaling: bool = False  # time to first token at SCALING_IMAGES images, decode at SCALING_BATCHES (the plot)
    isolate: bool | None = None  # each side in its own worker process; None: when both do not fit at once


SCALING_IMAGES = (1, 2, 4)
SCALING_BATCHES = (1, 4, 16)
SIDES = ("ours", "original")


class Ours:
    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype, quantization_config=None):
        self.model = FlorenceVLForConditionalGeneration.from_pretrained(
            folder / "florence_vl", dtype=dtype, quantization_config=quantization_config)  # fmt: skip
        self.model.to(device).eval()
        self._decode_cache = None

    def modules(self):
        return [self.model]

    def vision(self, batch):
        return self.model.get_image_features(batch["pixel_values"], task_prompt_ids=batch["task_prompt_ids"]).pooler_output

    def first_token(self, batch):
        return self.model.generate(**batch, max_new_tokens=1, do_sample=False)

    scaling_first_token = first_token

    def generate(self, batch, tokens: int, **kwargs):
        return self.model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **kwargs)

    def decode(self, batch, tokens: int, **kwargs):
        """`generate` with the image features cached: only the decode steps are timed, and the prefill of every
        decode run after the first re-reads the features instead of running the vision tower again."""
        if self._decode_cache is None:
            self._decode_cache = self.model.enable_vision_feature_cache()
        self.model.vision_feature_cache = self._decode_cache
        try:
            return self.generate(batch, tokens, **kwargs)
        finally:
            self.model.disable_vision_feature_cache()

    def prefill(self, batch, features):
        inputs = {k: v for k, v in batch.items() if k not in ("pixel_values", "task_prompt_ids")}
        encoded = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        return self.model(**inputs, mm_encoder_outputs=encoded, logits_to_keep=1)


def _projector_layers(folder: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, bias) of each projector layer of the Florence-VL checkpoint in `folder` (one file, or shards)."""
    prefix, state = "model.multi_modal_projector.linears.", {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as weights:
            state.update({key[len(prefix):]: weights.get_tensor(key) for key in weights.keys()
                          if key.startswith(prefix)})  # fmt: skip
    return [(state[f"{index}.weight"], state[f"{index}.bias"]) for index in range(len(state) // 2)]


class Original:
    """The original algorithm on the same weights (`conversion/reference.py`): full Florence-2 through one
    generate(max_new_tokens=1) over the [image; prompt] rows of every image and task prompt, the original's
    projector, then the LLM on inputs_embeds. The LLM alone is the bare-LLM baseline (`decode`,
    `scaling_first_token`)."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype):
        self.config = FlorenceVLConfig.from_pretrained(folder / "florence_vl")
        if self.config.fusion != "channel" or not self.config.include_average_image_token:
            raise ValueError("the original algorithm is channel fusion over all tokens")
        self.florence2 = Florence2ForConditionalGeneration.from_pretrained(folder / "florence2", dtype=dtype)
        self.florence2.to(device).eval()
        self.llm = AutoModelForCausalLM.from_pretrained(folder / "llm", dtype=dtype).to(device).eval()
        self.projector = mlp_projector(_projector_layers(folder / "florence_vl")).to(device, dtype).eval()
        self.reference_vision = OriginalVision(self.florence2, self.projector, self.config.task_prompt_names,
                                               self.config.vision_feature_sources, batch_prompts=True)  # fmt: skip
        self.reference_llm = OriginalLLM(self.llm, self.config.image_token_id)

    def modules(self):
        return [self.florence2, self.projector, self.llm]

    def vision(self, batch):
        return self.reference_vision(batch["pixel_values"], batch["task_prompt_ids"])

    def first_token(self, batch):
        return self.reference_llm.generate(batch["input_ids"], batch["attention_mask"], self.vision(batch),
                                           max_new_tokens=1)  # fmt: skip

    def generate(self, batch, tokens: int, **kwargs):
        return self.reference_llm.generate(batch["input_ids"], batch["attention_mask"], self.vision(batch),
                                           max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)  # fmt: skip

    def decode(self, batch, tokens: int, **kwargs):
        """The bare LLM on the same token ids (the `<image>` placeholders are ordinary rows of its vocabulary)."""
        return self.llm.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **kwargs)  # fmt: skip

    def scaling_first_token(self, batch):
        return self.llm.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=1, do_sample=False)  # fmt: skip


def load_side(kind: str, folder: Path, device: torch.device, dtype: torch.dtype):
    return (Ours if kind == "ours" else Original)(folder, device, dtype)


def _processor(folder: Path):
    return build_processor(FlorenceVLConfig.from_pretrained(folder / "florence_vl"), template=LLM_FAMILY.name)


def make_batch(folder: Path, batch_size: int, device: torch.device, dtype: torch.dtype, images: int = 1,
               processor=None) -> dict:  # fmt: skip
    """The bundled image (`images` times in one prompt) and a short question through the processor, repeated
    `batch_size` times."""
    processor = processor or _processor(folder)
    content = [{"type": "image", "image": sample_image()}] * images + [{"type": "text", "text": QUESTION}]
    inputs = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")  # fmt: skip
    batch = {key: torch.cat([value] * batch_size).to(device) for key, value in inputs.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


def make_batches(folder: Path, settings: BenchSettings, device: torch.device, dtype: torch.dtype) -> dict:
    """Every batch the measures use, keyed (batch size, images per prompt)."""
    keys = {(1, 1), (settings.batch_size, 1)}
    if settings.scaling:
        keys |= {(1, images) for images in SCALING_IMAGES} | {(size, 1) for size in SCALING_BATCHES}
    processor = _processor(folder)
    return {key: make_batch(folder, key[0], device, dtype, images=key[1], processor=processor) for key in sorted(keys)}


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


def _compile_kwargs(device: torch.device) -> dict:
    """generate() compiles the decoding forward for static caches; on CPU it must be asked to."""
    config = CompileConfig(mode="default" if device.type == "cpu" else "reduce-overhead", dynamic=False)
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


def side_measures(side, batches: dict, settings: BenchSettings, device: torch.device) -> dict:
    """name -> (measure, warm-up runs[, timed runs]): the same names for both sides, so that `ours` and `original`
    pair up (timed runs default to settings.repeats). The original side's decode and scaling measures are the bare
    LLM's."""
    size, tokens, warmup = settings.batch_size, settings.decode_tokens, settings.warmup
    one, many = batches[(1, 1)], batches[(size, 1)]
    measures = {
        "vision_batch1": (_timed(lambda: side.vision(one), device), warmup),
        f"vision_batch{size}": (_timed(lambda: side.vision(many), device), 0),
        "first_token": (_timed(lambda: side.first_token(one), device), warmup),
        "decode_batch1": (_decode_clock(side.decode, one, tokens, device), warmup),
        f"decode_batch{size}": (_decode_clock(side.decode, many, tokens, device), warmup),
        "decode_batch1_static_cache": (
            _decode_clock(side.decode, one, tokens, device, cache_implementation="static"), warmup),
    }  # fmt: skip
    if settings.compile_decode:
        compiled = _decode_clock(side.decode, one, tokens, device, **_compile_kwargs(device))
        measures["decode_batch1_static_cache_compiled"] = (compiled, max(warmup, 1))
    if settings.scaling:
        # One timed run each, after the warm-ups above: at the large shapes a batch-16 prefill alone takes minutes,
        # and a decode run's per-token time is already the median of its steps.
        for images in SCALING_IMAGES:
            batch = batches[(1, images)]
            measures[f"first_token_images{images}"] = (_timed(lambda b=batch: side.scaling_first_token(b), device), 0, 1)
        for batch_size in SCALING_BATCHES:
            if f"decode_batch{batch_size}" not in measures:
                batch = batches[(batch_size, 1)]
                measures[f"decode_batch{batch_size}"] = (_decode_clock(side.decode, batch, tokens, device), 0, 1)
    return measures


def alone(measures: dict, repeats: int) -> dict[str, float]:
    """Each measure after its own warm-up, `repeats` times (the median): one side in its own process."""
    times = {}
    for name, (fn, warmup, *runs) in measures.items():
        times[name] = interleaved({name: fn}, runs[0] if runs else repeats, warmup)[name]
    return times


def paired(ours: dict, original: dict, repeats: int) -> tuple[dict, dict]:
    """Each measure of both sides interleaved (`interleaved`): both sides loaded in this process."""
    times = {"ours": {}, "original": {}}
    for name, (fn, warmup, *runs) in ours.items():
        pair = interleaved({"ours": fn, "original": original[name][0]}, runs[0] if runs else repeats, warmup)
        times["ours"][name], times["original"][name] = pair["ours"], pair["original"]
    return times["ours"], times["original"]


def side_info(kind: str, side, batches: dict) -> dict:
    """What is counted once per side: FLOPs, parameters, bytes read per decode step, and the fused features of the
    first batch (compared across sides)."""
    one = batches[(1, 1)]
    vision_flops, features = count_flops(lambda: side.vision(one))
    info = {"vision_flops": vision_flops, "parameters": _parameters(*side.modules()), "features": features}
    if kind == "ours":
        model = side.model
        info["prefill_flops"] = count_flops(lambda: side.prefill(one, features))[0]
        info["first_token_flops"] = count_flops(lambda: side.first_token(one))[0]
        info["num_image_tokens"] = model.config.num_image_tokens
        info["prompt_tokens"] = int(one["input_ids"].shape[1])
        info["decode_bytes_per_step"] = decode_bytes_per_step(model)
    else:
        info["bare_llm_parameters"] = _parameters(side.llm)
        decoder = [side.florence2.model.language_model.decoder, side.florence2.lm_head]
        shared = _parameters(side.florence2.model.language_model.shared)[1]
        info["florence2_decoder_bytes"] = _parameters(*decoder)[1] - shared
    return info


def ours_extras(ours: Ours, folder: Path, batches: dict, features, settings: BenchSettings, device, dtype,
                log) -> dict:  # fmt: skip
    """Measures of our side alone: the LLM prefill on the features of `side_info`, and int8 against the model
    dtype."""
    one = batches[(1, 1)]
    extras = interleaved({"prefill": _timed(lambda: ours.prefill(one, features), device)}, settings.repeats,
                         settings.warmup)  # fmt: skip
    if settings.int8:
        extras.update(int8_comparison(ours, folder, one, settings, device, dtype))
        log("int8 decode timed")
    return extras


def int8_comparison(ours: Ours, folder: Path, batch: dict, settings: BenchSettings, device, dtype) -> dict:
    """int8 weight-only (torchao) decoding batch 1 with a static cache and torch.compile (the compiler fuses the
    dequantization into the matmul; eager int8 dequantizes every weight per call), against the model dtype's
    default decode (eager, dynamic cache: on CPU its fastest path, see `--compile`), timed interleaved in one
    process; and how many greedy tokens of both agree from the same prompt."""
    from .quantization import int8_weight_only_config

    quantized = Ours(folder, device, dtype, quantization_config=int8_weight_only_config())
    tokens, compiled = settings.decode_tokens, _compile_kwargs(device)
    times = interleaved({"model_dtype": _decode_clock(ours.decode, batch, tokens, device),
                         "int8": _decode_clock(quantized.decode, batch, tokens, device, **compiled)},
                        settings.repeats, max(settings.warmup, 1))  # fmt: skip
    reference = ours.decode(batch, tokens)[:, -tokens:]
    answer = quantized.decode(batch, tokens, **compiled)[:, -tokens:]
    extras = {"int8_decode": times["int8"], "model_dtype_decode": times["model_dtype"],
              "int8_token_agreement": (answer == reference).float().mean().item(),
              "int8_decode_bytes_per_step": decode_bytes_per_step(quantized.model)}  # fmt: skip
    del quantized
    gc.collect()
    return extras


def _stored_bytes(tensor) -> int:
    """Bytes a tensor holds; a torchao int8 weight holds its int8 values and their scales."""
    if hasattr(tensor, "qdata"):
        parts = [tensor.qdata, tensor.scale]  # symmetric: the stored zero points are not read
        return sum(part.numel() * part.element_size() for part in parts if isinstance(part, torch.Tensor))
    return tensor.numel() * tensor.element_size()


def decode_bytes_per_step(model) -> int:
    """The bytes a decode step must read: every weight of the LLM and the LM head once, except the input
    embeddings, of which it reads one row per token (the whole matrix when the LM head is tied to it)."""
    llm = model.model.language_model
    embeddings = llm.get_input_embeddings().weight
    # Keyed by object: tied weights are one object, and tensor subclasses (torchao's int8) have no data pointer.
    tensors = {id(t): t for module in (llm, model.lm_head) for t in (*module.parameters(), *module.buffers())}
    total = sum(_stored_bytes(tensor) for tensor in tensors.values())
    return total if model.config.text_config.tie_word_embeddings else total - _stored_bytes(embeddings)


_PEAKS: dict = {}


def machine_peak(device: torch.device, dtype: torch.dtype) -> dict:
    """`matmul_peak` once per run, device and dtype: every shape's fractions divide by the same measurement."""
    key = (str(device), dtype)
    if key not in _PEAKS:
        _PEAKS[key] = matmul_peak(device, dtype)
    return _PEAKS[key]


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


def count_flops(fn) -> tuple[int, object]:
    """(FLOPs of `fn()`, its result)."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), result


def _parameter_counts(shape: Shape) -> dict[str, int]:
    with torch.device("meta"):
        florence2 = Florence2ForConditionalGeneration(Florence2Config(**shape.florence2))
        llm = AutoModelForCausalLM.from_config(shape.text)
    decoder = sum(p.numel() for p in florence2.model.language_model.decoder.parameters())
    return {"florence2": sum(p.numel() for p in florence2.parameters()), "florence2_decoder": decoder,
            "llm": sum(p.numel() for p in llm.parameters())}  # fmt: skip


def memory_plan(shape: Shape, available: int, settings: BenchSettings) -> tuple[bool | None, int, int]:
    """(isolate, bytes needed, bytes available): both sides in one process when three times their weights fit (the
    weights, loading, activations), else each side in its own process when one side at a time fits (and the int8
    copy beside ours); isolate None when neither fits."""
    counts, element = _parameter_counts(shape), torch.finfo(shape.dtype).bits // 8
    together = 3 * element * (counts["florence2"] + counts["llm"])
    ours = counts["florence2"] - counts["florence2_decoder"] + counts["llm"] * (1.5 if settings.int8 else 1)
    alone_needed = int(1.5 * element * max(ours, counts["florence2"] + counts["llm"]))
    if settings.isolate is False or (settings.isolate is None and together <= available):
        return (False, together, available) if together <= available else (None, together, available)
    return (True, alone_needed, available) if alone_needed <= available else (None, alone_needed, available)


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


def side_worker(kind: str, folder: Path, device: torch.device, dtype: torch.dtype, settings: BenchSettings,
                measure: bool, log=print) -> dict:  # fmt: skip
    """One side in this process: its peak memory answering one question (vision, prefill, `decode_tokens` decoded:
    CUDA's peak allocation, or on CPU the resident-set high-water mark above the level before loading); then, with
    `measure`, every timing of `side_measures` (each alone), `side_info` (features written to the folder) and, for
    ours, `ours_extras`."""
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
    side = load_side(kind, folder, device, dtype)
    with torch.no_grad():
        side.generate(batch, settings.decode_tokens)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _proc_status("VmHWM")
    result = {"memory": {"peak_bytes": peak - before, "weights_bytes": _parameters(*side.modules())[1]}}
    if not measure:
        return result
    with torch.no_grad():
        batches = make_batches(folder, settings, device, dtype)
        result["times"] = alone(side_measures(side, batches, settings, device), settings.repeats)
        log(f"{kind}: timed")
        info = side_info(kind, side, batches)
        features = info.pop("features")
        features_file = folder / f"features-{kind}.safetensors"
        save_file({"features": features.contiguous()}, str(features_file))
        result["info"] = dict(info, features_file=str(features_file))
        if kind == "ours":
            result["extras"] = ours_extras(side, folder, batches, features, settings, device, dtype, log)
    return result


def _run_worker(kind, folder, device, dtype, settings: BenchSettings, measure: bool, log) -> dict:
    command = [sys.executable, "-m", "florence_vl_hf.benchmark", "--worker", kind, str(folder), str(device),
               str(dtype).removeprefix("torch."), json.dumps(asdict(settings)), "1" if measure else "0"]  # fmt: skip
    # The worker's progress and errors go straight to this process's stderr.
    process = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    if process.returncode != 0:
        raise RuntimeError(f"benchmark worker {kind} failed (exit {process.returncode}); its error is printed above")
    result = json.loads(process.stdout.strip().splitlines()[-1])
    if measure:
        result["info"]["features"] = load_file(result["info"].pop("features_file"))["features"]
    return result


def measure_isolated(folder, device, dtype, settings: BenchSettings, log) -> dict:
    """Each side in its own worker process, one after the other (for shapes whose two sides do not fit at once)."""
    sides = {}
    for kind in SIDES:
        sides[kind] = _run_worker(kind, folder, device, dtype, settings, True, log)
        log(f"{kind} measured in its own process")
    return sides


def measure_together(folder, device, dtype, settings: BenchSettings, log) -> dict:
    """Peak memory from a fresh worker per side, then both sides in this process, every timing interleaved."""
    sides = {kind: _run_worker(kind, folder, device, dtype, settings, False, log) for kind in SIDES}
    log("peak memory measured")
    ours, original = Ours(folder, device, dtype), Original(folder, device, dtype)
    batches = make_batches(folder, settings, device, dtype)
    times = paired(side_measures(ours, batches, settings, device), side_measures(original, batches, settings, device),
                   settings.repeats)  # fmt: skip
    log("timed")
    for kind, side, side_times in (("ours", ours, times[0]), ("original", original, times[1])):
        sides[kind].update(times=side_times, info=side_info(kind, side, batches))
    sides["ours"]["extras"] = ours_extras(ours, folder, batches, sides["ours"]["info"]["features"], settings, device,
                                          dtype, log)  # fmt: skip
    del ours, original
    gc.collect()
    return sides


def summarize(sides: dict, settings: BenchSettings, peak: dict, bandwidth: float) -> dict:
    """The shape's results from both sides' measurements: times, ratios, floors, memory."""
    ours, original = sides["ours"], sides["original"]
    t, r, size = ours["times"], original["times"], settings.batch_size
    info, original_info, extras = ours["info"], original["info"], ours["extras"]
    scale = max(1.0, original_info["features"].abs().max().item())
    difference = (info["features"].float() - original_info["features"].float()).abs().max().item() / scale
    peak_flops = peak["flops_per_second"]
    result = {
        "num_image_tokens": info["num_image_tokens"],
        "prompt_tokens": info["prompt_tokens"],
        "parameters": {"ours": info["parameters"][0], "original": original_info["parameters"][0],
                       "bare_llm": original_info["bare_llm_parameters"][0]},
        "weights_bytes": {"ours": info["parameters"][1], "original": original_info["parameters"][1],
                          "bare_llm": original_info["bare_llm_parameters"][1]},
        "florence2_decoder_bytes": original_info["florence2_decoder_bytes"],
        "features_max_relative_difference": difference,
        "vision_seconds_per_image": {
            "ours_batch1": t["vision_batch1"], "original_batch1": r["vision_batch1"],
            f"ours_batch{size}": t[f"vision_batch{size}"] / size,
            f"original_batch{size}": r[f"vision_batch{size}"] / size,
        },
        "vision_speedup_vs_original": r["vision_batch1"] / t["vision_batch1"],
        f"vision_speedup_vs_original_batch{size}": r[f"vision_batch{size}"] / t[f"vision_batch{size}"],
        "time_to_first_token_seconds": {"ours": t["first_token"], "original": r["first_token"]},
        "time_to_first_token_speedup_vs_original": r["first_token"] / t["first_token"],
    }  # fmt: skip
    decode = {}
    for name in t:
        if name.startswith("decode_"):
            label = name.removeprefix("decode_")
            decode[f"ours_{label}"], decode[f"bare_llm_{label}"] = t[name] * 1000, r[name] * 1000
    result["decode_ms_per_token"] = decode
    result["decode_overhead_vs_bare_llm"] = decode["ours_batch1"] / decode["bare_llm_batch1"]
    result[f"decode_overhead_vs_bare_llm_batch{size}"] = decode[f"ours_batch{size}"] / decode[f"bare_llm_batch{size}"]
    result["decode_tokens_per_second"] = {f"ours_batch{n}": 1000 * n / decode[f"ours_batch{n}"] for n in (1, size)}
    result["static_cache_decode_speedup"] = decode["ours_batch1"] / decode["ours_batch1_static_cache"]
    if settings.compile_decode:
        result["compiled_decode_speedup"] = decode["ours_batch1"] / decode["ours_batch1_static_cache_compiled"]
        result["compiled_decode_overhead_vs_bare_llm"] = (
            decode["ours_batch1_static_cache_compiled"] / decode["bare_llm_batch1_static_cache_compiled"])

    # Floors: the time the machine needs at its measured peaks. Prefill: FLOPs (vision included) / matmul peak.
    # Decode: the bytes a step must read / read bandwidth.
    ttft_floor = info["first_token_flops"] / peak_flops
    decode_floor = info["decode_bytes_per_step"] / bandwidth
    result["time_to_first_token_floor_seconds"] = ttft_floor
    result["time_to_first_token_over_floor"] = t["first_token"] / ttft_floor
    result["decode_floor_ms_per_token"] = decode_floor * 1000
    result["decode_over_floor"] = t["decode_batch1"] / decode_floor
    result["memory_bandwidth_bytes_per_second"] = bandwidth
    result["decode_bandwidth_fraction"] = decode_floor / t["decode_batch1"]
    if settings.int8:
        # Named for the large shapes' dtype; the denominator is the model dtype's default decode, timed beside it.
        result["int8_decode_ms_per_token"] = extras["int8_decode"] * 1000
        result["model_dtype_decode_ms_per_token"] = extras["model_dtype_decode"] * 1000
        result["int8_decode_speedup_vs_bf16"] = extras["model_dtype_decode"] / extras["int8_decode"]
        result["int8_decode_over_floor"] = extras["int8_decode"] / (extras["int8_decode_bytes_per_step"] / bandwidth)
        result["int8_token_agreement"] = extras["int8_token_agreement"]
    if settings.scaling:
        result["scaling"] = {
            "first_token_seconds_by_images": {side: {str(n): times[f"first_token_images{n}"] for n in SCALING_IMAGES}
                                              for side, times in (("ours", t), ("bare_llm", r))},
            "decode_ms_per_token_by_batch": {side: {str(n): times[f"decode_batch{n}"] * 1000 for n in SCALING_BATCHES}
                                             for side, times in (("ours", t), ("bare_llm", r))},
        }  # fmt: skip

    memory = {kind: sides[kind]["memory"]["peak_bytes"] for kind in SIDES}
    result["peak_memory_bytes"] = memory
    result["peak_memory_ratio_vs_original"] = memory["ours"] / memory["original"]
    result["peak_memory_saved_bytes"] = memory["original"] - memory["ours"]

    result["prefill_seconds"] = extras["prefill"]
    result["matmul_peak_flops_per_second"] = peak_flops
    result["matmul_peak"] = peak
    result["vision_flops"] = {"ours": info["vision_flops"], "original": original_info["vision_flops"]}
    result["prefill_flops"] = info["prefill_flops"]
    result["first_token_flops"] = info["first_token_flops"]
    result["vision_fraction_of_matmul_peak"] = info["vision_flops"] / t["vision_batch1"] / peak_flops
    result["prefill_fraction_of_matmul_peak"] = info["prefill_flops"] / extras["prefill"] / peak_flops
    return result


@torch.no_grad()
def bench_shape(name: str, device: torch.device, settings: BenchSettings | None = None, work_dir=None, log=print,
                dtype: str | None = None) -> dict:  # fmt: skip
    settings = settings or BenchSettings()
    shape = get_shape(name, dtype)
    isolate, needed, available = memory_plan(shape, _available_memory(device), settings)
    if isolate is None:
        return {"skipped": f"needs about {needed / 2**30:.1f} GiB of {device.type} memory, "
                           f"{available / 2**30:.1f} GiB available"}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=f"florence-vl-bench-{name}-", dir=work_dir) as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        prepare_checkpoints(shape, folder)
        log(f"[{name}] checkpoints written in {time.perf_counter() - started:.0f}s")
        # The machine's peaks first, while no model is loaded.
        peak, bandwidth = machine_peak(device, shape.dtype), read_bandwidth(device)
        measure = measure_isolated if isolate else measure_together
        sides = measure(folder, device, shape.dtype, settings, lambda message: log(f"[{name}] {message}"))
        result = {"dtype": str(shape.dtype).removeprefix("torch."), "image_size": shape.image_size,
                  "isolated": isolate, **summarize(sides, settings, peak, bandwidth)}  # fmt: skip
    result["seconds"] = time.perf_counter() - started
    return result


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": str(device)}  # fmt: skip
    import transformers

    info["transformers"] = transformers.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    return info


def run_benchmark(shapes, device="cpu", settings: BenchSettings | None = None, work_dir=None, log=print,
                  dtype: str | None = None) -> dict:  # fmt: skip
    settings = settings or BenchSettings()
    device = torch.device(device)
    for name in shapes:
        get_shape(name, dtype)  # unknown names and dtypes fail before any work
    transformers_logging.disable_progress_bar()
    report = {"machine": machine_info(device), "settings": dict(asdict(settings), dtype=dtype), "shapes": {}}
    for name in shapes:
        report["shapes"][name] = bench_shape(name, device, settings, work_dir, log=log, dtype=dtype)
    return report


def _format(value, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "ms":
        return f"{value:.2f} ms" if value < 1000 else f"{value / 1000:.2f} s"
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


def _value(key: str, unit: str):
    return lambda result: _format(result.get(key), unit)


def format_table(report: dict) -> str:
    """A markdown table: one row per measurement, one column per shape."""
    shapes = report["shapes"]
    batch = report["settings"]["batch_size"]
    rows = [
        ("parameters, ours / original", _pair("parameters", "ours", "original", "count")),
        ("weights, ours / original", _pair("weights_bytes", "ours", "original", "bytes")),
        ("Florence-2 decoder + LM head (not loaded)", _value("florence2_decoder_bytes", "bytes")),
        ("vision per image, batch 1: ours / original",
         _pair("vision_seconds_per_image", "ours_batch1", "original_batch1", "s")),
        ("**vision speed-up vs original, batch 1**", _value("vision_speedup_vs_original", "x")),
        (f"vision per image, batch {batch}: ours / original",
         _pair("vision_seconds_per_image", f"ours_batch{batch}", f"original_batch{batch}", "s")),
        (f"vision speed-up vs original, batch {batch}", _value(f"vision_speedup_vs_original_batch{batch}", "x")),
        ("time to first token: ours / original",
         _pair("time_to_first_token_seconds", "ours", "original", "s")),
        ("time to first token: floor (FLOPs incl. vision / matmul peak)",
         _value("time_to_first_token_floor_seconds", "s")),
        ("**time to first token over its floor**", _value("time_to_first_token_over_floor", "x")),
        ("decode per token, batch 1: ours / bare LLM",
         _pair("decode_ms_per_token", "ours_batch1", "bare_llm_batch1", "ms")),
        ("**decode overhead vs bare LLM, batch 1**", _value("decode_overhead_vs_bare_llm", "x")),
        ("decode per token: floor (weight bytes read / bandwidth)", _value("decode_floor_ms_per_token", "ms")),
        ("**decode over its floor, batch 1**", _value("decode_over_floor", "x")),
        (f"decode per token, batch {batch}: ours / bare LLM",
         _pair("decode_ms_per_token", f"ours_batch{batch}", f"bare_llm_batch{batch}", "ms")),
        (f"decode overhead vs bare LLM, batch {batch}", _value(f"decode_overhead_vs_bare_llm_batch{batch}", "x")),
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
        ("int8 weight-only decode (compiled) / model dtype (eager), batch 1",
         lambda r: f"{_format(r.get('int8_decode_ms_per_token'), 'ms')} / "
                   f"{_format(r.get('model_dtype_decode_ms_per_token'), 'ms')}"),
        ("**int8 decode speed-up vs model dtype**", _value("int8_decode_speedup_vs_bf16", "x")),
        ("int8 decode over its floor (int8 bytes / bandwidth)", _value("int8_decode_over_floor", "x")),
        ("int8 greedy tokens equal to the model dtype's", _value("int8_token_agreement", "%")),
        ("peak memory: ours / original", _pair("peak_memory_bytes", "ours", "original", "bytes")),
        ("**peak memory ratio vs original**", _value("peak_memory_ratio_vs_original", "x")),
        ("vision pass, fraction of matmul peak", _value("vision_fraction_of_matmul_peak", "%")),
        ("prefill, fraction of matmul peak", _value("prefill_fraction_of_matmul_peak", "%")),
        ("matmul peak (best size, spread)",
         lambda r: f"{r['matmul_peak_flops_per_second'] / 1e9:.0f} GFLOP/s ({r['matmul_peak']['size']}², "
                   f"{r['matmul_peak']['spread']:.1%})"),
        ("features vs original (max relative difference)",
         lambda r: f"{r['features_max_relative_difference']:.1e}"),
        ("sides measured", lambda r: "one process each" if r.get("isolated") else "together, interleaved"),
        ("bench time for this shape", _value("seconds", "s")),
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


def write_scaling_plot(report: dict, path) -> Path:
    """A PNG: per shape, time to first token against images per prompt and decode ms/token against batch size, for
    ours and the bare LLM (matplotlib: the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError as error:
        raise ImportError('the plot needs matplotlib: pip install "florence-vl-hf[plot]"') from error
    shapes = {name: result["scaling"] for name, result in report["shapes"].items() if "scaling" in result}
    if not shapes:
        raise ValueError("no shape has scaling measurements (run the bench with the plot requested)")
    figure, axes = pyplot.subplots(len(shapes), 2, figsize=(10, 3.6 * len(shapes)), squeeze=False)
    panels = (("first_token_seconds_by_images", "images per prompt", "time to first token (s)"),
              ("decode_ms_per_token_by_batch", "batch size", "decode ms / token"))  # fmt: skip
    for row, (name, scaling) in zip(axes, shapes.items()):
        dtype = report["shapes"][name].get("dtype", "")
        for axis, (key, xlabel, ylabel) in zip(row, panels):
            for side, label in (("ours", "Florence-VL (ours)"), ("bare_llm", "bare LLM")):
                points = sorted((int(x), y) for x, y in scaling[key][side].items())
                axis.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
            axis.set_xscale("log", base=2)
            axis.set_xticks([int(x) for x in scaling[key]["ours"]], [str(x) for x in scaling[key]["ours"]])
            axis.set(xlabel=xlabel, ylabel=ylabel, title=f"{name} ({dtype})")
            axis.set_ylim(bottom=0)
            axis.grid(alpha=0.3)
            axis.legend()
    machine = report.get("machine", {})
    figure.suptitle(f"florence-vl bench on {machine.get('gpu') or machine.get('cpu') or machine.get('processor', '')}"
                    f" ({machine.get('torch_threads', '?')} threads)")  # fmt: skip
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(staging, dpi=110)
    pyplot.close(figure)
    os.replace(staging, path)
    return path


def add_bench_parser(commands):
    bench = commands.add_parser(
        "bench",
        help="speed and memory against the original algorithm and the bare LLM (random weights)",
        description="Times the vision features, time to first token and decode of Florence-VL against the original "
        "algorithm (native Florence-2 through generate(max_new_tokens=1), decoder loaded) and the bare LLM, on the "
        "same random weights, against the machine's floors (matmul peak, read bandwidth), and measures peak memory. "
        "Prints a markdown table.",
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
    bench.add_argument("--int8", action="store_true",
                       help="also time int8 weight-only decode (torchao: the int8 extra) against the model dtype, "
                       "both compiled with a static cache")
    bench.add_argument("--plot", help="also measure time to first token at 1, 2, 4 images and decode at batch 1, 4, "
                       "16, and write them as a PNG plot to this path (matplotlib: the plot extra)")
    bench.add_argument("--isolate", action="store_true",
                       help="measure each side in its own worker process (default: only when both do not fit)")
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
    for option, wanted, module, extra in (("--int8", args.int8, "torchao", "int8"),
                                          ("--plot", args.plot, "matplotlib", "plot")):  # fmt: skip
        if wanted and importlib.util.find_spec(module) is None:
            raise CommandError(f'{option} needs {module}: pip install "florence-vl-hf[{extra}]"')
    settings = BenchSettings(args.repeats, args.warmup, args.decode_tokens, args.batch_size, args.compile,
                             int8=args.int8, scaling=bool(args.plot), isolate=True if args.isolate else None)  # fmt: skip
    report = run_benchmark(shapes, args.device, settings, args.work_dir,
                           log=lambda message: print(message, file=sys.stderr, flush=True), dtype=args.dtype)  # fmt: skip
    previous = None
    if args.json and Path(args.json).is_file():
        try:
            previous = json.loads(Path(args.json).read_text())
        except ValueError:
            previous = None
    print(format_table(report))
    for warning in peak_warnings(report, previous):
        print(warning)
    if args.plot:
        print(f"\nwrote {write_scaling_plot(report, args.plot)}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(staging, path)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__" and len(sys.argv) == 8 and sys.argv[1] == "--worker":
    _, _, kind, folder, device, dtype, settings, measure = sys.argv
    transformers_logging.disable_progress_bar()
    outcome = side_worker(kind, Path(folder), torch.device(device), getattr(torch, dtype),
                          BenchSettings(**json.loads(settings)), measure == "1",
                          log=lambda message: print(message, file=sys.stderr, flush=True))  # fmt: skip
    print(json.dumps(outcome))
