"""int8 weight-only quantization of the LLM (torchao through `from_pretrained`), on the bundled trained tiny model:
what is quantized, that it computes what per-row int8 weights compute, that it saves and reloads, and how often its
greedy answers agree with the bf16 model's."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import florence_vl_hf
from florence_vl_hf.quantization import KEPT_MODULES, int8_weight_only_config
from florence_vl_hf.lab.shapes import make_shapes_data
from florence_vl_hf.lab.evaluate import answer

pytest.importorskip("torchao", reason="the int8 extra is part of the test extra")


@pytest.fixture(scope="module")
def models():
    folder = florence_vl_hf.tiny_model_dir()
    reference = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16).eval()
    quantized = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16,
                                                            quantization_config=int8_weight_only_config()).eval()  # fmt: skip
    return reference, quantized, AutoProcessor.from_pretrained(folder)


def _is_int8(weight) -> bool:
    return hasattr(weight, "qdata") and weight.qdata.dtype == torch.int8


def per_row_int8(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row int8, written out: the row's range [-max |w|, max |w|] over the 255 steps of [-128, 127],
    q = round(w / scale); returns q * scale."""
    weight = weight.float()
    scale = 2 * weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 255
    return (weight / scale).round().clamp(-128, 127) * scale


def test_only_the_llm_linear_layers_are_int8(models):
    reference, quantized, _ = models
    linears = {name for name, module in quantized.named_modules() if isinstance(module, torch.nn.Linear)}
    in_llm = {name for name in linears if name.startswith("model.language_model.")}
    assert in_llm and all(_is_int8(quantized.get_submodule(name).weight) for name in in_llm)
    kept = linears - in_llm
    assert kept and all(name.startswith(KEPT_MODULES) for name in kept)
    state = reference.state_dict()
    for name in kept:
        weight = quantized.get_submodule(name).weight
        assert not _is_int8(weight) and torch.equal(weight, state[f"{name}.weight"]), name
    embeddings = quantized.get_input_embeddings().weight
    assert not _is_int8(embeddings) and torch.equal(embeddings, reference.get_input_embeddings().weight)


def test_the_int8_weights_are_per_row_int8_of_the_bf16_weights(models):
    reference, quantized, _ = models
    checked = 0
    for name, module in quantized.named_modules():
        if isinstance(module, torch.nn.Linear) and _is_int8(module.weight):
            original = reference.get_submodule(name).weight.float()
            scale = 2 * original.abs().amax(dim=1, keepdim=True) / 255
            stored = module.weight.scale.float().reshape(scale.shape)
            assert torch.allclose(stored, scale, rtol=2**-8), name  # the scale is computed in bf16
            # Each int8 value is its weight rounded to the stored scale's steps; torchao divides in bf16, so a
            # value within bf16 rounding of a half step may round the other way (measured: a few in 10^4), no further.
            steps = (module.weight.qdata.float() - (original / stored).round().clamp(-128, 127)).abs()
            assert steps.max() <= 1 and (steps > 0).float().mean() < 1e-3, name
            checked += 1
    assert checked > 0


def test_logits_equal_a_bf16_model_holding_the_per_row_int8_weights(models, shapes_image):
    reference, quantized, processor = models
    manual = AutoModelForImageTextToText.from_pretrained(florence_vl_hf.tiny_model_dir(), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for name, module in manual.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("model.language_model."):
                module.weight.copy_(per_row_int8(module.weight).to(torch.bfloat16))
    messages = [{"role": "user", "content": [{"type": "image", "image": shapes_image},
                                             {"type": "text", "text": "How many shapes are there?"}]}]  # fmt: skip
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        got = quantized(**inputs).logits.float()
        expected = manual(**inputs).logits.float()
        full = reference(**inputs).logits.float()
    scale = expected.abs().max()
    # Both run bf16 activations through the same weights; only the order of the scale multiply differs.
    assert (got - expected).abs().max() / scale < 2e-2
    assert (got - full).abs().max() / scale > 0  # int8 really changed the weights


def test_a_quantized_model_saves_and_reloads(models, tmp_path, shapes_image):
    _, quantized, processor = models
    quantized.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert reloaded.config.quantization_config.quant_method == "torchao"
    before, after = quantized.state_dict(), reloaded.state_dict()
    assert set(before) == set(after)
    for key, tensor in before.items():
        other = after[key]
        assert _is_int8(tensor) == _is_int8(other), key
        if _is_int8(tensor):
            assert torch.equal(tensor.qdata, other.qdata) and torch.equal(tensor.scale, other.scale), key
        else:
            assert torch.equal(tensor, other), key
    messages = [{"role": "user", "content": [{"type": "image", "image": shapes_image},
                                             {"type": "text", "text": "What color is the circle?"}]}]  # fmt: skip
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    first = quantized.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(reloaded.generate(**inputs, max_new_tokens=6, do_sample=False), first)


def test_int8_answers_agree_with_bf16_on_fresh_shapes_questions(models, tmp_path):
    """Measured on 40 freshly generated images (about 120 questions): the share of questions int8 answers exactly as
    bf16 does, and both accuracies against the generator's answers."""
    reference, quantized, processor = models
    make_shapes_data(tmp_path, 40, seed=20261204, split_name="test", overwrite=True)
    rows = [json.loads(line) for line in (tmp_path / "questions.jsonl").read_text().splitlines() if line.strip()]
    images = [Image.open(tmp_path / row["image"]).convert("RGB") for row in rows]
    questions = [row["question"] for row in rows]
    bf16 = [text.strip() for text in answer(reference, processor, images, questions)]
    int8 = [text.strip() for text in answer(quantized, processor, images, questions)]
    agreement = sum(a == b for a, b in zip(bf16, int8)) / len(rows)
    accuracy = {name: sum(text == row["answer"] for text, row in zip(texts, rows)) / len(rows)
                for name, texts in (("bf16", bf16), ("int8", int8))}  # fmt: skip
    print(f"int8 vs bf16 on {len(rows)} questions: agreement {agreement:.3f}, accuracy {accuracy}")
    assert len(rows) >= 100 and agreement >= 0.95, agreement
    assert abs(accuracy["int8"] - accuracy["bf16"]) <= 0.05, accuracy


@pytest.mark.slow
def test_compiled_int8_decode_gives_the_eager_tokens(models, shapes_image):
    """The fast path: a static cache and generate()'s torch.compile (which fuses torchao's dequantize into the
    matmul) decode the same greedy tokens as eager int8."""
    from florence_vl_hf.benchmark import _compile_kwargs

    _, quantized, processor = models
    messages = [{"role": "user", "content": [{"type": "image", "image": shapes_image},
                                             {"type": "text", "text": "What shape is red?"}]}]  # fmt: skip
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    eager = quantized.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    compiled = quantized.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                  **_compile_kwargs(torch.device("cpu")))  # fmt: skip
    assert torch.equal(compiled, eager)
