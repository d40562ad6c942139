"""Florence-VL: Florence-2 (DaViT + BART encoder) as the vision encoder of a causal LM, with depth-breadth fusion.

Part of the Hub payload: imports only torch, transformers and its sibling configuration file.
"""

import functools
import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPast, BaseModelOutputWithPooling
from transformers.models.auto import AutoModel
from transformers.models.bart.modeling_bart import BartEncoder
from transformers.models.florence2.modeling_florence2 import (
    Florence2MultiModalProjector,
    Florence2PreTrainedModel,
    Florence2VisionBackbone,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging, torch_compilable_check
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .configuration_florence_vl import DEPTH_FEATURE, FlorenceVLConfig, FlorenceVLVisionConfig


logger = logging.get_logger(__name__)

# transformers 5.24 renamed `past_key_values` to `cache` (in outputs and in forward signatures; the old name is
# accepted until 5.40). The payload runs on both sides of the rename, under the name the installed version uses.
CACHE_RENAMED = "cache" in BaseModelOutputWithPast.__dataclass_fields__
CACHE_KWARG = "cache" if CACHE_RENAMED else "past_key_values"

if CACHE_RENAMED:
    from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast as _ModelOutputBase
    from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast as _CausalLMOutputBase
else:
    from transformers.modeling_outputs import BaseModelOutputWithPast as _ModelOutputBase
    from transformers.modeling_outputs import CausalLMOutputWithPast as _CausalLMOutputBase


def _accept_cache_kwarg(forward):
    """`forward` takes `cache`; the old name `past_key_values` is accepted as well. From transformers 5.24 on, through
    transformers' own `deprecate_kwarg` (as its LLaVA does); before it, `past_key_values` is the library's current
    name, which `generate` passes, so it is renamed without a warning."""
    if CACHE_RENAMED:
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        if "past_key_values" in kwargs:
            if kwargs.get("cache") is not None:
                raise ValueError("You cannot specify both `cache` and `past_key_values`: use `cache` only")
            kwargs["cache"] = kwargs.pop("past_key_values")
        return forward(*args, **kwargs)

    return wrapper


@dataclass
class FlorenceVLModelOutputWithPast(_ModelOutputBase):
    r"""
    image_hidden_states (`torch.FloatTensor`, *optional*):
        The fused, projected image features, shape `(num_images, num_image_tokens, hidden_size)`.
    """

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class FlorenceVLCausalLMOutputWithPast(_CausalLMOutputBase):
    r"""
    image_hidden_states (`torch.FloatTensor`, *optional*):
        The fused, projected image features, shape `(num_images, num_image_tokens, hidden_size)`.
    """

    image_hidden_states: torch.FloatTensor | None = None


def _output_fields(outputs, image_outputs) -> dict:
    """The cache and, where the output class has it (transformers >= 5.24), the image encoder's output."""
    fields = {CACHE_KWARG: getattr(outputs, CACHE_KWARG)}
    if CACHE_RENAMED:
        fields["image_outputs"] = image_outputs
    return fields


@dataclass
class FlorenceVLImageFeaturesOutput(BaseModelOutputWithPooling):
    r"""
    source_features (`dict[str, torch.FloatTensor]`, *optional*):
        With `return_source_features=True`: every feature set before fusion, as fusion receives it, keyed by source
        name: `"depth"` (the projected DaViT tokens) and each of the config's task prompts (the Florence-2 encoder's
        output at the image positions), each `(num_images, tokens, width)`, without the average-image token when
        the config leaves it out.
    """

    source_features: dict[str, torch.FloatTensor] | None = None


class LRUCache:
    """The entries of the last `max_images` images used, the least recently used dropped first.

    The package's one LRU store (training's `ImageCache` builds on it too). An OrderedDict rather than
    `functools.lru_cache`: entries are put after a computation over a whole batch, not returned by a call per key.
    """

    def __init__(self, max_images: int):
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        self.max_images = max_images
        self.entries: OrderedDict = OrderedDict()

    def get(self, key):
        """The entry of `key` (now the most recently used), or None."""
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key, entry):
        self.entries[key] = entry
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_images:
            self.entries.popitem(last=False)


