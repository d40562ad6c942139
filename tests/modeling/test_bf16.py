"""bf16 on CPU: the model computes in bf16 throughout (no silent float32 upcasts outside transformers' documented
fp32 islands), every attention runs through SDPA with bf16 inputs, and the results follow the same weights in float32
within bf16's resolution (benchmarks/bf16_findings.md lists what was checked).

Bounds: bf16 keeps 8 significant bits, so one rounding is off by up to 2^-8 (0.39 %) relative to the value. The tiny
models' outputs pass through a few dozen rounded ops (DaViT, BART encoder, projector, LLM), and LayerNorm / RMSNorm
keep the errors from compounding; measured max|bf16 - fp32| / max|fp32| over 4 seeds x 2 LLMs: depth feature
0.0052-0.0062, fused image features 0.0059-0.0096, prefill logits 0.0062-0.0085 (AMD EPYC, avx512_bf16, torch 2.13).
The bound 2^-5 (= 8 roundings' worth) leaves ~3x margin over the largest; a missing or doubled module, a float16-like
overflow or a wrong weight gives differences of order 1.
"""

import pytest
import torch
import torch.nn.functional as F
from test_features import build, native_features, native_florence2
from test_modeling import chat_inputs
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForImageTextToText

from florence_vl_hf.build import build_random_model, save_hub_folder
from florence_vl_hf.modeling.modeling_florence_vl import CACHE_KWARG
from florence_vl_hf.precision import max_relative_difference
from florence_vl_hf.tiny import tiny_config

BF16 = torch.bfloat16
BOUND = 2**-5
# transformers modules that compute in float32 by design in a bf16 model (each casts its result back to bf16):
# RMSNorm (variance and normalisation in fp32, as Phi-3 / Llama were trained), the rotary embedding (cos/sin from the
# fp32 inv_freq buffer), and DaViT's channel attention, whose q/k/v are strided views that PyTorch's CPU flash kernel
# does not take, so SDPA falls back to its math kernel, which computes bf16 inputs in fp32 on the CPU.
FP32_BY_DESIGN = {"Phi3RMSNorm", "LlamaRMSNorm", "Phi3RotaryEmbedding", "LlamaRotaryEmbedding",
                  "Florence2VisionChannelAttention"}  # fmt: skip
OURS = {"FlorenceVLForConditionalGeneration", "FlorenceVLModel", "FlorenceVLVisionTower",
        "FlorenceVLMultiModalProjector"}  # fmt: skip
FLASH = "aten._scaled_dot_product_flash_attention_for_cpu.default"


@pytest.fixture(scope="module", params=["phi3", "llama3"])
def models(request, tmp_path_factory, shapes_image):
    """(bf16 model, fp32 model, processor, fp32 inputs): random weights, perturbed so that no norm sits at identity,
    rounded to bf16 and saved; the folder loaded with from_pretrained in each dtype (the fp32 one holds exactly the
    bf16 values, so only the compute dtype differs)."""
    model, processor = build_random_model(tiny_config(request.param), seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    folder = save_hub_folder(model.to(BF16), processor, tmp_path_factory.mktemp(f"bf16-{request.param}"))
    low = AutoModelForImageTextToText.from_pretrained(folder, dtype=BF16).eval()
    high = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return low, high, processor, chat_inputs(processor, shapes_image)


def bf16_inputs(inputs):
    return dict(inputs, pixel_values=inputs["pixel_values"].to(BF16))


def run_all(model, inputs):
    """get_image_features, a prefill forward and one decode step, as generate runs them."""
    batch = bf16_inputs(inputs) if model.dtype == BF16 else dict(inputs)
    with torch.no_grad():
        model.get_image_features(batch["pixel_values"], task_prompt_ids=batch["task_prompt_ids"])
        prefill = model(**batch, use_cache=True)
        next_token = prefill.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(next_token)], dim=1)
        decode = model(input_ids=next_token, attention_mask=mask, cache=getattr(prefill, CACHE_KWARG), use_cache=True)
    return prefill, decode


class ModuleStack:
    """The class names of the modules whose forward is running, innermost last."""

    def __init__(self, model):
        self.names = []
        self.handles = []
        for module in model.modules():
            self.handles.append(module.register_forward_pre_hook(lambda m, args: self.names.append(type(m).__name__)))
            self.handles.append(module.register_forward_hook(lambda m, args, out: self.names.pop() and None))

    def innermost(self):
        return self.names[-1] if self.names else "<outside the model>"

    def remove(self):
        for handle in self.handles:
            handle.remove()


def floating(value):
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):  # ModelOutput included
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in floating(item)]
    return []


