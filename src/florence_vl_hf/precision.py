"""How closely a Florence-VL model in a low-precision dtype (bf16 by default) follows the same weights in float32.

Not part of the Hub payload. `dtype_agreement` loads (or copies) one model in two dtypes and compares, for one image
and question: the fused image features, the logits, and the greedy answers. Relative differences are
max|low - reference| / max|reference| over the whole tensor, the low-precision result cast to float32.
"""

import copy
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from .processing import sample_image

DEFAULT_QUESTION = "How many shapes are there?"  # one of ShapesVQA's questions, about the bundled sample image


def max_relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max|value - reference| / max|reference|, computed in float32 (0.0 when both are all zeros)."""
    if value.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(value.shape)} vs {tuple(reference.shape)}")
    value, reference = value.detach().float(), reference.detach().float()
    scale = reference.abs().max().item()
    diff = (value - reference).abs().max().item()
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def token_agreement(tokens: list[int], reference: list[int]) -> tuple[float, int | None, int]:
    """(fraction of positions where both sequences hold the same token, first index where they differ or None,
    positions compared). Positions run over the longer sequence: where one has stopped, the other disagrees."""
    positions = max(len(tokens), len(reference))
    if positions == 0:
        return 1.0, None, 0
    same = sum(a == b for a, b in zip(tokens, reference))
    first = next((i for i in range(positions) if i >= min(len(tokens), len(reference)) or tokens[i] != reference[i]),
                 None)  # fmt: skip
    return same / positions, first, positions


def _in_dtype(model, dtype, device):
    """`model` (a folder, loaded with the Auto class, or a model, copied unless it already has that dtype)."""
    if isinstance(model, (str, Path)):
        loaded = AutoModelForImageTextToText.from_pretrained(str(model), dtype=dtype)
    elif model.dtype == dtype:
        loaded = model
    else:
        loaded = copy.deepcopy(model).to(dtype)
    return loaded.to(device).eval()


def _inputs(processor, image, question, device):
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return {key: value.to(device) for key, value in inputs.items()}


@torch.no_grad()
def _run(model, inputs, max_new_tokens):
    batch = dict(inputs, pixel_values=inputs["pixel_values"].to(model.dtype))
    features = model.get_image_features(batch["pixel_values"], task_prompt_ids=batch["task_prompt_ids"]).pooler_output
    generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return features, generated[0, batch["input_ids"].shape[1]:].tolist()


@torch.no_grad()
def _teacher_forced(model, inputs, continuation):
    """Logits over the prompt followed by `continuation` (one forward, no cache), and the argmax at each position
    that predicts a continuation token."""
    prompt_length = inputs["input_ids"].shape[1]
    extra = torch.tensor([continuation], dtype=inputs["input_ids"].dtype, device=inputs["input_ids"].device)
    input_ids = torch.cat([inputs["input_ids"], extra], dim=1)
    attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, task_prompt_ids=inputs["task_prompt_ids"],
                   pixel_values=inputs["pixel_values"].to(model.dtype)).logits  # fmt: skip
    predicting = logits[0, prompt_length - 1 : prompt_length - 1 + len(continuation)]
    return logits, predicting


def dtype_agreement(
    model,
    processor=None,
    image: Image.Image | None = None,
    question: str = DEFAULT_QUESTION,
    *,
    max_new_tokens: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    reference_dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> dict:
    """How far `model` in `dtype` is from the same weights in `reference_dtype`, on one image and question.

    `model`: a model folder (loaded twice with `AutoModelForImageTextToText`, in each dtype) or a loaded
    Florence-VL model (put in eval mode, and copied to the dtype it does not have). With weights stored in `dtype`
    (the bundled tiny model, converted bf16 checkpoints) the float32 copy holds exactly the same values, so the
    numbers measure compute precision only; weights stored in float32 are also rounded to `dtype`. `processor` defaults to the folder's.
    `image` defaults to the bundled shapes.png. `device` defaults to a loaded model's own, else the CPU.

    Returns a dict:
    - image_features_max_rel_diff: the fused, projected image features (`get_image_features().pooler_output`);
    - logits_max_rel_diff / logits_max_abs_diff: logits of one forward over the prompt plus the reference answer
      (every position);
    - tokens / reference_tokens: greedy answers (`generate`, the model's generation config, at most
      `max_new_tokens`); token_agreement: fraction of positions where they hold the same token (over the longer
      answer), first_divergence: the first position where they differ (None when identical), positions: how many
      positions were compared;
    - teacher_forced_agreement: fraction of the reference answer's positions where both dtypes, each fed the
      reference answer, predict the same next token (free of the compounding that follows a first divergence);
      reference_margins: at each of those positions, the reference's top-1 minus top-2 logit. A position whose margin
      exceeds twice logits_max_abs_diff cannot change its greedy token; smaller margins are near ties, which random
      weights have many of;
      all_positions_agreement: the same over every position of that forward, prompt included (image placeholders
      too: a stricter test, as many of those positions have near ties), all_positions: how many.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    folder = isinstance(model, (str, Path))
    if processor is None:
        if not folder:
            raise ValueError("pass the processor with a loaded model (only a folder provides its own)")
        processor = AutoProcessor.from_pretrained(str(model))
    image = sample_image() if image is None else image
    device = device or ("cpu" if folder else model.device)
    stored = AutoConfig.from_pretrained(str(model)).dtype if folder else model.dtype  # what dtype="auto" loads
    inputs = _inputs(processor, image, question, device)

    reference_model = _in_dtype(model, reference_dtype, device)
    ref_features, ref_tokens = _run(reference_model, inputs, max_new_tokens)
    ref_logits, ref_answer = _teacher_forced(reference_model, inputs, ref_tokens)
    del reference_model
    low_model = _in_dtype(model, dtype, device)
    features, tokens = _run(low_model, inputs, max_new_tokens)
    logits, answer = _teacher_forced(low_model, inputs, ref_tokens)
    del low_model
    agreement, first, positions = token_agreement(tokens, ref_tokens)
    forced_agreement, _, _ = token_agreement(answer.argmax(-1).tolist(), ref_answer.argmax(-1).tolist())
    top2 = ref_answer.float().topk(2, dim=-1).values
    everywhere = (logits.argmax(-1) == ref_logits.argmax(-1)).float()
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "reference_dtype": str(reference_dtype).removeprefix("torch."),
        "stored_dtype": str(stored).removeprefix("torch."),
        "question": question,
        "image_features_max_rel_diff": max_relative_difference(features, ref_features),
        "logits_max_rel_diff": max_relative_difference(logits, ref_logits),
        "logits_max_abs_diff": (logits.float() - ref_logits.float()).abs().max().item(),
        "tokens": tokens,
        "reference_tokens": ref_tokens,
        "token_agreement": agreement,
        "first_divergence": first,
        "positions": positions,
        "teacher_forced_agreement": forced_agreement,
        "reference_margins": (top2[:, 0] - top2[:, 1]).tolist(),
        "all_positions_agreement": everywhere.mean().item(),
        "all_positions": everywhere.numel(),
    }


__all__ = ["DEFAULT_QUESTION", "dtype_agreement", "max_relative_difference", "token_agreement"]