class FlorenceVLVisionFeatureCache(LRUCache):
    """Fused image features of the last `max_images` images, keyed by a hash of their pixel values and task prompts.

    For multi-turn chats about one image: each turn re-sends the image, and a hit skips the vision tower. Entries are
    the exact tensors an earlier call returned (same dtype and device), without autograd history. They belong to one
    state of the weights: `sync` drops them all when the weights they came from have changed (in-place updates,
    `load_state_dict`, optimizer steps and `.to()` all show in the parameters' version counters or storage).
    """

    def __init__(self, max_images: int = 8):
        super().__init__(max_images)  # entries: key -> (depth, projected)
        self.hits = 0
        self.misses = 0
        self.weights_state: tuple | None = None

    def sync(self, weights_state: tuple):
        """Forget every entry unless `weights_state` is the state the entries were computed with."""
        if weights_state != self.weights_state:
            self.entries.clear()
            self.weights_state = weights_state

    @staticmethod
    def key(pixel_values: torch.Tensor, task_prompt_ids: torch.Tensor) -> str:
        digest = hashlib.blake2b(digest_size=20)
        for tensor in (pixel_values, task_prompt_ids):
            tensor = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def get(self, key: str):
        entry = super().get(key)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def put(self, key: str, depth: torch.Tensor, projected: torch.Tensor):
        super().put(key, (depth.detach(), projected.detach()))

    def clear(self):
        self.entries.clear()
        self.hits = self.misses = 0
        self.weights_state = None


class FlorenceVLVisionTower(Florence2PreTrainedModel):
    """Florence-2 without its decoder: DaViT, image projection + norm (with position embeddings), BART encoder.

    A Florence-2 `PreTrainedModel` on `config.vision_config`, so that per-sub-model settings (attention
    implementation, initialisation) reach it as they reach Florence-2's own modules."""

    config: FlorenceVLVisionConfig

    def __init__(self, config: FlorenceVLVisionConfig):
        super().__init__(config)
        self.backbone = Florence2VisionBackbone(config.vision_config)
        self.image_projector = Florence2MultiModalProjector(config)
        self.encoder = BartEncoder(config.text_config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        task_prompt_ids: torch.Tensor,
        task_prompt_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor, BaseModelOutput | None]:
        """The depth feature `(N, T, D)`, the breadth features `(N, P, T, D)` for prompts `(N, P, L)`, and the
        encoder's output (its `hidden_states` / `attentions` when asked for; None without prompts)."""
        depth = self.image_projector(self.backbone(pixel_values).last_hidden_state)
        num_images, num_tokens, width = depth.shape
        num_prompts = task_prompt_ids.shape[1]
        if num_prompts == 0:
            return depth, depth.new_zeros(num_images, 0, num_tokens, width), None

        prompt_embeds = self.encoder.embed_tokens(task_prompt_ids.flatten(0, 1)).to(depth.dtype)
        image_tokens = depth.repeat_interleave(num_prompts, dim=0)
        attention_mask = None
        if task_prompt_mask is not None:
            image_mask = task_prompt_mask.new_ones(num_images * num_prompts, num_tokens)
            attention_mask = torch.cat([image_mask, task_prompt_mask.flatten(0, 1)], dim=1)
        encoded = self.encoder(
            inputs_embeds=torch.cat([image_tokens, prompt_embeds], dim=1), attention_mask=attention_mask, **kwargs
        )
        breadth = encoded.last_hidden_state[:, :num_tokens].reshape(num_images, num_prompts, num_tokens, width)
        return depth, breadth, encoded


class FlorenceVLMultiModalProjector(nn.Module):
    """LLaVA's `mlp{N}x_gelu`: Linear(in, H), then N-1 times (GELU, Linear(H, H))."""

    def __init__(self, config: FlorenceVLConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        dims = [config.projector_input_dim] + [hidden] * config.projector_depth
        self.linears = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(config.projector_depth))
        for linear in self.linears:
            linear._pytorch_default_init = True
        self.act = ACT2FN[config.projector_hidden_act]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden_states = self.linears[0](features)
        for linear in self.linears[1:]:
            hidden_states = linear(self.act(hidden_states))
        return hidden_states