class Float32Ops(TorchDispatchMode):
    """Innermost module class -> ops that produced a float32 tensor (SDPA flash's float32 logsumexp, an internal
    by-product next to the bf16 attention output, is left out)."""

    def __init__(self, stack):
        super().__init__()
        self.stack = stack
        self.found = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = floating(out[:1] if str(func) == FLASH else out)
        if any(tensor.dtype == torch.float32 for tensor in outputs):
            self.found.setdefault(self.stack.innermost(), set()).add(str(func))
        return out


class SdpaCalls(TorchFunctionMode):
    """(innermost module class, q/k/v dtypes) of every F.scaled_dot_product_attention call."""

    def __init__(self, stack):
        super().__init__()
        self.stack = stack
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls.append((self.stack.innermost(), tuple(t.dtype for t in args[:3])))
        return func(*args, **(kwargs or {}))


class Kernels(TorchDispatchMode):
    """(innermost module class, aten op, input dtypes) of every attention kernel and every bmm."""

    def __init__(self, stack):
        super().__init__()
        self.stack = stack
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in str(func) or str(func) == "aten.bmm.default":
            self.calls.append((self.stack.innermost(), str(func), tuple(t.dtype for t in args[:3])))
        return func(*args, **(kwargs or {}))


def test_every_module_outputs_bf16(models):
    """Forward hooks on every module (ours and transformers'): no float32 tensor among any module's outputs, over
    image features, prefill and a decode step; the KV cache is bf16 too."""
    low, _, _, inputs = models
    wrong = set()

    def check(module, args, output):
        for tensor in floating(output):
            if tensor.dtype != BF16:
                wrong.add((type(module).__name__, tensor.dtype))

    handles = [module.register_forward_hook(check) for module in low.modules()]
    try:
        prefill, decode = run_all(low, inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert not wrong
    assert prefill.logits.dtype == decode.logits.dtype == prefill.image_hidden_states.dtype == BF16
    cache = getattr(decode, CACHE_KWARG)
    assert {t.dtype for layer in cache.layers for t in (layer.keys, layer.values)} == {BF16}


def test_float32_only_inside_transformers_fp32_by_design_modules(models):
    """Every op that produces a float32 tensor in a bf16 model runs inside one of the transformers modules that compute
    in float32 by design (FP32_BY_DESIGN), none in Florence-VL's own code (fusion, projector, placeholder scatter,
    prompt embedding, positions) and none in the other transformers modules (LayerNorm, GELU, BART, DaViT's window
    attention, the LLM's attention and MLP)."""
    low, _, _, inputs = models
    stack = ModuleStack(low)
    try:
        with Float32Ops(stack) as log:
            run_all(low, inputs)
    finally:
        stack.remove()
    assert set(log.found) <= FP32_BY_DESIGN, {k: v for k, v in log.found.items() if k not in FP32_BY_DESIGN}
    assert not set(log.found) & OURS


def test_loaded_in_bf16_every_attention_is_sdpa_with_bf16_inputs(models):
    low, _, _, inputs = models
    tower = low.model.vision_tower
    configs = {"model": low.config, "vision tower": tower.config, "DaViT": tower.backbone.config,
               "BART encoder": tower.encoder.config, "LLM": low.model.language_model.config}  # fmt: skip
    assert {name: config._attn_implementation for name, config in configs.items()} == dict.fromkeys(configs, "sdpa")

    stack = ModuleStack(low)
    try:
        with SdpaCalls(stack) as sdpa, Kernels(stack) as kernels:
            run_all(low, inputs)
    finally:
        stack.remove()
    attention = "Phi3Attention" if low.config.text_config.model_type == "phi3" else "LlamaAttention"
    davit = low.config.vision_config.vision_config
    expected = {"Florence2VisionWindowAttention": 2 * sum(davit.depths),  # image features, then again in the prefill
                "Florence2VisionChannelAttention": 2 * sum(davit.depths),
                "BartAttention": 2 * tower.encoder.config.encoder_layers,
                attention: 2 * low.config.text_config.num_hidden_layers}  # prefill and decode step  # fmt: skip
    assert {name: sum(1 for n, _ in sdpa.calls if n == name) for name in expected} == expected
    assert len(sdpa.calls) == sum(expected.values())
    assert {dtypes for _, dtypes in sdpa.calls} == {(BF16, BF16, BF16)}
    # PyTorch's CPU flash kernel, in bf16, for all but DaViT's channel attention (strided q/k/v: the math kernel,
    # whose float32 matmuls test_float32_only_inside_transformers_fp32_by_design_modules allows there only).
    flash = [(name, dtypes) for name, op, dtypes in kernels.calls if op == FLASH]
    assert sorted({name for name, _ in flash}) == sorted(set(expected) - {"Florence2VisionChannelAttention"})
    assert len(flash) == sum(expected.values()) - expected["Florence2VisionChannelAttention"]
    assert {dtypes for _, dtypes in flash} == {(BF16, BF16, BF16)}


def test_image_features_in_bf16_follow_float32(models):
    low, high, _, inputs = models
    with torch.no_grad():
        reference = high.get_image_features(inputs["pixel_values"], task_prompt_ids=inputs["task_prompt_ids"])
        result = low.get_image_features(inputs["pixel_values"].to(BF16), task_prompt_ids=inputs["task_prompt_ids"])
    assert result.pooler_output.dtype == result.last_hidden_state.dtype == BF16
    assert max_relative_difference(result.last_hidden_state, reference.last_hidden_state) < BOUND  # depth
    assert max_relative_difference(result.pooler_output, reference.pooler_output) < BOUND


def test_prefill_logits_in_bf16_follow_float32(models):
    """Logits within BOUND; the greedy choice agrees at >= 85 % of the positions (measured 95-100 % over 4 seeds x 2
    LLMs: with random weights many positions have near ties, which a bf16 rounding can flip)."""
    low, high, _, inputs = models
    with torch.no_grad():
        reference = high(**inputs).logits
        logits = low(**bf16_inputs(inputs)).logits
    assert logits.dtype == BF16
    assert max_relative_difference(logits, reference) < BOUND
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.85


def test_bf16_vision_tower_computes_what_native_florence2_computes_in_bf16(shapes_image):
    """Faithful in the model dtype: our vision tower in bf16 (DaViT once, the three prompts batched through the
    encoder) against transformers' own Florence2Model in bf16 with the same weights (one prompt at a time). Measured:
    bit-identical; the tolerance admits one bf16 rounding (2^-8 of max|reference|) for a BLAS whose blocking depends on
    the batch size."""
    model = build().to(BF16)
    native = native_florence2(model).to(BF16)
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)).to(BF16)
    depth_ref, breadth_ref = native_features(native, pixel_values, model.config.task_prompt_ids)
    prompts = torch.tensor(model.config.task_prompt_ids).expand(2, -1, -1)
    with torch.no_grad():
        depth, breadth, _ = model.model.vision_tower(pixel_values, prompts, None)
    for ours, reference in [(depth, depth_ref), *((breadth[:, i], ref) for i, ref in enumerate(breadth_ref))]:
        assert ours.dtype == reference.dtype == BF16
        atol = 2**-8 * reference.float().abs().max().item()
        torch.testing.assert_close(ours.float(), reference.float(), rtol=0, atol=atol)


