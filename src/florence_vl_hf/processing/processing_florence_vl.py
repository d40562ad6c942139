"""Florence-VL processor: images as the original (pad to square, Florence-2's CLIP preprocessing), prompts tokenized
the way the original LLaVA code fed its LLM, and the Florence-2 task prompts that yield the breadth features.

Part of the Hub payload: imports only torch, transformers and PIL.
"""

import io
import os

from transformers.utils.versions import require_version

# The same range as configuration_florence_vl.TRANSFORMERS_REQUIREMENT (this file can be loaded without that one).
TRANSFORMERS_REQUIREMENT = "transformers>=5.19,<6"
require_version(
    TRANSFORMERS_REQUIREMENT,
    f"Florence-VL's processor supports these transformers releases only: pip install '{TRANSFORMERS_REQUIREMENT}'",
)

import warnings  # noqa: E402
from typing import Unpack  # noqa: E402

import PIL.Image  # noqa: E402
import PIL.ImageOps  # noqa: E402
import torch  # noqa: E402
from transformers.feature_extraction_utils import BatchFeature  # noqa: E402
from transformers.image_utils import ImageInput, load_image  # noqa: E402
from transformers.processing_utils import (  # noqa: E402
    MultiModalData,
    ProcessingKwargs,
    ProcessorMixin,
    TextKwargs,
)
from transformers.tokenization_utils_base import TextInput  # noqa: E402

SPIECE_UNDERLINE = "\u2581"


def use_slow_sentencepiece_rules(tokenizer, image_token: str):
    """Make a fast sentencepiece-BPE tokenizer (Llama/Phi-3 style) give the ids of the slow sentencepiece
    `LlamaTokenizer(legacy=False)` that the original used for Phi-3.5 (transformers 4.43, `use_fast=False`), with
    text split at `image_token` as LLaVA's `tokenizer_image_token` split it. In place and idempotent; the rules live
    in the tokenizer's own pipeline, so they are saved in tokenizer.json and serving engines that tokenize with the
    tokenizer alone (vLLM) get the same ids.

    The slow tokenizer puts '▁' in front of the text only (a lone '▁' when the text starts with an added
    token that is not one of the named special tokens) and nothing after an added token; the fast one prefixes
    every stretch between added tokens. Here added tokens are matched after normalization (`normalized=True`), so
    the normalizer's one prefix stays in front of the first stretch; the image token is matched before it, so each
    piece around an image is prefixed on its own; spaces become '▁' in the pre-tokenizer, after the added
    tokens' `rstrip` has seen them. A text that is exactly one added token keeps no lone '▁' (the normalized
    token contents must stay unchanged); the processor adds it back.
    """
    import json
    import re

    backend = tokenizer.backend_tokenizer
    state = json.loads(backend.to_str())
    if state["model"].get("type") != "BPE" or SPIECE_UNDERLINE not in state["model"].get("vocab", {}):
        raise ValueError("sentencepiece_leading_space needs a sentencepiece-BPE tokenizer (Llama or Phi-3 style)")
    for added in state["added_tokens"]:
        added["normalized"] = added["content"] != image_token
    named = sorted(set(tokenizer.all_special_tokens) - {image_token}, key=len, reverse=True)
    contents = sorted((a["content"] for a in state["added_tokens"] if a["normalized"]), key=len, reverse=True)
    pattern = "|".join(map(re.escape, contents))
    state["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": SPIECE_UNDERLINE},
            {
                "type": "Replace",
                "pattern": {"Regex": rf"\A{SPIECE_UNDERLINE}(?=(?:{pattern})\z|{'|'.join(map(re.escape, named))})"},
                "content": "",
            },
        ],
    }
    state["pre_tokenizer"] = {"type": "Metaspace", "replacement": SPIECE_UNDERLINE, "prepend_scheme": "never",
                              "split": False}  # fmt: skip
    if state != json.loads(backend.to_str()):
        rewritten = type(backend).from_str(json.dumps(state))  # a tokenizers.Tokenizer
        rewritten.encode_special_tokens = backend.encode_special_tokens
        tokenizer._tokenizer = rewritten
    return tokenizer