class FlorenceVLPreTrainedModel(PreTrainedModel):
    config: FlorenceVLConfig
    config_class = FlorenceVLConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Florence2VisionBlock", "BartEncoderLayer"]
    _skip_keys_device_placement = [CACHE_KWARG]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        if getattr(module, "_pytorch_default_init", False):
            # The original builds the projector from plain nn.Linear layers (PyTorch's default init). The LLM's
            # initializer_range (0.02) would shrink image features ~100x below the text embeddings through 3 layers.
            bound = 1 / math.sqrt(module.in_features)
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            init.uniform_(module.bias, -bound, bound)
            return
        super()._init_weights(module)  # the vision tower's modules get Florence-2's own _init_weights

    def save_pretrained(self, save_directory, *args, **kwargs):
        # transformers' auto_map names only the class being saved; a trust_remote_code folder ships both model
        # classes, and serving engines (vLLM's Transformers backend) build the bare model with AutoModel.
        registered = {
            cls._auto_class: f"{__name__.rsplit('.', 1)[-1]}.{cls.__name__}"
            for cls in (FlorenceVLModel, FlorenceVLForConditionalGeneration)
            if cls._auto_class is not None
        }
        if registered:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **registered}
        return super().save_pretrained(save_directory, *args, **kwargs)


