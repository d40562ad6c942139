"""Verifying a conversion: the converted folder, loaded with the Auto classes, against an independent forward computed
straight from the source tensors.

The reference is the original's algorithm (`reference.py`, which uses none of Florence-VL's modeling code) on the
source's weights: transformers' native Florence2ForConditionalGeneration loaded with the source's Florence-2 weights
(renamed to native names), the original's projector built from the source's `mm_projector` tensors, and the source
LLM in its own transformers class with its vocabulary resized to the tokenizer, as the original loader does.
"""

import gc

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, Florence2ForConditionalGeneration
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ..processing import sample_image
from .errors import VerificationError
from .keys import LLAVA_VISION_PREFIX, TRANSPOSED_NATIVE_KEYS, florence2_to_native
from .reference import OriginalLLM, OriginalVision, mlp_projector
from .source import text_config_from_llava

VERIFY_QUESTION = "Describe the image in detail."
GREEDY_TOKENS = 8
# Largest allowed max|converted - reference| / max(1, max|reference|): float32 compute with bit-exact weights only
# differs by kernel order; a lossy dtype cast or half-precision compute is bounded by that dtype's resolution.
TOLERANCES = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def tolerance_for(compute_dtype: torch.dtype, stored_dtype: torch.dtype, lossless: bool) -> float:
    dtypes = [compute_dtype] + ([] if lossless else [stored_dtype])
    return max(TOLERANCES[d] for d in dtypes)


def _source_groups(source):
    """Source tensors split into native Florence-2 (renamed), projector and LLM state dicts."""
    florence2, projector, llm = {}, {}, {}
    for key in source.main.keys():
        if key.startswith(LLAVA_VISION_PREFIX):
            florence2[florence2_to_native(key[len(LLAVA_VISION_PREFIX):])] = (source.main, key)
        elif key.startswith("model.mm_projector."):
            projector[key] = source.main.get(key)
        else:
            llm[key] = source.main.get(key)
    if source.vision is not None:
        for key in source.vision.keys():
            florence2.setdefault(florence2_to_native(key), (source.vision, key))
    native = {}
    for name, (store, key) in florence2.items():
        if name == "final_logits_bias":
            continue
        tensor = store.get(key)
        native[name] = tensor.t() if name in TRANSPOSED_NATIVE_KEYS else tensor
    return native, projector, llm


def _reference_florence2(source, native_state, dtype, device):
    """Native Florence-2 with one extra vocabulary row, used as its image-placeholder token."""
    config = source.florence2.__class__.from_dict(source.florence2.to_dict())
    vocab = config.text_config.vocab_size
    config.text_config.vocab_size = vocab + 1
    config.image_token_id = vocab
    shared = native_state["model.language_model.shared.weight"]
    native_state = dict(native_state)
    native_state["model.language_model.shared.weight"] = torch.cat([shared, shared.new_zeros(1, shared.shape[1])])
    for tied in ("model.language_model.encoder.embed_tokens.weight", "model.language_model.decoder.embed_tokens.weight",
                 "lm_head.weight"):  # fmt: skip
        native_state.pop(tied, None)
    model = Florence2ForConditionalGeneration.from_pretrained(None, config=config, state_dict=native_state, dtype=dtype)
    return model.to(device).eval()


