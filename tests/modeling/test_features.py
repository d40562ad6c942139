"""The fused image features against an independent computation: transformers' own Florence2Model (same weights)
computes the depth feature and each prompt's encoder output; fusion and the projector are applied by hand."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import Florence2Config, Florence2Model

import florence_vl_hf
from florence_vl_hf import FlorenceVLForConditionalGeneration
from florence_vl_hf.tiny import tiny_config

ATOL = 1e-5  # float32


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    model = FlorenceVLForConditionalGeneration(tiny_config("phi3", **overrides)).eval()
    # Random init leaves LayerNorms at identity; perturb everything so no tensor sits at a trivial value.
    with torch.no_grad():
        for parameter in model.model.vision_tower.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def native_florence2(model):
    """transformers' Florence2Model holding the same vision weights (vocab + 1 row for its image token)."""
    ours = model.config.vision_config
    text = ours.text_config.to_dict()
    text["vocab_size"] += 1
    config = Florence2Config(vision_config=ours.vision_config.to_dict(), text_config=text,
                             image_token_id=ours.text_config.vocab_size)
    torch.manual_seed(1)
    native = Florence2Model(config).eval()
    tower = model.model.vision_tower
    native.vision_tower.load_state_dict(tower.backbone.state_dict())
    native.multi_modal_projector.load_state_dict(tower.image_projector.state_dict())
    encoder_state = {k: v for k, v in tower.encoder.state_dict().items() if k != "embed_tokens.weight"}
    native.language_model.encoder.load_state_dict(encoder_state, strict=False)
    with torch.no_grad():
        rows = tower.encoder.embed_tokens.weight.shape[0]
        native.language_model.shared.weight[:rows] = tower.encoder.embed_tokens.weight
    return native


def native_features(native, pixel_values, prompt_ids, attend_padding=True):
    """Depth V (N, T, D) and, per prompt, the encoder output over [V ; prompt] restricted to the image positions."""
    with torch.no_grad():
        depth = native.get_image_features(pixel_values).pooler_output
        num_images, num_tokens, _ = depth.shape
        breadth = []
        for row in prompt_ids:
            image_tokens = torch.full((num_images, num_tokens), native.config.image_token_id)
            input_ids = torch.cat([image_tokens, torch.tensor(row).expand(num_images, -1)], dim=1)
            mask = None if attend_padding else (input_ids != native.config.text_config.pad_token_id).long()
            out = native(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask)
            breadth.append(out.encoder_last_hidden_state[:, :num_tokens])
    return depth, breadth


def mlp_by_hand(model, features):
    linears = model.model.multi_modal_projector.linears
    hidden = F.linear(features, linears[0].weight, linears[0].bias)
    for linear in linears[1:]:
        hidden = F.linear(F.gelu(hidden), linear.weight, linear.bias)
    return hidden


@pytest.fixture(scope="module")
def pixel_values():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_depth_and_breadth_features_match_native_florence2(pixel_values):
    model = build()
    depth_ref, breadth_ref = native_features(native_florence2(model), pixel_values, model.config.task_prompt_ids)
    prompts = torch.tensor(model.config.task_prompt_ids).expand(2, -1, -1)
    with torch.no_grad():
        depth, breadth, _ = model.model.vision_tower(pixel_values, prompts, None)
    assert depth.shape == (2, 17, 32)  # 1 average token + 4x4 grid at 32 px
    torch.testing.assert_close(depth, depth_ref, atol=ATOL, rtol=0)
    for index, reference in enumerate(breadth_ref):
        torch.testing.assert_close(breadth[:, index], reference, atol=ATOL, rtol=0)


def test_channel_fusion_and_projector_by_hand(pixel_values):
    model = build()
    depth, breadth = native_features(native_florence2(model), pixel_values, model.config.task_prompt_ids)
    with torch.no_grad():
        fused = model.get_image_features(pixel_values).pooler_output
        expected = mlp_by_hand(model, torch.cat([depth, *breadth], dim=-1))
    assert fused.shape == (2, model.config.num_image_tokens, model.config.text_config.hidden_size)
    torch.testing.assert_close(fused, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "overrides, combine",
    [
        ({"fusion": "token"}, lambda f: torch.cat(f, dim=1)),
        ({"fusion": "average"}, lambda f: torch.stack(f).mean(0)),
        ({"vision_feature_sources": ["depth"]}, lambda f: f[0]),
        ({"vision_feature_sources": ["caption", "ocr", "grounding"]}, lambda f: torch.cat(f, dim=-1)),
        ({"vision_feature_sources": ["grounding", "depth"]}, lambda f: torch.cat(f, dim=-1)),
        ({"include_average_image_token": False}, lambda f: torch.cat([x[:, 1:] for x in f], dim=-1)),
        ({"include_average_image_token": False, "fusion": "token"}, lambda f: torch.cat([x[:, 1:] for x in f], 1)),
    ],
)
def test_fusion_variants(pixel_values, overrides, combine):
    model = build(**overrides)
    depth, breadth = native_features(native_florence2(model), pixel_values, model.config.task_prompt_ids)
    by_name = {"depth": depth, **dict(zip(model.config.task_prompt_names, breadth))}
    with torch.no_grad():
        fused = model.get_image_features(pixel_values).pooler_output
        expected = mlp_by_hand(model, combine([by_name[s] for s in model.config.vision_feature_sources]))
    assert fused.shape[1] == model.config.num_image_tokens
    torch.testing.assert_close(fused, expected, atol=ATOL, rtol=0)


