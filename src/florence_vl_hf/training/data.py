"""LLaVA-format conversation data for training Florence-VL: a Dataset that tokenizes and labels samples as the
original training code (llava/train/train.py) did, and a collator that pads them into model inputs.

A sample is `{"id": ..., "image": "relative/path.png" (optional), "conversations": [{"from": "human"|"gpt",
"value": "...<image>..."}, ...]}`. Templates:

- "plain" (stage 1): the input is `<image>` + caption + "\\n"; only the caption and the newline are supervised.
- "phi3" / "llama3" (stage 2): the conversation rendered with the processor's chat template; every assistant reply
  is supervised, up to and including its end-of-turn token; system, user turns, headers and the image are not.

Two oddities of the original are reproduced by default (`original_masking=True`): with the llama3 template a
conversation of two or more rounds gets no supervised token at all (preprocess_llama3 counts one BOS per round that
the conversation does not contain, reports "tokenization mismatch" and masks the sample), and a sample with an empty
reply is unusable (the original masks it: here it is skipped and reported).
"""

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..families import FAMILY_NAMES
from ..modeling.modeling_florence_vl import LRUCache

IGNORE_INDEX = -100
# "plain" is the stage-1 training format; the others are the LLM families' chat templates.
TEMPLATES = ("plain", *FAMILY_NAMES)
ROLES = {"human": "user", "gpt": "assistant"}

logger = logging.getLogger(__name__)


class SampleError(ValueError):
    """A sample that cannot be used; the message names its id and the reason."""

    def __init__(self, sample_id, reason: str):
        super().__init__(f"sample {sample_id!r}: {reason}")
        self.sample_id = sample_id
        self.reason = reason


def load_conversations(path) -> list[dict]:
    """Samples from a JSON list (the LLaVA format) or a JSON-lines file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is neither a JSON list nor JSON lines: {error}") from None
    if not isinstance(data, list) or not all(isinstance(sample, dict) for sample in data):
        raise ValueError(f"{path} must hold a list of samples (objects with 'id' and 'conversations')")
    return data


def _messages(sample, image_token: str) -> list[dict]:
    """Hugging Face chat messages for a sample, as the original arranged it: a first turn from "gpt" is dropped,
    roles must alternate, and the turn holding `<image>` gets the image in front (its text stripped)."""
    sample_id = sample.get("id")
    turns = sample.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise SampleError(sample_id, "has no 'conversations' list")
    if turns[0].get("from") == "gpt":
        turns = turns[1:]
    if not turns:
        raise SampleError(sample_id, "has only a gpt turn (the original drops a leading gpt turn): nothing to answer")
    messages = []
    for index, turn in enumerate(turns):
        role = ROLES.get(turn.get("from"))
        value = turn.get("value")
        if role is None or not isinstance(value, str):
            raise SampleError(sample_id, f"turn {index} needs 'from' in {sorted(ROLES)} and a string 'value'")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise SampleError(sample_id, f"turn {index} is not valid Unicode (position {error.start})") from None
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise SampleError(sample_id, f"turn {index} is from {turn.get('from')!r}; turns must alternate human/gpt")
        if image_token in value:
            if role != "user":
                raise SampleError(sample_id, f"{image_token} appears in a gpt turn")
            content = [{"type": "image"}, {"type": "text", "text": value.replace(image_token, "")}]
            messages.append({"role": role, "content": content})
        else:
            messages.append({"role": role, "content": value})
    return messages


def _check_structure(sample) -> None:
    if not isinstance(sample, dict):
        raise SampleError(None, f"is a {type(sample).__name__}, not an object with 'conversations'")
    turns = sample.get("conversations")
    if not isinstance(turns, list) or not turns or not all(isinstance(turn, dict) for turn in turns):
        raise SampleError(sample.get("id"), "has no 'conversations' list of turns")
    image = sample.get("image")
    if image is not None and not isinstance(image, str):
        raise SampleError(sample.get("id"), f"'image' must be a file name, got {type(image).__name__} {image!r:.60}")


def _check_image_count(sample, image_token: str) -> bool:
    _check_structure(sample)
    has_image = sample.get("image") is not None
    count = sum(str(turn.get("value", "")).count(image_token) for turn in sample["conversations"])
    if has_image and count != 1:
        raise SampleError(sample.get("id"), f"has an image but {count} {image_token} markers (needs exactly 1)")
    if not has_image and count:
        raise SampleError(sample.get("id"), f"has {count} {image_token} markers but no 'image'")
    return has_image


def tokenize_sample(
    sample: dict, processor, template: str, original_masking: bool = True
) -> tuple[list[int], list[int]]:
    """`(input_ids, labels)` of one sample, with each image expanded to the processor's image tokens.

    `original_masking=False` supervises every reply of multi-round llama3 conversations, which the original masks.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    image_token = processor.image_token
    has_image = _check_image_count(sample, image_token)
    if template == "plain":
        turns = sample.get("conversations") or []
        if not has_image or len(turns) != 2 or not isinstance(turns[1].get("value"), str):
            raise SampleError(sample.get("id"), "the plain template needs an image and exactly two turns")
        ids = processor.tokenize_prompt(image_token + turns[1]["value"] + "\n")
        masked = len(processor.tokenize_prompt(image_token))
        return ids, [IGNORE_INDEX] * masked + ids[masked:]

    messages = _messages(sample, image_token)
    replies = [m for m in messages if m["role"] == "assistant"]
    if any(m["content"] == "" for m in replies):
        raise SampleError(sample.get("id"), "has an empty reply (the original masks the whole sample)")
    render = processor.apply_chat_template
    text = render(messages, tokenize=False)
    ids = processor.tokenize_prompt(text)
    labels = [IGNORE_INDEX] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(processor.tokenize_prompt(render(messages[:index], tokenize=False, add_generation_prompt=True)))
        prefix = processor.tokenize_prompt(render(messages[: index + 1], tokenize=False))
        if ids[: len(prefix)] != prefix or start > len(prefix):
            raise SampleError(sample.get("id"), f"reply {index} does not tokenize on its own as within the conversation")
        labels[start : len(prefix)] = ids[start : len(prefix)]
    if original_masking and template == "llama3" and len(replies) > 1:
        labels = [IGNORE_INDEX] * len(ids)
    return ids, labels


