"""Florence-VL processor: images as the original (pad to square, Florence-2's CLIP preprocessing), prompts tokenized
the way the original LLaVA code fed its LLM, and the Florence-2 task prompts that yield the breadth features.

Part of the Hub payload: imports only torch, transformers and PIL.
"""

import PIL.Image
import PIL.ImageOps
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import load_image
from transformers.processing_utils import ProcessorMixin

SPIECE_UNDERLINE = "\u2581"


def _to_rgb(image, index: int) -> PIL.Image.Image:
    """Any PIL mode (and arrays/tensors, paths, URLs) -> an upright 8-bit RGB PIL image."""
    if isinstance(image, str):
        try:
            image = load_image(image)
        except Exception as error:
            raise ValueError(f"Image {index} could not be read from {image!r}: {error}") from error
    elif not isinstance(image, PIL.Image.Image):
        array = torch.as_tensor(image).detach().cpu()
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.permute(1, 2, 0)
        if array.dtype != torch.uint8:
            array = array.double()
            scale = 255.0 if array.numel() and array.max() <= 1.0 else 1.0
            array = (array * scale).clamp(0, 255).round().to(torch.uint8)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        image = PIL.Image.fromarray(array.contiguous().numpy())
    if image.width == 0 or image.height == 0:
        raise ValueError(f"Image {index} is empty ({image.width}x{image.height})")
    try:
        image.load()
    except Exception as error:
        raise ValueError(f"Image {index} could not be decoded: {error}") from error
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16/32-bit integer greyscale: PIL's convert("RGB") would clip at 255; rescale to 8 bits instead.
        values = torch.tensor(list(image.convert("I").getdata()), dtype=torch.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        values = (values * (255.0 / top)).clamp(0, 255).round().to(torch.uint8)
        image = PIL.Image.frombytes("L", image.size, values.numpy().tobytes())
    return image.convert("RGB")


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
        task_prompts: Florence-2 task prompt texts, by name (the breadth features).
        task_prompt_ids: their Florence-2 token ids, padded to one length, in the same order.
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
        task_prompts: dict | None = None,
        task_prompt_ids: list | None = None,
        image_aspect_ratio: str = "pad",
        sentencepiece_leading_space: bool = False,
        **kwargs,
    ):
        if image_aspect_ratio not in ("pad", "square"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'square', got {image_aspect_ratio!r}")
        self.image_token = image_token
        self.num_image_tokens = num_image_tokens
        self.task_prompts = dict(task_prompts or {})
        self.task_prompt_ids = [list(row) for row in (task_prompt_ids or [])]
        if len(self.task_prompts) != len(self.task_prompt_ids):
            raise ValueError("task_prompts and task_prompt_ids must have one entry per prompt")
        self.image_aspect_ratio = image_aspect_ratio
        self.sentencepiece_leading_space = sentencepiece_leading_space
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token) if tokenizer is not None else None
        if tokenizer is not None and (self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id):
            raise ValueError(f"The tokenizer has no {image_token!r} token: add it with tokenizer.add_tokens first")

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
        for index, (token_id, (start, end)) in enumerate(spans + [(None, (len(text), len(text)))]):
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
        side = padding_side or self.tokenizer.padding_side
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
        kwargs.pop("return_mm_token_type_ids", None)
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
        if truncation and max_length is not None:
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
            pixel_values = self.image_processor(self.preprocess_images(flat_images), return_tensors="np")
            data["pixel_values"] = pixel_values["pixel_values"]
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