# With image_aspect_ratio="pad" an image becomes a square of its longer side before resizing (LLaVA's expand2square):
# 16384 px per side is an 805 MB RGB canvas, above any camera photo or 1200-dpi A4 scan; a longer side (a 1x30000
# strip, a 1x200000 PNG) would allocate gigabytes for a 768 px result, so it is refused before the pixels are read.
MAX_PADDED_SIDE = 16384
IMAGE_TYPES = "a PIL image, a H×W / H×W×C / C×H×W array or tensor, a path or URL, or encoded bytes"


def _to_rgb(image, index: int, max_side: int | None = None) -> PIL.Image.Image:
    """Any PIL mode (and arrays/tensors, paths, URLs, encoded bytes, file objects) -> an upright 8-bit RGB image."""
    if isinstance(image, (bytes, bytearray, memoryview)) or hasattr(image, "read"):
        source = io.BytesIO(bytes(image)) if isinstance(image, (bytes, bytearray, memoryview)) else image
        try:
            image = PIL.Image.open(source)
        except Exception as error:
            raise ValueError(f"Image {index} could not be decoded: {error}") from error
    elif isinstance(image, (str, os.PathLike)):
        source = os.fspath(image)
        try:
            image = PIL.Image.open(source) if os.path.isfile(source) else load_image(source)
        except Exception as error:
            raise ValueError(f"Image {index} could not be read from {source!r}: {error}") from error
    elif hasattr(image, "shape") and hasattr(image, "dtype"):
        image = _array_to_image(image, index)
    elif not isinstance(image, PIL.Image.Image):
        raise TypeError(f"Image {index} must be {IMAGE_TYPES}; got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"Image {index} is empty ({image.width}x{image.height})")
    if max_side is not None and max(image.size) > max_side:
        image.close()
        raise ValueError(
            f"Image {index} is {image.width}x{image.height}: padding it to a square (image_aspect_ratio='pad') would "
            f"make a {max(image.size)} px square; the limit is {max_side} px per side: resize or crop it first"
        )
    try:
        image.load()
    except Exception as error:
        raise ValueError(f"Image {index} could not be decoded: {error}") from error
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode == "F":  # 32-bit float greyscale: read like a float array (values in [0, 1] or [0, 255])
        values = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.float32).reshape(image.height, image.width)
        image = _array_to_image(values, index)
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16/32-bit integer greyscale: PIL's convert("RGB") would clip at 255; rescale to 8 bits instead.
        raw = bytearray(image.convert("I").tobytes())  # mode "I": native-endian int32 per pixel
        values = torch.frombuffer(raw, dtype=torch.int32).to(torch.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = PIL.Image.frombytes("L", image.size, _to_uint8(values * (255.0 / top)).numpy().tobytes())
    image = image.convert("RGB")
    # A transparent-colour key would make transformers' convert_to_rgb paint that colour white; the original kept it.
    image.info.pop("transparency", None)
    return image


def _to_uint8(values: torch.Tensor) -> torch.Tensor:
    return values.clamp(0, 255).round().to(torch.uint8)


def _array_to_image(array, index: int = 0) -> PIL.Image.Image:
    """H×W, H×W×C or C×H×W arrays/tensors (C of 1-4; channels last when the last axis can be channels): uint8 as
    is, bool as 0/255, floats in [0, 1] or [0, 255], wider integers as 16-bit."""
    dtype = getattr(array, "dtype", None)
    if getattr(dtype, "isnative", True) is False:  # a big-endian numpy array: torch reads native byte order only
        array = array.astype(dtype.newbyteorder("="))
    try:
        array = torch.as_tensor(array).detach().cpu()
    except Exception as error:
        raise TypeError(f"Image {index}: an array of dtype {dtype} is not an image ({error})") from error
    shape = tuple(array.shape)
    if array.is_complex():
        raise TypeError(f"Image {index}: an array of dtype {array.dtype} is not an image")
    if array.ndim == 3 and shape[-1] not in (1, 2, 3, 4):
        if shape[0] not in (1, 2, 3, 4):
            raise ValueError(f"Image {index} has shape {shape}: a 3-d image needs 1 to 4 channels, last or first")
        array = array.permute(1, 2, 0)
    elif array.ndim != 2 and array.ndim != 3:
        raise ValueError(
            f"Image {index} has shape {shape}: an array image is H×W, H×W×C or C×H×W (pass several images as a list)"
        )
    if array.numel() == 0:
        raise ValueError(f"Image {index} is empty (shape {shape})")
    if array.dtype == torch.bool:
        array = array.to(torch.uint8) * 255
    elif array.dtype != torch.uint8:
        is_float = array.is_floating_point()
        values = array.to(torch.float64)
        if is_float:
            if not torch.isfinite(values).all():
                raise ValueError(f"Image {index} has NaN or infinite values")
            scale = 255.0 if values.max() <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0 if array.dtype == torch.uint16 or values.max() > 255 else 1.0
        array = _to_uint8(values * scale)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return PIL.Image.fromarray(array.contiguous().numpy())


def _pad_to_square(image: PIL.Image.Image, fill: tuple) -> PIL.Image.Image:
    """LLaVA's expand2square: centre on a square canvas of the longer side, filled with `fill`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = PIL.Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class FlorenceVLTextKwargs(TextKwargs, total=False):
    """`add_special_tokens_as_original`: add the tokenizer's special tokens even where `add_special_tokens=False`
    was chosen for the caller, as the original code always did. `apply_chat_template` sets it unless
    `add_special_tokens` is passed: transformers tokenizes a rendered prompt that starts with BOS without special
    tokens, while the original tokenized it with them (Llama-3.1's prompts therefore start with two BOS tokens)."""

    add_special_tokens_as_original: bool | None


class FlorenceVLProcessorKwargs(ProcessingKwargs, total=False):
    text_kwargs: FlorenceVLTextKwargs
    _defaults = {}  # read off this class by transformers < 5.20 (TypedDicts do not inherit it); no defaults here


# Tokenizer options that have no meaning for prompts with images (pairs, pre-split words, overflowing windows) or
# that this processor does not compute; asking for them is an error rather than silently ignored.
UNSUPPORTED_TEXT_KWARGS = (
    "text_pair",
    "text_target",
    "text_pair_target",
    "is_split_into_words",
    "stride",
    "return_overflowing_tokens",
    "return_special_tokens_mask",
    "return_token_type_ids",
    "return_length",
    "sanitize_control_tokens",
)
TRUNCATING = (True, "longest_first", "only_first")
NOT_TRUNCATING = (False, None, "do_not_truncate")


class FlorenceVLProcessor(ProcessorMixin):
    r"""
    Processor for Florence-VL: a Florence-2 image processor (CLIP, 768x768 bicubic, ImageNet mean/std) and the LLM's
    tokenizer.

    Args:
        image_processor: the CLIP image processor.
        tokenizer: the LLM tokenizer, with `image_token` added. Its `padding_side` (left for generation) is the
            default side of padding.
        chat_template: Jinja chat template reproducing the original conversation format (phi3 or llama3).
        image_token: placeholder for one image in prompts.
        num_image_tokens: tokens one image occupies in the LLM input (the model config's `num_image_tokens`).
        task_prompt_names / task_prompt_texts: the Florence-2 task prompts (the breadth features), in the model
            config's order.
        task_prompt_ids: their Florence-2 token ids, padded to one length, in the same order.
        image_aspect_ratio: `"pad"` pads to a square filled with the mean colour before resizing (the official
            checkpoints), `"square"` resizes directly.
        sentencepiece_leading_space: tokenize like the slow sentencepiece tokenizer the original used for Phi-3.5
            (transformers 4.43, `use_fast=False`), whose ids differ from the fast tokenizer's around added tokens
            such as `<|system|>`; the checkpoints were trained on those ids. Rewrites the tokenizer's pipeline
            (`use_slow_sentencepiece_rules`), so the saved tokenizer gives those ids by itself. Needs a fast
            sentencepiece-BPE tokenizer (Llama/Phi style).
    """

    valid_processor_kwargs = FlorenceVLProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_token: str = "<image>",
        num_image_tokens: int = 577,
        task_prompt_names: list | None = None,
        task_prompt_texts: list | None = None,
        task_prompt_ids: list | None = None,
        image_aspect_ratio: str = "pad",
        sentencepiece_leading_space: bool = False,
        **kwargs,
    ):
        if image_aspect_ratio not in ("pad", "square"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'square', got {image_aspect_ratio!r}")
        padding_side = kwargs.pop("padding_side", None)
        if padding_side is not None:
            warnings.warn(
                "FlorenceVLProcessor(padding_side=...) is deprecated: the tokenizer's padding_side is the default "
                "(set tokenizer.padding_side), and processor(..., padding_side=...) chooses per call",
                FutureWarning,
                stacklevel=2,
            )
            if padding_side not in ("left", "right"):
                raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
            if tokenizer is not None:
                tokenizer.padding_side = padding_side
                tokenizer.init_kwargs["padding_side"] = padding_side
        self.image_token = image_token
        self.num_image_tokens = num_image_tokens
        self.task_prompt_names = list(task_prompt_names or [])
        self.task_prompt_texts = list(task_prompt_texts or [])
        self.task_prompt_ids = [list(row) for row in (task_prompt_ids or [])]
        if not len(self.task_prompt_names) == len(self.task_prompt_texts) == len(self.task_prompt_ids):
            raise ValueError("task_prompt_names, task_prompt_texts and task_prompt_ids need one entry per prompt")
        self.image_aspect_ratio = image_aspect_ratio
        self.sentencepiece_leading_space = sentencepiece_leading_space
        if sentencepiece_leading_space and tokenizer is not None:
            use_slow_sentencepiece_rules(tokenizer, image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token) if tokenizer is not None else None
        if tokenizer is not None and (self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id):
            raise ValueError(f"The tokenizer has no {image_token!r} token: add it with tokenizer.add_tokens first")

    @property
    def task_prompts(self) -> dict:
        """Task prompt texts by name, in order."""
        return dict(zip(self.task_prompt_names, self.task_prompt_texts))

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "task_prompt_ids"]

    # ----------------------------------------------------------------------------------------------- images
    def preprocess_images(self, images: list) -> list[PIL.Image.Image]:
        """Convert to upright RGB and, with `image_aspect_ratio="pad"`, pad to a square of the mean colour."""
        fill = tuple(int(m * 255) for m in self.image_processor.image_mean)
        out = []
        for index, image in enumerate(images):
            if image is None:
                raise ValueError(f"Image {index} is None")
            max_side = MAX_PADDED_SIDE if self.image_aspect_ratio == "pad" else None
            image = _to_rgb(image, index, max_side)
            out.append(_pad_to_square(image, fill) if self.image_aspect_ratio == "pad" else image)
        return out

    def _process_images(self, images: list, **kwargs):
        return super()._process_images(self.preprocess_images(images), **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The text an image's marker stands for in the LLM input: `num_image_tokens` image tokens."""
        return self.image_token * self.num_image_tokens

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Placeholder tokens per image for images of the given `(height, width)` sizes: every image is resized to
        one square, so each takes `num_image_tokens` tokens and one patch."""
        data = {}
        if image_sizes is not None:
            data["num_image_tokens"] = [self.num_image_tokens] * len(image_sizes)
            data["num_image_patches"] = [1] * len(image_sizes)
        return MultiModalData(**data)

    # ------------------------------------------------------------------------------------------------- text
    def _encode_piece(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._encode_piece_with_offsets(text, add_special_tokens, with_offsets=False)[0]

    def _encode_piece_with_offsets(
        self, text: str, add_special_tokens: bool, with_offsets: bool = True
    ) -> tuple[list[int], list | None]:
        """Ids of a text without image markers and, `with_offsets`, their `(start, end)` character spans (None
        otherwise or for tokenizers without offsets); tokens that cover no character span `(0, 0)`, as in
        transformers."""
        with_offsets = with_offsets and getattr(self.tokenizer, "is_fast", False)
        encoded = self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=with_offsets)
        ids = list(encoded["input_ids"])
        offsets = [tuple(span) for span in encoded["offset_mapping"]] if with_offsets else None
        if self.sentencepiece_leading_space and text:
            first = int(add_special_tokens and bool(getattr(self.tokenizer, "add_bos_token", False)))
            ids, offsets = self._with_sentencepiece_prefix(text, ids, offsets, first)
        return ids, offsets

    def _with_sentencepiece_prefix(
        self, text: str, ids: list, offsets: list | None, first: int
    ) -> tuple[list, list | None]:
        """The two places where the rewritten tokenizer (`use_slow_sentencepiece_rules`) cannot follow the slow
        tokenizer alone: a text that is nothing but one added token gets the lone '▁' in front, and the '▁'
        that the tokenizer prepends covers no character of the text."""
        prefix_id = self.tokenizer.convert_tokens_to_ids(SPIECE_UNDERLINE)
        added = {token.content for token in self.tokenizer.added_tokens_decoder.values()}
        if text in added and text not in set(self.tokenizer.all_special_tokens):
            ids = [*ids[:first], prefix_id, *ids[first:]]
            offsets = [*offsets[:first], (0, 0), *offsets[first:]] if offsets is not None else None
        elif offsets is not None and ids[first:first + 1] == [prefix_id] and self._prefixes(text):
            offsets = [*offsets[:first], (0, 0), *offsets[first + 1:]]
        return ids, offsets

    def _prefixes(self, text: str) -> bool:
        normalizer = self.tokenizer.backend_tokenizer.normalizer
        return normalizer is not None and len(normalizer.normalize_str(text)) == len(text) + 1

    def _encode_prompt(
        self, text: str, add_special_tokens: bool = True, with_offsets: bool = True
    ) -> tuple[list[int], list | None]:
        """Ids of one prompt as LLaVA's `tokenizer_image_token` builds them, and the character spans of the tokens
        in the prompt with each image marker replaced by `replace_image_token` (the text that
        `get_text_with_replacements` makes): the text is split at the image marker, each piece is tokenized on its
        own, the first piece's BOS is kept once and the later pieces' first token (their BOS) is dropped, and each
        image becomes `num_image_tokens` image-token ids."""
        marker, count = self.image_token, self.num_image_tokens
        pieces = text.split(marker)
        encoded = [self._encode_piece_with_offsets(piece, add_special_tokens, with_offsets) for piece in pieces]
        bos = self.tokenizer.bos_token_id
        first = encoded[0][0]
        drop = 1 if add_special_tokens and first and bos is not None and first[0] == bos else 0
        ids = first[:drop]
        has_offsets = all(offsets is not None for _, offsets in encoded)
        spans = list(encoded[0][1][:drop]) if has_offsets else None
        start = 0  # where the current piece starts in the expanded text
        for index, (piece, (piece_ids, piece_offsets)) in enumerate(zip(pieces, encoded)):
            if index > 0:
                ids.extend([self.image_token_id] * count)
                if has_offsets:
                    spans.extend((start + k * len(marker), start + (k + 1) * len(marker)) for k in range(count))
                start += count * len(marker)
            ids.extend(piece_ids[drop:])
            if has_offsets:
                spans.extend((a + start, b + start) if b > a else (0, 0) for a, b in piece_offsets[drop:])
            start += len(piece)
        return ids, spans

    def tokenize_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one prompt as the original fed its LLM (see `_encode_prompt`)."""
        return self._encode_prompt(text, add_special_tokens, with_offsets=False)[0]

    def _truncate(self, sequences: list, offsets: list, text_kwargs: dict) -> tuple[list, list]:
        truncation = text_kwargs.get("truncation")
        if truncation in NOT_TRUNCATING:
            return sequences, offsets
        if truncation not in TRUNCATING:
            raise ValueError(f"truncation={truncation!r} is not supported: use True, 'longest_first' or False")
        max_length = text_kwargs.get("max_length") or self.tokenizer.model_max_length
        left = self.tokenizer.truncation_side == "left"
        kept_ids, kept_offsets = [], []
        for index, (full, spans) in enumerate(zip(sequences, offsets)):
            keep = slice(len(full) - max_length, None) if left else slice(None, max_length)
            cut = full[keep] if len(full) > max_length else full
            if cut.count(self.image_token_id) != full.count(self.image_token_id):
                raise ValueError(
                    f"Prompt {index} has {len(full)} tokens and max_length={max_length} would cut through its image "
                    f"tokens ({self.num_image_tokens} per image); raise max_length or shorten the text"
                )
            kept_ids.append(cut)
            kept_offsets.append(spans[keep] if spans is not None and len(full) > max_length else spans)
        return kept_ids, kept_offsets

    def __call__(
        self,
        images: ImageInput | list[ImageInput] | list[list[ImageInput]] | None = None,
        text: TextInput | list[TextInput] | None = None,
        **kwargs: Unpack[FlorenceVLProcessorKwargs],
    ) -> BatchFeature:
        """Prepare `text` (one prompt or a batch, each `<image>` marking one image) and `images` (one image, a flat
        list in prompt order, or one list per prompt) for the model.

        Returns `input_ids`, `attention_mask` and, when there are images, `pixel_values` and `task_prompt_ids`
        (one row of task prompts per image); on request `offset_mapping`, `mm_token_type_ids` and
        `text_replacement_offsets`. Options go in `text_kwargs` / `images_kwargs` or flat, as for every transformers
        processor. Truncation that would cut through an image's tokens is an error.
        """
        for modality in ("videos", "audio"):
            if kwargs.pop(modality, None) is not None:
                raise ValueError(f"FlorenceVLProcessor takes images and text only, not {modality}")
        if text is None:
            raise ValueError("FlorenceVLProcessor needs `text`: put one `<image>` in it for each image")
        texts = _check_texts(text)
        output_kwargs = self._merge_kwargs(
            FlorenceVLProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs = output_kwargs["text_kwargs"]
        unsupported = [name for name in UNSUPPORTED_TEXT_KWARGS if text_kwargs.get(name)]
        if unsupported:
            raise ValueError(f"FlorenceVLProcessor does not support {', '.join(unsupported)}")
        _check_text_kwargs(text_kwargs)
        return_tensors = text_kwargs.get("return_tensors")
        # Processor-level flags; transformers 5.2x still mirrors them in text_kwargs.
        flags = {
            name: text_kwargs.pop(name, output_kwargs.get(name, False))
            for name in ("return_mm_token_type_ids", "return_text_replacement_offsets")
        }

        counts = [t.count(self.image_token) for t in texts]
        flat_images = self._flatten_images(images, counts)
        if sum(counts) != len(flat_images):
            raise ValueError(
                f"The number of {self.image_token} tokens in the prompts should be the same as the number of images: "
                f"the prompts contain {sum(counts)} ({counts} per prompt) and {len(flat_images)} images were given"
            )
        data, replacements = {}, []
        if flat_images:
            processed, replacements = self._process_images(flat_images, **output_kwargs["images_kwargs"])
            data["pixel_values"] = processed["pixel_values"]
            data["task_prompt_ids"] = [self.task_prompt_ids for _ in flat_images]
        _, replacement_offsets = self.get_text_with_replacements(list(texts), replacements)

        add_special_tokens = text_kwargs.get("add_special_tokens") is not False
        if text_kwargs.get("add_special_tokens_as_original"):
            add_special_tokens = True
        with_offsets = bool(text_kwargs.get("return_offsets_mapping"))
        encoded = [self._encode_prompt(t, add_special_tokens, with_offsets) for t in texts]
        sequences, offsets = self._truncate([ids for ids, _ in encoded], [o for _, o in encoded], text_kwargs)
        padded = self.tokenizer.pad(
            {"input_ids": sequences},
            padding=text_kwargs.get("padding") or False,
            max_length=text_kwargs.get("max_length"),
            pad_to_multiple_of=text_kwargs.get("pad_to_multiple_of"),
            padding_side=text_kwargs.get("padding_side"),
            return_attention_mask=text_kwargs.get("return_attention_mask") is not False,
        )
        input_ids = padded["input_ids"]
        if return_tensors is not None and len({len(s) for s in input_ids}) > 1:
            raise ValueError("Prompts of different lengths need padding=True to be returned as tensors")
        data["input_ids"] = input_ids
        if "attention_mask" in padded:
            data["attention_mask"] = padded["attention_mask"]
        if with_offsets:
            if any(spans is None for spans in offsets):
                raise ValueError("return_offsets_mapping needs a fast tokenizer")
            side = text_kwargs.get("padding_side") or self.tokenizer.padding_side
            data["offset_mapping"] = [_pad_to(spans, len(row), side) for spans, row in zip(offsets, input_ids)]
        if flags["return_mm_token_type_ids"]:
            data["mm_token_type_ids"] = self.create_mm_token_type_ids(input_ids)
        if flags["return_text_replacement_offsets"]:
            data["text_replacement_offsets"] = replacement_offsets
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    def _flatten_images(self, images, counts) -> list:
        """One image, a flat list in prompt order, or one list (or None) per prompt -> a flat list."""
        if images is None:
            return []
        if not isinstance(images, (list, tuple)):
            return [images]
        if images and all(isinstance(group, (list, tuple)) or group is None for group in images):
            if len(images) != len(counts):
                raise ValueError(
                    f"The number of {self.image_token} tokens in the prompts should be the same as the number of "
                    f"images: {len(images)} lists of images were given for {len(counts)} prompts"
                )
            for index, (group, count) in enumerate(zip(images, counts)):
                if len(group or []) != count:
                    raise ValueError(
                        f"The number of {self.image_token} tokens in the prompts should be the same as the number of "
                        f"images: prompt {index} has {count} and {len(group or [])} images were given for it"
                    )
            return [image for group in images for image in group or []]
        return list(images)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        _check_conversations(conversation)
        # The original always tokenized with the tokenizer's special tokens (see FlorenceVLTextKwargs).
        processor_kwargs = dict(kwargs.pop("processor_kwargs", None) or {})
        chosen = (processor_kwargs, processor_kwargs.get("text_kwargs") or {}, kwargs)
        if not any("add_special_tokens" in options for options in chosen):
            processor_kwargs["add_special_tokens_as_original"] = True
        return super().apply_chat_template(conversation, chat_template, processor_kwargs=processor_kwargs, **kwargs)


def _check_texts(text) -> list[str]:
    """`text` as a list of prompts: one string, or a non-empty list/tuple of strings, each valid Unicode."""
    if isinstance(text, str):
        texts = [text]
    elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        texts = list(text)
    else:
        got = type(text).__name__ if not isinstance(text, (list, tuple)) else "a list holding non-strings"
        raise ValueError(f"`text` must be a string or a list of strings; got {got}")
    if not texts:
        raise ValueError("`text` is an empty list: pass at least one prompt")
    for index, prompt in enumerate(texts):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"Prompt {index} is not valid Unicode: a lone surrogate {prompt[error.start]!r} at position {error.start}"
            ) from error
    return texts


def _check_conversations(conversation):
    """A chat (a non-empty list of messages with a `role` and a string or list `content`) or a list of chats."""
    chats = conversation if isinstance(conversation, (list, tuple)) and conversation and all(
        isinstance(chat, (list, tuple)) for chat in conversation) else [conversation]  # fmt: skip
    for number, chat in enumerate(chats):
        where = f"conversation {number}" if len(chats) > 1 else "the conversation"
        if not isinstance(chat, (list, tuple)) or not chat:
            raise ValueError(f"{where} must be a non-empty list of messages, got {chat!r:.80}")
        for index, message in enumerate(chat):
            # messages are dicts, or objects with the same attributes (transformers accepts both)
            role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
            if not isinstance(role, str):
                raise ValueError(f"message {index} of {where} needs a `role` string, got {message!r:.80}")
            if isinstance(message, dict) and not isinstance(message.get("content"), (str, list, tuple)):
                raise ValueError(f"message {index} of {where} needs a `content` string or list of parts")


def _check_text_kwargs(text_kwargs: dict):
    # transformers validates image options against the image processor's typed kwargs, but not text options.
    if text_kwargs.get("padding_side") not in (None, "left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {text_kwargs['padding_side']!r}")
    for name in ("max_length", "pad_to_multiple_of"):
        value = text_kwargs.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _pad_to(spans: list, length: int, side: str) -> list:
    """Token spans padded with `(0, 0)` (the span of a padding token) to `length`, on `side`."""
    gap = [(0, 0)] * (length - len(spans))
    return gap + list(spans) if side == "left" else list(spans) + gap


__all__ = ["FlorenceVLProcessor"]