def test_fusion_projector_and_placeholder_scatter_stay_bf16_exactly(models):
    """Channel fusion and the projector, by hand with F.linear / F.gelu on bf16 tensors, equal the model's image
    features bit for bit (a float32 round trip anywhere would round differently), and the LLM receives exactly those
    bf16 rows at the <image> positions and exactly its bf16 embedding rows elsewhere."""
    low, _, _, inputs = models
    batch = bf16_inputs(inputs)
    config = low.config
    used = [config.task_prompt_names.index(s) for s in config.vision_feature_sources if s != "depth"]
    with torch.no_grad():
        depth, breadth, _ = low.model.vision_tower(batch["pixel_values"], batch["task_prompt_ids"][:, used], None)
        hidden = torch.cat([depth, *breadth.unbind(1)], dim=-1)
        linears = low.model.multi_modal_projector.linears
        hidden = F.linear(hidden, linears[0].weight, linears[0].bias)
        for linear in linears[1:]:
            hidden = F.linear(F.gelu(hidden), linear.weight, linear.bias)
        features = low.get_image_features(batch["pixel_values"], task_prompt_ids=batch["task_prompt_ids"])
    assert hidden.dtype == BF16 and torch.equal(features.pooler_output, hidden)

    seen = {}

    def capture(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = low.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            low(**batch)
    finally:
        handle.remove()
    embeds = seen["embeds"]
    is_image = batch["input_ids"] == config.image_token_id
    assert embeds.dtype == BF16
    assert torch.equal(embeds[is_image], hidden.reshape(-1, hidden.shape[-1]))
    table = low.get_input_embeddings().weight
    assert torch.equal(embeds[~is_image], table[batch["input_ids"][~is_image]])


def test_a_float32_copy_of_a_bf16_model_changes_no_weight(models):
    """What the comparisons above rest on: the float32 model holds exactly the bf16 weights."""
    low, high, _, _ = models
    low_state, high_state = low.state_dict(), high.state_dict()
    assert set(low_state) == set(high_state)
    for name, tensor in low_state.items():
        if tensor.is_floating_point() and tensor.dtype == BF16:
            assert torch.equal(tensor.float(), high_state[name]), name