class FlorenceVLModel(FlorenceVLPreTrainedModel):
    def __init__(self, config: FlorenceVLConfig):
        super().__init__(config)
        self.vision_tower = FlorenceVLVisionTower(config.vision_config)
        self.multi_modal_projector = FlorenceVLMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.vision_feature_cache: FlorenceVLVisionFeatureCache | None = None
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def _check_pixel_values(self, pixel_values: torch.Tensor):
        size = self.config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[-2:] != (size, size):
            raise ValueError(
                f"pixel_values must have shape (num_images, 3, {size}, {size}) for this model, "
                f"got {tuple(pixel_values.shape)}"
            )

    def _task_prompts(self, task_prompt_ids, num_images, device, every_prompt: bool = False):
        """(the prompts to encode, their padding mask or None, {source name: its row among them}): the prompts
        `vision_feature_sources` selects, or with `every_prompt` all the config's."""
        names = self.config.task_prompt_names
        if task_prompt_ids is None:
            ids = torch.tensor(self.config.task_prompt_ids, dtype=torch.long, device=device)
            task_prompt_ids = ids.unsqueeze(0).expand(num_images, -1, -1)
        elif task_prompt_ids.ndim != 3 or task_prompt_ids.shape[:2] != (num_images, len(names)):
            raise ValueError(
                f"task_prompt_ids must have shape (num_images={num_images}, "
                f"num_prompts={len(names)}, prompt_length), got {tuple(task_prompt_ids.shape)}"
            )
        encoded = names if every_prompt else [s for s in self.config.vision_feature_sources if s != DEPTH_FEATURE]
        task_prompt_ids = task_prompt_ids[:, [names.index(name) for name in encoded]].to(device)
        mask = None
        if not self.config.task_prompt_attend_padding:
            mask = (task_prompt_ids != self.config.vision_config.text_config.pad_token_id).long()
        return task_prompt_ids, mask, {name: row for row, name in enumerate(encoded)}

    def enable_vision_feature_cache(self, max_images: int = 8) -> FlorenceVLVisionFeatureCache:
        """Reuse the image features of the last `max_images` images (e.g. a second question about the same image
        skips the vision tower). Used only while gradients are off (`torch.no_grad()`, `inference_mode()`,
        `generate`); entries are dropped when the vision weights change, except through `.data` (invisible to autograd
        too: call `cache.clear()` then). `disable_vision_feature_cache()` ends it."""
        self.vision_feature_cache = FlorenceVLVisionFeatureCache(max_images)
        return self.vision_feature_cache

    def disable_vision_feature_cache(self):
        self.vision_feature_cache = None

    def _vision_weights_state(self) -> tuple:
        vision = (self.vision_tower, self.multi_modal_projector)
        tensors = [tensor for module in vision for tensor in (*module.parameters(), *module.buffers())]
        return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)

    def _check_positions(self, cache: Cache | None, new_positions: int):
        """Warn about positions past the LLM's `max_position_embeddings` (scaled by a linear or dynamic RoPE factor):
        the model was not trained on them, and answers there are usually meaningless. A warning, not an error, as in
        transformers, whose own tests run RoPE models past that length."""
        text_config = self.config.text_config
        limit = getattr(text_config, "max_position_embeddings", None)
        if limit is None or torch.compiler.is_compiling():
            return
        past = cache.get_seq_length() if cache is not None else 0
        if not isinstance(past, int) or past + new_positions <= limit:  # every decoding step ends here
            return
        rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
        if rope.get("rope_type") in ("linear", "dynamic"):
            limit = int(limit * rope.get("factor", 1.0))
            if past + new_positions <= limit:
                return
        what = f"The prompt has {new_positions} tokens" if past == 0 else f"Positions up to {past + new_positions - 1}"
        logger.warning_once(
            f"{what}, past the {limit} positions the language model was trained on "
            "(text_config.max_position_embeddings): its output there is unreliable; shorten the prompt or lower "
            "max_new_tokens"
        )

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        task_prompt_ids: torch.LongTensor | None = None,
        *,
        return_source_features: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | FlorenceVLImageFeaturesOutput:
        """Fused, projected image features: `pooler_output` has shape `(num_images, num_image_tokens, hidden)`.

        `task_prompt_ids` `(num_images, num_prompts, prompt_length)` come from the processor; the config's prompts
        are used when absent. `last_hidden_state` holds the depth feature (the projected DaViT tokens);
        `hidden_states` / `attentions` (with `output_hidden_states` / `output_attentions`) are the Florence-2
        encoder's, over the `num_images * num_prompts` image-and-prompt sequences. `return_source_features=True`
        also returns every feature set before fusion (`source_features`); the encoder then runs every task prompt
        of the config, whichever `vision_feature_sources` selects, and the vision feature cache is not used.
        """
        self._check_pixel_values(pixel_values)
        prompts, prompt_mask, breadth_row = self._task_prompts(
            task_prompt_ids, pixel_values.shape[0], pixel_values.device, every_prompt=return_source_features
        )
        cache = self.vision_feature_cache
        wants_internals = return_source_features or any(
            kwargs.get(name) for name in ("output_hidden_states", "output_attentions")
        )
        if cache is None or wants_internals or torch.is_grad_enabled():
            depth, projected, encoded, sources = self._image_features(
                pixel_values, prompts, prompt_mask, breadth_row, **kwargs
            )
            return FlorenceVLImageFeaturesOutput(
                last_hidden_state=depth,
                pooler_output=projected,
                hidden_states=getattr(encoded, "hidden_states", None),
                attentions=getattr(encoded, "attentions", None),
                source_features=sources if return_source_features else None,
            )

        cache.sync(self._vision_weights_state())
        keys = [cache.key(pixel_values[i], prompts[i]) for i in range(pixel_values.shape[0])]
        found = [cache.get(key) for key in keys]
        first_row = {}  # one row per distinct image not cached yet
        for row, (key, entry) in enumerate(zip(keys, found)):
            if entry is None:
                first_row.setdefault(key, row)
        if first_row:
            rows = list(first_row.values())
            mask = prompt_mask[rows] if prompt_mask is not None else None
            depth, projected, _, _ = self._image_features(
                pixel_values[rows], prompts[rows], mask, breadth_row, **kwargs
            )
            computed = {key: (depth[i], projected[i]) for i, key in enumerate(first_row)}
            for key, entry in computed.items():
                cache.put(key, *entry)
            found = [entry if entry is not None else computed[key] for key, entry in zip(keys, found)]
        return FlorenceVLImageFeaturesOutput(
            last_hidden_state=torch.stack([entry[0] for entry in found]),
            pooler_output=torch.stack([entry[1] for entry in found]),
        )

    def _image_features(self, pixel_values, prompts, prompt_mask, breadth_row, **kwargs):
        """(depth, fused and projected features, the encoder's output, {source: features before fusion})."""
        depth, breadth, encoded = self.vision_tower(pixel_values, prompts, prompt_mask, **kwargs)
        sources = {DEPTH_FEATURE: depth, **{name: breadth[:, row] for name, row in breadth_row.items()}}
        if not self.config.include_average_image_token:
            sources = {name: feature[:, 1:] for name, feature in sources.items()}
        features = [sources[name] for name in self.config.vision_feature_sources]
        if self.config.fusion == "channel":
            fused = torch.cat(features, dim=-1)
        elif self.config.fusion == "token":
            fused = torch.cat(features, dim=1)
        else:
            fused = torch.stack(features).mean(dim=0)
        return depth, self.multi_modal_projector(fused), encoded, sources

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
        if input_ids is None:
            image_embedding = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == image_embedding).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        num_tokens = mask.sum()
        torch_compilable_check(
            num_tokens * inputs_embeds.shape[-1] == image_features.numel(),
            lambda: (
                f"Image features and image tokens do not match: {int(num_tokens)} image tokens in the input, "
                f"{image_features.shape[0]} features ({self.config.num_image_tokens} per image). Each image needs "
                f"exactly {self.config.num_image_tokens} `<image>` tokens: was a prompt truncated?"
            ),
        )
        return mask.unsqueeze(-1).to(inputs_embeds.device)

    @can_return_tuple
    @_accept_cache_kwarg
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        task_prompt_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | FlorenceVLModelOutputWithPast:
        """Without `pixel_values` (or `mm_encoder_outputs`), `<image>` ids are embedded like any other token, as in
        transformers' LLaVA: decoding steps, assisted decoding and text-only calls need no image."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and (mm_encoder_outputs or {}).get("image") is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs")
        self._check_positions(cache, (input_ids if inputs_embeds is None else inputs_embeds).shape[1])
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values, task_prompt_ids=task_prompt_ids, return_dict=True)
        image_features = None
        if image_outputs is not None:
            image_features = image_outputs.pooler_output
            if not isinstance(image_features, torch.Tensor):
                image_features = torch.stack(list(image_features))
            image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
            flat = image_features.reshape(-1, image_features.shape[-1])
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, flat)
            inputs_embeds = inputs_embeds.masked_scatter(mask, flat)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **{CACHE_KWARG: cache},
            **kwargs,
        )
        return FlorenceVLModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            **_output_fields(outputs, image_outputs),
        )


class FlorenceVLForConditionalGeneration(FlorenceVLPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: FlorenceVLConfig):
        super().__init__(config)
        self.model = FlorenceVLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        task_prompt_ids: torch.LongTensor | None = None,
        *,
        return_source_features: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | FlorenceVLImageFeaturesOutput:
        return self.model.get_image_features(
            pixel_values, task_prompt_ids=task_prompt_ids, return_source_features=return_source_features, **kwargs
        )

    def enable_vision_feature_cache(self, max_images: int = 8) -> FlorenceVLVisionFeatureCache:
        return self.model.enable_vision_feature_cache(max_images)

    def disable_vision_feature_cache(self):
        self.model.disable_vision_feature_cache()

    @can_return_tuple
    @_accept_cache_kwarg
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        task_prompt_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | FlorenceVLCausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            task_prompt_ids=task_prompt_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs,
            return_dict=True,
            **kwargs,
        )
        # an int keeps that many last positions (0: all), a tensor names the positions
        positions = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, positions, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        return FlorenceVLCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            **_output_fields(outputs, outputs.get("image_outputs")),
        )


__all__ = [
    "FlorenceVLForConditionalGeneration",
    "FlorenceVLImageFeaturesOutput",
    "FlorenceVLVisionFeatureCache",
    "FlorenceVLModel",
    "FlorenceVLPreTrainedModel",
]
