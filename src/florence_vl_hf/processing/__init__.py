"""Building a Florence-VL processor from a tokenizer and a model config (not part of the Hub payload)."""

from importlib import resources
from pathlib import Path

from transformers import AutoTokenizer, CLIPImageProcessorPil

from ..modeling.configuration_florence_vl import DEFAULT_TASK_PROMPTS
from .processing_florence_vl import FlorenceVLProcessor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = 3
CHAT_TEMPLATES = ("phi3", "llama3")
# The LLM families of the official checkpoints and their conversation format.
TEMPLATE_FOR_MODEL_TYPE = {"phi3": "phi3", "llama": "llama3"}
IMAGE_TOKEN = "<image>"


def asset_dir(name: str) -> Path:
    """Folder of a bundled tokenizer/config set: 'phi-3.5-mini-instruct', 'llama-3.1-8b-instruct', 'florence-2-large'."""
    path = Path(str(resources.files("florence_vl_hf") / "assets" / name))
    if not path.is_dir():
        raise FileNotFoundError(f"No bundled assets named {name!r} in {path.parent}")
    return path


def sample_image_path() -> Path:
    """The bundled test image: a red circle, a blue square, a green triangle and the word SHAPES."""
    return Path(str(resources.files("florence_vl_hf") / "assets" / "shapes.png"))


def sample_image():
    """`sample_image_path()` opened as an RGB PIL image."""
    from PIL import Image

    with Image.open(sample_image_path()) as image:
        return image.convert("RGB")


def load_chat_template(name: str) -> str:
    if name not in CHAT_TEMPLATES:
        raise ValueError(f"Unknown chat template {name!r}; choose one of {CHAT_TEMPLATES}")
    return (resources.files("florence_vl_hf.processing") / "chat_templates" / f"{name}.jinja").read_text()


def template_for_text_config(text_config) -> str:
    try:
        return TEMPLATE_FOR_MODEL_TYPE[text_config.model_type]
    except KeyError:
        raise ValueError(
            f"No default chat template for a {text_config.model_type!r} LLM; pass template= one of {CHAT_TEMPLATES}"
        ) from None


def florence2_image_processor(image_size: int = 768) -> CLIPImageProcessorPil:
    """Florence-2's preprocessing: resize to image_size x image_size (bicubic), rescale 1/255, ImageNet normalize."""
    size = {"height": image_size, "width": image_size}
    return CLIPImageProcessorPil(
        do_resize=True,
        size=size,
        resample=BICUBIC,
        do_center_crop=False,
        crop_size=size,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=False,  # the processor hands over RGB images already (see FlorenceVLProcessor)
    )


def prepare_tokenizer(tokenizer):
    """Add the `<image>` token and a pad token the way the original training did, and pad on the left for
    batched generation."""
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})  # the original's llama3 training added '<pad>'
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # saved with the tokenizer, so a reload pads left too
    return tokenizer


def encode_task_prompts(texts: list[str], florence_tokenizer) -> list[list[int]]:
    """Florence-2 token ids of task prompts, padded to the longest with the tokenizer's pad id (as the original)."""
    encoded = florence_tokenizer(list(texts), padding="longest")["input_ids"]
    return [list(row) for row in encoded]


def build_processor(config, tokenizer=None, template: str | None = None) -> FlorenceVLProcessor:
    """A processor matching `config` (a FlorenceVLConfig): image size, token count, image token id, task prompts.

    `tokenizer` is a tokenizer object or a folder; by default the bundled Phi-3.5 or Llama-3.1 tokenizer matching
    the config's LLM. The config's `image_token_id` is updated to the tokenizer's `<image>` id.
    """
    template = template or template_for_text_config(config.text_config)
    if tokenizer is None:
        tokenizer = asset_dir({"phi3": "phi-3.5-mini-instruct", "llama3": "llama-3.1-8b-instruct"}[template])
    if isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    tokenizer = prepare_tokenizer(tokenizer)
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens (with {IMAGE_TOKEN}) but the LLM embeds only "
            f"{config.text_config.vocab_size}: resize the model's token embeddings first"
        )
    processor = FlorenceVLProcessor(
        image_processor=florence2_image_processor(config.image_size),
        tokenizer=tokenizer,
        chat_template=load_chat_template(template),
        image_token=IMAGE_TOKEN,
        num_image_tokens=config.num_image_tokens,
        task_prompt_names=list(config.task_prompt_names),
        task_prompt_texts=[DEFAULT_TASK_PROMPTS.get(name, name) for name in config.task_prompt_names],
        task_prompt_ids=config.task_prompt_ids,
        # The original used the slow sentencepiece tokenizer for Phi-3.5 (see FlorenceVLProcessor).
        sentencepiece_leading_space=template == "phi3",
    )
    config.image_token_id = processor.image_token_id
    return processor


__all__ = [
    "FlorenceVLProcessor",
    "asset_dir",
    "build_processor",
    "encode_task_prompts",
    "florence2_image_processor",
    "sample_image",
    "sample_image_path",
    "load_chat_template",
    "prepare_tokenizer",
]