class ImageCache(LRUCache):
    """Preprocessed `pixel_values` of the `max_images` most recently used images, keyed by file path (`get`, `put`).

    Later epochs, and every other question about the same image, then skip decoding, padding and resizing (for a
    small model on a CPU, 10-20% of a training step). Share one between datasets (stage 1 and stage 2 of the same
    images). Each image takes `3 * image_size**2 * 4` bytes (196 KB at 128 px). The eviction is the model's own
    (`LRUCache`, which the vision feature cache uses too).
    """


def image_pixel_values(processor, path: Path, image_cache: ImageCache | None = None) -> torch.Tensor:
    """`pixel_values` (1, 3, size, size) of the image file `path`, from `image_cache` when it holds them (keyed by the
    resolved path). Raises ValueError when the file cannot be read as an image."""
    key = str(Path(path).resolve())
    if image_cache is not None and (cached := image_cache.get(key)) is not None:
        return cached
    pixel_values = processor.image_processor(processor.preprocess_images([path]), return_tensors="pt")["pixel_values"]
    if image_cache is not None:
        image_cache.put(key, pixel_values)
    return pixel_values


@dataclass
class ConversationDataset(Dataset):
    """Tokenized, labelled LLaVA-format samples with their images as `pixel_values`.

    A sample that cannot be used (unreadable image, `<image>` count not matching its image, turns that don't
    alternate, or too long to keep its image tokens whole within `model_max_length`) is logged with its id and
    reason, recorded in `skipped`, and replaced by the next usable sample, so a long run never stops on one bad
    sample (with DataLoader workers, each worker logs and records its own). Longer samples whose image tokens fit
    are truncated to `model_max_length`, as the original did.

    `image_cache` (an `ImageCache`) keeps preprocessed images; tokenized samples are kept when `cache_tokens`.
    """

    samples: list
    processor: object
    template: str
    image_folder: str | os.PathLike | None = None
    model_max_length: int = 2048
    original_masking: bool = True
    image_cache: ImageCache | None = None
    cache_tokens: bool = False
    skipped: dict = field(default_factory=dict)
    _tokens: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        if isinstance(self.samples, (str, os.PathLike)):
            self.samples = load_conversations(self.samples)
        if not self.samples:
            raise ValueError("The dataset has no samples")

    def __len__(self) -> int:
        return len(self.samples)

    def example(self, index: int) -> dict:
        """The training example of sample `index`; raises SampleError when it cannot be used."""
        sample = self.samples[index]
        ids, labels = self._tokenize(index)
        if len(ids) > self.model_max_length:
            image_positions = [i for i, token in enumerate(ids) if token == self.processor.image_token_id]
            if image_positions and image_positions[-1] >= self.model_max_length:
                raise SampleError(
                    sample.get("id"),
                    f"{len(ids)} tokens; truncating to model_max_length={self.model_max_length} would cut its image",
                )
            ids, labels = ids[: self.model_max_length], labels[: self.model_max_length]
            if all(label == IGNORE_INDEX for label in labels):
                raise SampleError(
                    sample.get("id"), f"no reply tokens left after truncation to model_max_length={self.model_max_length}"
                )
        if all(label == IGNORE_INDEX for label in labels):
            raise SampleError(sample.get("id"), "has no gpt reply to train on (its loss would be 0)")
        example = {"input_ids": ids, "labels": labels, "pixel_values": None}
        if sample.get("image") is not None:
            path = Path(self.image_folder or ".") / sample["image"]
            if not path.is_file():
                raise SampleError(sample.get("id"), f"image file {str(path)!r} not found")
            example["pixel_values"] = self._pixel_values(sample, path)
        return example

    def _tokenize(self, index: int) -> tuple[list[int], list[int]]:
        cached = self._tokens.get(index)
        if cached is not None:
            return cached[0].tolist(), cached[1].tolist()
        ids, labels = tokenize_sample(self.samples[index], self.processor, self.template, self.original_masking)
        if self.cache_tokens:
            self._tokens[index] = (torch.tensor(ids, dtype=torch.int32), torch.tensor(labels, dtype=torch.int32))
        return ids, labels

    def _pixel_values(self, sample, path: Path) -> torch.Tensor:
        try:
            return image_pixel_values(self.processor, path, self.image_cache)
        except ValueError as error:
            raise SampleError(sample.get("id"), f"image {str(path)!r} could not be used: {error}") from None

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.samples)):
            current = (index + offset) % len(self.samples)
            try:
                return self.example(current)
            except SampleError as error:
                # an id that is no string or number (a list, a dict) is reported by its position instead
                key = error.sample_id if isinstance(error.sample_id, (str, int)) else f"sample #{current}"
                if key not in self.skipped:
                    self.skipped[key] = error.reason
                    logger.warning("Skipping %s", error)
        raise RuntimeError(f"None of the {len(self.samples)} samples can be used; see the warnings for the reasons")


@dataclass
class FlorenceVLDataCollator:
    """Pads examples on the right into `input_ids`, `attention_mask` (the tokenizer's `pad`), `labels` (IGNORE_INDEX
    on padding), and stacks the images of the samples that have one into `pixel_values`, with a row of task prompt
    ids per image."""

    processor: object
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict:
        padded = self.processor.tokenizer.pad(
            {"input_ids": [example["input_ids"] for example in examples]},
            padding=True,
            pad_to_multiple_of=self.pad_to_multiple_of or None,
            padding_side="right",
            return_attention_mask=True,
            return_tensors="pt",
        )
        batch = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
        batch["labels"] = torch.full_like(batch["input_ids"], IGNORE_INDEX)  # the tokenizer pads token ids only
        for row, example in enumerate(examples):
            batch["labels"][row, : len(example["labels"])] = torch.tensor(example["labels"])
        images = [example["pixel_values"] for example in examples if example.get("pixel_values") is not None]
        if images:
            batch["pixel_values"] = torch.cat(images)
            batch["task_prompt_ids"] = torch.tensor(self.processor.task_prompt_ids).repeat(len(images), 1, 1)
        return batch
