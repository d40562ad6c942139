"""Greedy-decoding evaluation of a Florence-VL model on ShapesVQA questions (exact match per question type)."""

import json
from pathlib import Path

import PIL.Image
import torch

from .shapes import score


def shapes_prompts(processor, questions: list[str]) -> list[str]:
    """The chat prompts (with generation prompt) of single-image questions."""
    return [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for q in questions
    ]


@torch.inference_mode()
def answer(model, processor, images, questions, max_new_tokens: int = 8) -> list[str]:
    """Greedy answers of `model` to one question per image, in one left-padded batch."""
    inputs = processor(images=images, text=shapes_prompts(processor, questions), padding=True, return_tensors="pt")
    inputs = inputs.to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def evaluate_shapes(model, processor, data_dir, batch_size: int = 32, limit: int | None = None) -> dict:
    """Accuracy per question type and overall on a ShapesVQA split written by `make_shapes_data`
    (its questions.jsonl), with greedy decoding and exact match after stripping white space."""
    data_dir = Path(data_dir)
    rows = [json.loads(line) for line in (data_dir / "questions.jsonl").read_text().splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    model.eval()
    predictions, images = [], {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch_images = []
        for row in chunk:
            if row["image"] not in images:
                with PIL.Image.open(data_dir / row["image"]) as image:
                    images[row["image"]] = image.convert("RGB")
            batch_images.append(images[row["image"]])
        answers = answer(model, processor, batch_images, [row["question"] for row in chunk])
        predictions.extend((row["type"], text, row["answer"]) for row, text in zip(chunk, answers))
    result = score(predictions)
    result["examples"] = [
        {"type": kind, "predicted": text, "expected": expected} for kind, text, expected in predictions[:20]
    ]
    return result
