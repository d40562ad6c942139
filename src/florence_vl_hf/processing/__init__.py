"""Building a Florence-VL processor from a tokenizer and a model config (not part of the Hub payload)."""

from functools import lru_cache
from importlib import resources
from pathlib import Path

from transformers import AutoTokenizer, CLIPImageProcessorPil

from ..families import FAMILY_NAMES, LLMFamily, family, family_of
from .processing_florence_vl import FlorenceVLProcessor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = 3
IMAGE_TOKEN = "<image>"
FLORENCE2_ASSETS = "florence-2-large"


def asset_dir(name: str) -> Path:
    """Folder of a bundled tokenizer/config set, e.g. 'florence-2-large' (an LLM family's: `family(name).asset_dir`)."""
    path = Path(str(resources.files("florence_vl_hf") / "assets" / name))
    if not path.is_dir():
        raise FileNotFoundError(f"No bundled assets named {name!r} in {path.parent}")
    return path


def bundled_file(name: str) -> Path:
    """A file of the bundled assets: 'shapes.png', 'shapes_vqa_example.json', 'shapes_vqa_example.png'."""
    return Path(str(resources.files("florence_vl_hf") / "assets" / name))


def sample_image_path() -> Path:
    """The bundled test image: a red circle, a blue square, a green triangle and the word SHAPES."""
    return bundled_file("shapes.png")


def sample_image():
    """`sample_image_path()` opened as an RGB PIL image."""
    from PIL import Image

    with Image.open(sample_image_path()) as image:
        return image.convert("RGB")


def load_chat_template(name: str) -> str:
    """The chat template of the LLM family `name` ("phi3" or "llama3")."""
    family(name)
    return (resources.files("florence_vl_hf.processing") / "chat_templates" / f"{name}.jinja").read_text()


def family_for(config, template: str | None = None) -> LLMFamily:
    """The LLM family named `template`, or by default the family of the config's LLM."""
    if template is not None:
        return family(template)
    try:
        return family_of(config.text_config)
    except ValueError as error:
        raise ValueError(f"{error}: pass template= one of {FAMILY_NAMES}") from None


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


@lru_cache(maxsize=1)
def florence2_tokenizer():
    """The bundled Florence-2 tokenizer (Florence-2-large's), which encodes the task prompts."""
    return AutoTokenizer.from_pretrained(str(asset_dir(FLORENCE2_ASSETS)))


def check_task_prompts(config) -> None:
    """Refuse a config whose task prompt texts are missing, or do not encode to its task prompt ids."""
    names, texts, ids = config.task_prompt_names or [], config.task_prompt_texts, config.task_prompt_ids or []
    if texts is None:
        raise ValueError(
            f"The config has no task_prompt_texts for its task prompts {names}: the processor needs their texts "
            "(FlorenceVLConfig(task_prompt_texts=...))"
        )
    if not names:
        return
    for name, text, expected, encoded in zip(names, texts, ids, encode_task_prompts(texts, florence2_tokenizer())):
        if encoded != list(expected):
            raise ValueError(
                f"Task prompt {name!r}: its text {text!r} encodes to {encoded} with the Florence-2 tokenizer, but the "
                f"config's task_prompt_ids give {list(expected)} (encode_task_prompts gives the ids of texts)"
            )


def build_processor(config, tokenizer=None, template: str | None = None) -> FlorenceVLProcessor:
    """A processor matching `config` (a FlorenceVLConfig): image size, token count, image token id, task prompts.

    `tokenizer` is a tokenizer object or a folder; by default the bundled tokenizer of the config's LLM family
    (`template`, "phi3" or "llama3", names the family otherwise; it also picks the chat template). The config is
    read, never changed: ValueError when its `image_token_id` is not the tokenizer's `<image>` id, when its LLM
    embeds fewer rows than the tokenizer has, or when its task prompt texts do not encode to its task prompt ids.
    """
    llm_family = family_for(config, template)
    if tokenizer is None:
        tokenizer = llm_family.asset_dir
    if isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    tokenizer = prepare_tokenizer(tokenizer)
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens (with {IMAGE_TOKEN}) but the LLM embeds only "
            f"{config.text_config.vocab_size}: resize the model's token embeddings first"
        )
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if config.image_token_id != image_token_id:
        raise ValueError(
            f"The config's image_token_id is {config.image_token_id} but the tokenizer's {IMAGE_TOKEN} id is "
            f"{image_token_id}: build the config with image_token_id={image_token_id}"
        )
    check_task_prompts(config)
    return FlorenceVLProcessor(
        image_processor=florence2_image_processor(config.image_size),
        tokenizer=tokenizer,
        chat_template=load_chat_template(llm_family.name),
        image_token=IMAGE_TOKEN,
        num_image_tokens=config.num_image_tokens,
        task_prompt_names=list(config.task_prompt_names),
        task_prompt_texts=list(config.task_prompt_texts),
        task_prompt_ids=config.task_prompt_ids,
        # The original used the slow sentencepiece tokenizer for Phi-3.5 (see FlorenceVLProcessor).
        sentencepiece_leading_space=llm_family.sentencepiece_leading_space,
    )


__all__ = [
    "FlorenceVLProcessor",
    "asset_dir",
    "build_processor",
    "bundled_file",
    "check_task_prompts",
    "encode_task_prompts",
    "family_for",
    "florence2_image_processor",
    "florence2_tokenizer",
    "sample_image",
    "sample_image_path",
    "load_chat_template",
    "prepare_tokenizer",
]