def _llava_projector_layers(projector_state: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, bias) of each linear layer of the original's `encoder_mlp`: `encoder_mlp.0`, then `encoder_mlp.<i>.1`
    (the Linear after each GELU)."""
    layers = []
    while True:
        index = len(layers)
        prefix = "model.mm_projector.encoder_mlp." + (f"{index}." if index == 0 else f"{index}.1.")
        if prefix + "weight" not in projector_state:
            return layers
        layers.append((projector_state[prefix + "weight"], projector_state[prefix + "bias"]))


@torch.no_grad()
def reference_outputs(source, inputs, image_token_id, original_vocab, dtype, device, max_new_tokens, generation_kwargs):
    """(image features, logits, greedy tokens, the LLM's class name) of the original algorithm on the source's
    weights. Florence-2 is freed before the LLM is loaded."""
    native_state, projector_state, llm_state = _source_groups(source)
    vision = OriginalVision(
        _reference_florence2(source, native_state, dtype, device),
        mlp_projector(_llava_projector_layers(projector_state)).to(device, dtype),
    )
    image_features = vision(inputs["pixel_values"].to(device, dtype), inputs["task_prompt_ids"].to(device))
    del vision, native_state
    gc.collect()

    config = text_config_from_llava(source.config)
    llm_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the LLM's own class, e.g. Phi3ForCausalLM
    llm = llm_class.from_pretrained(None, config=config, state_dict=llm_state, dtype=dtype)
    llm_state.clear()  # the source-dtype copies; the model holds its own
    llm = llm.to(device).eval()
    llm.resize_token_embeddings(original_vocab)  # what the original loader does
    language = OriginalLLM(llm, image_token_id)
    input_ids, attention_mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
    logits = language.logits(input_ids, attention_mask, image_features)
    tokens = language.generate(input_ids, attention_mask, image_features, max_new_tokens=max_new_tokens,
                               **generation_kwargs)  # fmt: skip
    name = type(llm).__name__
    del language, llm
    gc.collect()
    return image_features, logits, tokens[0].tolist(), name


@torch.no_grad()
def converted_outputs(folder, compute_dtype, device, max_new_tokens, image, question):
    processor = AutoProcessor.from_pretrained(str(folder))
    model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=compute_dtype, device_map=str(device)).eval()
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    moved = {k: v.to(device) for k, v in inputs.items()}
    moved["pixel_values"] = moved["pixel_values"].to(compute_dtype)
    features = model.get_image_features(moved["pixel_values"], task_prompt_ids=moved["task_prompt_ids"]).pooler_output
    logits = model(**moved).logits
    generated = model.generate(**moved, max_new_tokens=max_new_tokens, do_sample=False)
    generation = model.generation_config
    kwargs = {"eos_token_id": generation.eos_token_id, "pad_token_id": generation.pad_token_id}
    tokens = generated[0, inputs["input_ids"].shape[1]:].tolist()
    del model
    gc.collect()
    return inputs, features, logits, tokens, kwargs, processor.image_token_id


def verify_conversion(
    source, folder, original_vocab, *, compute_dtype=torch.float32, stored_dtype=torch.bfloat16, device=None,
    lossless=True, image=None,
    question=VERIFY_QUESTION, max_new_tokens=GREEDY_TOKENS, log=print,
) -> dict:  # fmt: skip
    """Compare `folder` (a converted model) with the reference forward from `source`; raises VerificationError."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    image = image or sample_image()
    inputs, features, logits, tokens, generation_kwargs, image_token_id = converted_outputs(
        folder, compute_dtype, device, max_new_tokens, image, question
    )
    ref_features, ref_logits, ref_tokens, llm_class = reference_outputs(
        source, inputs, image_token_id, original_vocab, compute_dtype, device, max_new_tokens, generation_kwargs
    )
    logits = logits[..., :original_vocab]
    if features.shape != ref_features.shape or logits.shape != ref_logits.shape:
        raise VerificationError(
            f"Shapes differ from the reference: image features {tuple(features.shape)} vs {tuple(ref_features.shape)}, "
            f"logits {tuple(logits.shape)} vs {tuple(ref_logits.shape)}"
        )
    feature_diff = (features.float() - ref_features.float()).abs().max().item()
    logit_diff = (logits.float() - ref_logits.float()).abs().max().item()
    scales = {"image_features": max(1.0, ref_features.float().abs().max().item()),
              "logits": max(1.0, ref_logits.float().abs().max().item())}  # fmt: skip
    tolerance = tolerance_for(compute_dtype, stored_dtype, lossless)
    agree = tokens == ref_tokens
    within = feature_diff <= tolerance * scales["image_features"] and logit_diff <= tolerance * scales["logits"]
    passed = within and (agree or not lossless or compute_dtype != torch.float32)
    result = {
        "passed": passed,
        "compute_dtype": str(compute_dtype).replace("torch.", ""),
        "device": str(device),
        "question": question,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "max_abs_diff": {"image_features": feature_diff, "logits": logit_diff},
        "scale": scales,
        "tolerance": tolerance,
        "lossless_weights": lossless,
        "greedy_tokens_agree": agree,
        "greedy_tokens": tokens,
        "reference_greedy_tokens": ref_tokens,
        "reference": f"the original algorithm: transformers Florence2ForConditionalGeneration through generate, the "
                     f"original's mlp projector, {llm_class}",
    }
    log(
        f"verification: max abs diff image features {feature_diff:.3g}, logits {logit_diff:.3g} (tolerance "
        f"{tolerance:.3g} relative to max|reference|); greedy tokens {'agree' if agree else 'differ'}: "
        f"{'PASSED' if passed else 'FAILED'}"
    )
    if not passed:
        raise VerificationError(
            f"The converted model does not match the source: max abs difference {feature_diff:.3g} on the image "
            f"features and {logit_diff:.3g} on the logits (tolerance {tolerance:.3g} relative to max|reference|: "
            f"{scales}), "
            f"greedy tokens {tokens} vs reference {ref_tokens}"
        )
    return result
