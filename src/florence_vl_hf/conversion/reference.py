"""The original Florence-VL's algorithm, written apart from the model it checks: the reference of the conversion's
verification and the "original" side of `florence-vl bench`.

Nothing here comes from Florence-VL's modeling code (only names from its config module: the depth feature, the
original's task prompts):

- vision (`OriginalVision`): transformers' native `Florence2ForConditionalGeneration`, decoder included, called
  as the original's vision tower calls its Florence-2 (llava/model/multimodal_encoder/florence_encoder.py):
  `generate(max_new_tokens=1)` on [image tokens; task prompt] for every image and prompt, attending to every
  position (prompt padding included). The depth feature (the DaViT tokens after Florence-2's image
  projection) and each prompt's encoder output at the image positions are read on the way, through forward hooks;
  they are concatenated along channels, depth first, and go through the original's projector (`mlp_projector`);
- language (`OriginalLLM`): the projected features replace the `<image>` placeholders in the LLM's input
  embeddings, and the LLM (its own transformers class) runs on `inputs_embeds`: logits, greedy tokens.
"""

from collections.abc import Sequence

import torch
from torch import nn

from ..modeling.configuration_florence_vl import DEFAULT_TASK_PROMPTS, DEPTH_FEATURE


def mlp_projector(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> nn.Sequential:
    """The original's projector (`DualMLPProjector.encoder_mlp`, llava/model/multimodal_projector/builder.py) holding
    the given `(weight, bias)` of each linear layer: `Linear`, then `Sequential(GELU, Linear)` for every further
    layer, so that its state-dict keys are the original checkpoint's (`0.weight`, `1.1.weight`, ...)."""
    if not layers:
        raise ValueError("the projector needs at least one (weight, bias) layer")
    modules = []
    for index, (weight, bias) in enumerate(layers):
        with torch.device("meta"):
            linear = nn.Linear(weight.shape[1], weight.shape[0])
        linear.load_state_dict({"weight": weight, "bias": bias}, assign=True)
        modules.append(linear if index == 0 else nn.Sequential(nn.GELU(), linear))
    return nn.Sequential(*modules)


def florence2_image_tokens(florence2_config, image_side: int) -> int:
    """Tokens Florence-2's DaViT puts out for a square image of `image_side` pixels: the spatial average, then the
    grid left by its stages (each a strided convolution)."""
    side = image_side
    vision = florence2_config.vision_config
    for kernel, stride, padding in zip(vision.patch_size, vision.patch_stride, vision.patch_padding):
        side = (side + 2 * padding - kernel) // stride + 1
    return 1 + side * side


class OriginalVision:
    """Florence-2 and the projector: `source_features` (before fusion) and `__call__` (fused and projected).

    `florence2` is a native `Florence2ForConditionalGeneration` whose vocabulary has one extra row, its
    `config.image_token_id`, used as the image placeholder of the encoder input (prompts never contain it).
    `sources` are fused in their order (default: depth, then every prompt: the original's).
    `include_average_image_token=False` drops Florence-2's spatial-average token from every source (the original
    keeps it).

    `batch_prompts` only groups the same rows differently: True puts every [image; prompt] row in one `generate`
    call, as the original calls it with all its prompt rows at once (DaViT then runs once per row: the bench's
    original side); False makes one call per prompt over the images, so that DaViT runs on the batch of images
    as in the model under test (in float32 the results are then bit-identical: the verification's exact check).
    """

    def __init__(
        self,
        florence2,
        projector: nn.Module,
        prompt_names: Sequence[str] = tuple(DEFAULT_TASK_PROMPTS),
        sources: Sequence[str] | None = None,
        include_average_image_token: bool = True,
        batch_prompts: bool = False,
    ):
        self.florence2 = florence2
        self.projector = projector
        self.prompt_names = tuple(prompt_names)
        self.sources = tuple(sources) if sources is not None else (DEPTH_FEATURE, *self.prompt_names)
        unknown = [name for name in self.sources if name != DEPTH_FEATURE and name not in self.prompt_names]
        if unknown:
            raise ValueError(f"unknown sources {unknown}: choose from {[DEPTH_FEATURE, *self.prompt_names]}")
        self.include_average_image_token = include_average_image_token
        self.batch_prompts = batch_prompts

    def source_features(self, pixel_values: torch.Tensor, task_prompt_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """`{source: (num_images, tokens, width)}` for the depth feature and every prompt of `task_prompt_ids`
        `(num_images, num_prompts, prompt_length)`."""
        num_images, num_prompts, _ = task_prompt_ids.shape
        if num_prompts != len(self.prompt_names):
            raise ValueError(f"got {num_prompts} task prompts for the {len(self.prompt_names)} names "
                             f"{self.prompt_names}")  # fmt: skip
        florence2 = self.florence2
        num_tokens = florence2_image_tokens(florence2.config, pixel_values.shape[-1])
        captured = {}

        def keep(name):
            def hook(module, args, output):
                captured[name] = output if isinstance(output, torch.Tensor) else output.last_hidden_state

            return hook

        def encode(prompts, pixels):
            """The encoder output at the image positions of [image tokens; prompt], one row per prompt row."""
            image_ids = prompts.new_full((prompts.shape[0], num_tokens), florence2.config.image_token_id)
            input_ids = torch.cat([image_ids, prompts], dim=1)
            florence2.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=pixels,
                max_new_tokens=1,
                do_sample=False,
                num_beams=1,
            )
            return captured["encoder"][:, :num_tokens]

        hooks = [florence2.model.multi_modal_projector.register_forward_hook(keep("depth")),
                 florence2.model.language_model.encoder.register_forward_hook(keep("encoder"))]  # fmt: skip
        try:
            if self.batch_prompts:
                rows = encode(task_prompt_ids.flatten(0, 1), pixel_values.repeat_interleave(num_prompts, dim=0))
                breadth = rows.unflatten(0, (num_images, num_prompts)).unbind(1)
                depth = captured["depth"].unflatten(0, (num_images, num_prompts))[:, 0]  # one image, its rows alike
            else:
                breadth = [encode(task_prompt_ids[:, row], pixel_values) for row in range(num_prompts)]
                depth = captured["depth"]  # every call computed the same DaViT tokens
        finally:
            for hook in hooks:
                hook.remove()
        features = {DEPTH_FEATURE: depth, **dict(zip(self.prompt_names, breadth))}
        if not self.include_average_image_token:
            features = {name: feature[:, 1:] for name, feature in features.items()}
        return features

    def __call__(self, pixel_values: torch.Tensor, task_prompt_ids: torch.Tensor) -> torch.Tensor:
        """The projected channel concatenation of `sources`: `(num_images, tokens, LLM hidden size)`."""
        features = self.source_features(pixel_values, task_prompt_ids)
        return self.projector(torch.cat([features[name] for name in self.sources], dim=-1))


class OriginalLLM:
    """The LLM on input embeddings whose `<image>` placeholders (`image_token_id`) hold the image features."""

    def __init__(self, llm, image_token_id: int):
        self.llm = llm
        self.image_token_id = image_token_id

    def input_embeds(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        is_image = input_ids == self.image_token_id
        placeholders, features = int(is_image.sum()), image_features.shape[0] * image_features.shape[1]
        if placeholders != features:
            raise ValueError(f"{placeholders} image placeholders in the input for {features} image feature tokens")
        # The placeholder id may lie past the LLM's vocabulary (the original splits the ids around it instead).
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_features.to(embeds.dtype))

    def logits(self, input_ids, attention_mask, image_features) -> torch.Tensor:
        embeds = self.input_embeds(input_ids, image_features)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask).logits

    def generate(self, input_ids, attention_mask, image_features, **kwargs) -> torch.Tensor:
        """Greedy `generate` on the spliced embeddings: the new tokens only (`kwargs`: max_new_tokens, ...)."""
        embeds = self.input_embeds(input_ids, image_features)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, do_sample=False, **kwargs)


__all__ = ["OriginalLLM", "OriginalVision", "florence2_image_tokens", "mlp_projector"]
