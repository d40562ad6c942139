"""Florence-VL processor: images as the original (pad to square, Florence-2's CLIP preprocessing), prompts tokenized
the way the original LLaVA code fed its LLM, and the Florence-2 task prompts that yield the breadth features.

Part of the Hub payload: imports only torch, transformers and PIL.
"""

import os

from transformers.utils.versions import require_version

# The same range as configuration_florence_vl.TRANSFORMERS_REQUIREMENT (this file can be loaded without that one).
TRANSFORMERS_REQUIREMENT = "transformers>=5.23,<6"
require_version(
    TRANSFORMERS_REQUIREMENT,
    f"Florence-VL's processor supports these transformers releases only: pip install '{TRANSFORMERS_REQUIREMENT}'",
)

import PIL.Image  # noqa: E402
import PIL.ImageOps  # noqa: E402
import torch  # noqa: E402
from transformers.feature_extraction_utils import BatchFeature  # noqa: E402
from transformers.image_utils import load_image  # noqa: E402
from transformers.processing_utils import ProcessorMixin  # noqa: E402

SPIECE_UNDERLINE = "\u2581"


def _to_rgb(image, index: int) -> PIL.Image.Image:
    """Any PIL mode (and arrays/tensors, paths, URLs) -> an upright 8-bit RGB PIL image."""
    if isinstance(image, (str, os.PathLike)):
        source = os.fspath(image)
        try:
            image = PIL.Image.open(source) if os.path.isfile(source) else load_image(source)
        except Exception as error:
            raise ValueError(f"Image {index} could not be read from {source!r}: {error}") from error
    elif not isinstance(image, PIL.Image.Image):
        image = _array_to_image(image)
    if image.width == 0 or image.height == 0:
        raise ValueError(f"Image {index} is empty ({image.width}x{image.height})")
    try:
        image.load()
    except Exception as error:
        raise ValueError(f"Image {index} could not be decoded: {error}") from error
    image = PIL.ImageOps.exif_transpose(image)
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


def _array_to_image(array) -> PIL.Image.Image:
    """HWC or CHW arrays/tensors: uint8 as is, floats in [0, 1] or [0, 255], wider integers as 16-bit."""
    array = torch.as_tensor(array).detach().cpu()
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.permute(1, 2, 0)
    if array.dtype != torch.uint8:
        is_float = array.is_floating_point()
        values = array.to(torch.float64)
        if is_float:
            scale = 255.0 if values.numel() and values.max() <= 1.0 else 1.0
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