def test_prompt_padding_can_be_masked(pixel_values):
    model = build(task_prompt_attend_padding=False)
    depth, breadth = native_features(native_florence2(model), pixel_values, model.config.task_prompt_ids, False)
    with torch.no_grad():
        fused = model.get_image_features(pixel_values).pooler_output
    torch.testing.assert_close(fused, mlp_by_hand(model, torch.cat([depth, *breadth], -1)), atol=ATOL, rtol=0)
    # The original attends to the pads: the OCR prompt (4 pads) must give a different feature then.
    default = build()
    with torch.no_grad():
        assert not torch.allclose(default.get_image_features(pixel_values).pooler_output, fused)


def test_batched_prompts_equal_one_prompt_at_a_time_bit_for_bit(pixel_values):
    """The fast path (DaViT once, the three prompts in one encoder call) computes exactly, in float32, what the
    straightforward computation does: DaViT and the encoder once per prompt, then fusion and the projector."""
    model = build()
    prompts = torch.tensor(model.config.task_prompt_ids).expand(2, -1, -1)
    tower = model.model.vision_tower
    with torch.no_grad():
        _, batched, _ = tower(pixel_values, prompts, None)
        singles = []
        for index in range(prompts.shape[1]):
            depth, single, _ = tower(pixel_values, prompts[:, index : index + 1], None)
            assert torch.equal(batched[:, index], single[:, 0])
            singles.append(single[:, 0])
        unbatched = model.model.multi_modal_projector(torch.cat([depth, *singles], dim=-1))
        fused = model.get_image_features(pixel_values).pooler_output
    assert fused.dtype == torch.float32 and torch.equal(fused, unbatched)


def test_prompts_from_processor_or_config_give_the_same_features(pixel_values):
    model = build()
    prompts = torch.tensor(model.config.task_prompt_ids).expand(2, -1, -1)
    with torch.no_grad():
        from_config = model.get_image_features(pixel_values).pooler_output
        from_inputs = model.get_image_features(pixel_values, task_prompt_ids=prompts).pooler_output
        other = model.get_image_features(pixel_values, task_prompt_ids=prompts.flip(1)).pooler_output
    assert torch.equal(from_config, from_inputs)
    assert not torch.allclose(from_config, other)  # the prompts really reach the encoder


@pytest.mark.parametrize(
    "overrides",
    [{}, {"vision_feature_sources": ["grounding", "depth"]}, {"include_average_image_token": False},
     {"task_prompt_attend_padding": False, "fusion": "token"}],
)  # fmt: skip
def test_source_features_are_every_feature_before_fusion(pixel_values, overrides):
    """`return_source_features=True` gives the depth feature and every task prompt's encoder output (also those the
    config does not fuse), as fusion receives them; the fused output is the same as without it."""
    model = build(**overrides)
    attend = model.config.task_prompt_attend_padding
    depth, breadth = native_features(native_florence2(model), pixel_values, model.config.task_prompt_ids, attend)
    expected = {"depth": depth, **dict(zip(model.config.task_prompt_names, breadth))}
    if not model.config.include_average_image_token:
        expected = {name: feature[:, 1:] for name, feature in expected.items()}
    with torch.no_grad():
        plain = model.get_image_features(pixel_values)
        out = model.get_image_features(pixel_values, return_source_features=True)
    assert plain.source_features is None
    assert list(out.source_features) == ["depth", "caption", "ocr", "grounding"]
    for name, reference in expected.items():
        torch.testing.assert_close(out.source_features[name], reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooler_output, plain.pooler_output, atol=ATOL, rtol=0)


def test_source_features_bypass_the_vision_feature_cache(pixel_values):
    model = build()
    cache = model.enable_vision_feature_cache()
    with torch.no_grad():
        out = model.get_image_features(pixel_values, return_source_features=True)
    assert out.source_features is not None and not cache.entries and (cache.hits, cache.misses) == (0, 0)


def test_nothing_outside_the_model_calls_its_vision_tower():
    """Analysis code takes per-source features from `get_image_features(return_source_features=True)`."""
    package = Path(florence_vl_hf.__file__).parent
    callers = [str(path.relative_to(package)) for path in sorted(package.rglob("*.py"))
               if path.parent.name not in ("modeling", "florence_vl_tiny") and "vision_tower(" in path.read_text()]
    assert callers == []