class FlorenceVLProcessor(ProcessorMixin):
    r"""
    Processor for Florence-VL: a Florence-2 image processor (CLIP, 768x768 bicubic, ImageNet mean/std) and the LLM's
    tokenizer.

    Args:
        image_processor: the CLIP image processor.
        tokenizer: the LLM tokenizer, with `image_token` added.
        chat_template: Jinja chat template reproducing the original conversation format (phi3 or llama3).
        image_token: placeholder for one image in prompts.
        num_image_tokens: tokens one image occupies in the LLM input (the model config's `num_image_tokens`).
        task_prompt_names / task_prompt_texts: the Florence-2 task prompts (the breadth features), in the model
            config's order.
        task_prompt_ids: their Florence-2 token ids, padded to one length, in the same order.
        padding_side: side on which batches are padded (`"left"` for generation).
        image_aspect_ratio: `"pad"` pads to a square filled with the mean colour before resizing (the official
            checkpoints), `"square"` resizes directly.
        sentencepiece_leading_space: tokenize like the slow sentencepiece tokenizer the original used for Phi-3.5
            (transformers 4.43, `use_fast=False`), whose ids differ from the fast tokenizer's around added tokens
            such as `<|system|>`; the checkpoints were trained on those ids. Needs a fast sentencepiece-BPE
            tokenizer (Llama/Phi style).
    """

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
        padding_side: str = "left",
        sentencepiece_leading_space: bool = False,
        **kwargs,
    ):
        if image_aspect_ratio not in ("pad", "square"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'square', got {image_aspect_ratio!r}")
        self.image_token = image_token
        self.num_image_tokens = num_image_tokens
        self.task_prompt_names = list(task_prompt_names or [])
        self.task_prompt_texts = list(task_prompt_texts or [])
        self.task_prompt_ids = [list(row) for row in (task_prompt_ids or [])]
        if not len(self.task_prompt_names) == len(self.task_prompt_texts) == len(self.task_prompt_ids):
            raise ValueError("task_prompt_names, task_prompt_texts and task_prompt_ids need one entry per prompt")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.image_aspect_ratio = image_aspect_ratio
        self.padding_side = padding_side
        self.sentencepiece_leading_space = sentencepiece_leading_space
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
            image = _to_rgb(image, index)
            out.append(_pad_to_square(image, fill) if self.image_aspect_ratio == "pad" else image)
        return out

    # ------------------------------------------------------------------------------------------------- text
    def _encode_piece(self, text: str, add_special_tokens: bool) -> list[int]:
        if self.sentencepiece_leading_space:
            ids = self._encode_like_slow_sentencepiece(text)
            if add_special_tokens and getattr(self.tokenizer, "add_bos_token", False):
                ids = [self.tokenizer.bos_token_id, *ids]
            return ids
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def _encode_like_slow_sentencepiece(self, text: str) -> list[int]:
        """Ids of the slow sentencepiece LlamaTokenizer (legacy=False) that the original used for Phi-3.5: only the
        start of the text gets the '▁' prefix (a lone '▁' when the text starts with an added token other than the
        named special tokens), and text right after an added token gets none. The fast tokenizer instead prefixes
        every stretch of text between added tokens, so its BPE model is run here on the stretches directly."""
        if not text:
            return []
        backend = self.tokenizer.backend_tokenizer
        encoding = backend.encode(text, add_special_tokens=False)
        added = self.tokenizer.added_tokens_decoder
        spans = [(token_id, span) for token_id, span in zip(encoding.ids, encoding.offsets) if token_id in added]
        ids, cursor = [], 0
        for token_id, (start, end) in spans + [(None, (len(text), len(text)))]:
            stretch = text[cursor:start].replace(" ", SPIECE_UNDERLINE)
            if cursor == 0:
                stretch = SPIECE_UNDERLINE + stretch
                if stretch == SPIECE_UNDERLINE and token_id is not None and added[token_id].content in set(
                    self.tokenizer.all_special_tokens
                ):
                    stretch = ""
            if stretch:
                ids.extend(token.id for token in backend.model.tokenize(stretch))
            if token_id is not None:
                ids.append(token_id)
            cursor = end
        return ids

    def tokenize_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one prompt as LLaVA's `tokenizer_image_token` builds them: the text is split at the image
        token, each piece is tokenized on its own, the first piece's BOS is kept once and the later pieces' first
        token (their BOS) is dropped, and each image becomes `num_image_tokens` image-token ids."""
        pieces = [self._encode_piece(piece, add_special_tokens) for piece in text.split(self.image_token)]
        bos = self.tokenizer.bos_token_id
        offset = 1 if add_special_tokens and pieces[0] and bos is not None and pieces[0][0] == bos else 0
        ids = pieces[0][:offset]
        image_ids = [self.image_token_id] * self.num_image_tokens
        for index, piece in enumerate(pieces):
            if index > 0:
                ids.extend(image_ids)
            ids.extend(piece[offset:])
        return ids

    def _pad(self, sequences, padding, max_length, padding_side):
        longest = max(len(s) for s in sequences)
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max(longest, max_length)
        elif padding in (True, "longest"):
            target = longest
        else:
            return sequences, [[1] * len(s) for s in sequences]
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token to pad a batch")
        side = padding_side or self.padding_side
        ids, masks = [], []
        for sequence in sequences:
            gap = target - len(sequence)
            pad, ones = [pad_id] * gap, [1] * len(sequence)
            ids.append(pad + sequence if side == "left" else sequence + pad)
            masks.append([0] * gap + ones if side == "left" else ones + [0] * gap)
        return ids, masks

    def __call__(
        self,
        images=None,
        text=None,
        videos=None,
        audio=None,
        return_tensors=None,
        padding=False,
        truncation=False,
        max_length: int | None = None,
        padding_side: str | None = None,
        add_special_tokens: bool | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Prepare `text` (one prompt or a batch, each `<image>` marking one image) and `images` (one image, a flat
        list in prompt order, or one list per prompt) for the model.

        Returns `input_ids`, `attention_mask` and, when there are images, `pixel_values` and `task_prompt_ids`
        (one row of task prompts per image). Truncation that would cut through an image's tokens is an error.
        """
        if videos is not None or audio is not None:
            raise ValueError("FlorenceVLProcessor handles images and text only")
        if kwargs.pop("original_special_tokens", False):
            add_special_tokens = None
        if text is None:
            raise ValueError("FlorenceVLProcessor needs `text`: put one `<image>` in it for each image")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("`text` must be a string or a list of strings")
        counts = [t.count(self.image_token) for t in texts]
        flat_images = self._flatten_images(images, counts)
        if sum(counts) != len(flat_images):
            raise ValueError(
                f"The prompts contain {sum(counts)} {self.image_token} markers ({counts} per prompt) but "
                f"{len(flat_images)} images were given: each image needs exactly one {self.image_token} in the text"
            )

        sequences = [self.tokenize_prompt(t, add_special_tokens is not False) for t in texts]
        if truncation not in (False, None, "do_not_truncate") and max_length is not None:
            truncated = [s[:max_length] for s in sequences]
            for index, (full, cut) in enumerate(zip(sequences, truncated)):
                if cut.count(self.image_token_id) != full.count(self.image_token_id):
                    raise ValueError(
                        f"Prompt {index} has {len(full)} tokens and max_length={max_length} would cut through "
                        f"its image tokens ({self.num_image_tokens} per image); raise max_length or shorten the text"
                    )
            sequences = truncated
        input_ids, attention_mask = self._pad(sequences, padding, max_length, padding_side)
        if return_tensors is not None and len({len(s) for s in input_ids}) > 1:
            raise ValueError("Prompts of different lengths need padding=True to be returned as tensors")
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if flat_images:
            processed = self.image_processor(self.preprocess_images(flat_images), return_tensors=return_tensors)
            data["pixel_values"] = processed["pixel_values"]
            data["task_prompt_ids"] = [self.task_prompt_ids for _ in flat_images]
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def _flatten_images(images, counts) -> list:
        if images is None:
            return []
        if not isinstance(images, (list, tuple)):
            return [images]
        if len(images) == len(counts) and all(isinstance(i, (list, tuple)) or i is None for i in images):
            nested = [list(i) if i is not None else [] for i in images]
            for index, (group, count) in enumerate(zip(nested, counts)):
                if len(group) != count:
                    raise ValueError(
                        f"Prompt {index} has {count} image markers but {len(group)} images were given for it"
                    )
            return [image for group in nested for image in group]
        return list(images)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        # transformers tokenizes a rendered prompt that starts with BOS without special tokens; the original always
        # used the tokenizer's defaults (Llama-3.1's prompts therefore start with two BOS tokens).
        processor_kwargs = dict(kwargs.pop("processor_kwargs", None) or {})
        if "add_special_tokens" not in processor_kwargs and "add_special_tokens" not in kwargs:
            processor_kwargs["original_special_tokens"] = True
        return super().apply_chat_template(conversation, chat_template, processor_kwargs=processor_kwargs, **kwargs)


__all__ = ["FlorenceVLProcessor"]
