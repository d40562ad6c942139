"""Pure unit tests of the checkpoint key mappings on synthetic key lists.

Expected names are written out by hand from the facts transformers' convert_florence2_original_pytorch_to_hf.py
documents (Microsoft key -> native key) and from the original Florence-VL module tree (DualMLPProjector's
encoder_mlp Sequential, the LLaVA model's `model.vision_tower.vision_tower` nesting).
"""

from collections import Counter

import pytest
import torch
from transformers import Florence2Config, Florence2ForConditionalGeneration

from florence_vl_hf import FlorenceVLForConditionalGeneration
from florence_vl_hf.conversion.keys import (
    florence2_to_florence_vl,
    florence2_to_native,
    llava_to_florence_vl,
    native_to_florence2,
)
from florence_vl_hf.tiny import tiny_config

MICROSOFT_TO_NATIVE = {
    "vision_tower.convs.0.proj.weight": "model.vision_tower.convs.0.conv.weight",
    "vision_tower.convs.3.norm.bias": "model.vision_tower.convs.3.norm.bias",
    "vision_tower.blocks.2.7.spatial_block.conv1.fn.dw.weight": "model.vision_tower.blocks.2.7.spatial_block.conv1.weight",
    "vision_tower.blocks.0.0.spatial_block.window_attn.norm.weight": "model.vision_tower.blocks.0.0.spatial_block.norm1.weight",
    "vision_tower.blocks.0.0.spatial_block.window_attn.fn.qkv.weight": "model.vision_tower.blocks.0.0.spatial_block.window_attn.qkv.weight",
    "vision_tower.blocks.1.0.spatial_block.window_attn.fn.proj.bias": "model.vision_tower.blocks.1.0.spatial_block.window_attn.proj.bias",
    "vision_tower.blocks.0.0.spatial_block.conv2.fn.dw.bias": "model.vision_tower.blocks.0.0.spatial_block.conv2.bias",
    "vision_tower.blocks.0.0.spatial_block.ffn.norm.weight": "model.vision_tower.blocks.0.0.spatial_block.norm2.weight",
    "vision_tower.blocks.0.0.spatial_block.ffn.fn.net.fc1.weight": "model.vision_tower.blocks.0.0.spatial_block.ffn.fc1.weight",
    "vision_tower.blocks.3.0.channel_block.channel_attn.norm.bias": "model.vision_tower.blocks.3.0.channel_block.norm1.bias",
    "vision_tower.blocks.3.0.channel_block.channel_attn.fn.qkv.bias": "model.vision_tower.blocks.3.0.channel_block.channel_attn.qkv.bias",
    "vision_tower.blocks.2.8.channel_block.ffn.fn.net.fc2.weight": "model.vision_tower.blocks.2.8.channel_block.ffn.fc2.weight",
    "vision_tower.blocks.2.8.channel_block.ffn.norm.weight": "model.vision_tower.blocks.2.8.channel_block.norm2.weight",
    "image_projection": "model.multi_modal_projector.image_projection.weight",
    "image_proj_norm.weight": "model.multi_modal_projector.image_proj_norm.weight",
    "image_pos_embed.row_embeddings.weight": "model.multi_modal_projector.image_position_embed.row_embeddings.weight",
    "image_pos_embed.column_embeddings.weight": "model.multi_modal_projector.image_position_embed.column_embeddings.weight",
    "visual_temporal_embed.pos_idx_to_embed": "model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed",
    "language_model.model.shared.weight": "model.language_model.shared.weight",
    "language_model.model.encoder.layers.11.self_attn.k_proj.weight": "model.language_model.encoder.layers.11.self_attn.k_proj.weight",
    "language_model.model.decoder.layers.0.encoder_attn.q_proj.bias": "model.language_model.decoder.layers.0.encoder_attn.q_proj.bias",
    "language_model.lm_head.weight": "lm_head.weight",
}

LLAVA_TO_FLORENCE_VL = {
    "model.embed_tokens.weight": "model.language_model.embed_tokens.weight",
    "model.layers.31.mlp.gate_up_proj.weight": "model.language_model.layers.31.mlp.gate_up_proj.weight",
    "model.norm.weight": "model.language_model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.mm_projector.encoder_mlp.0.weight": "model.multi_modal_projector.linears.0.weight",
    "model.mm_projector.encoder_mlp.1.1.bias": "model.multi_modal_projector.linears.1.bias",
    "model.mm_projector.encoder_mlp.2.1.weight": "model.multi_modal_projector.linears.2.weight",
    "model.vision_tower.vision_tower.vision_tower.convs.0.proj.weight": "model.vision_tower.backbone.convs.0.conv.weight",
    "model.vision_tower.vision_tower.image_proj_norm.bias": "model.vision_tower.image_projector.image_proj_norm.bias",
    "model.vision_tower.vision_tower.language_model.model.shared.weight": "model.vision_tower.encoder.embed_tokens.weight",
    "model.vision_tower.vision_tower.language_model.model.encoder.embed_tokens.weight": "model.vision_tower.encoder.embed_tokens.weight",
    "model.vision_tower.vision_tower.language_model.model.encoder.layernorm_embedding.weight": "model.vision_tower.encoder.layernorm_embedding.weight",
}


@pytest.mark.parametrize("microsoft, native", MICROSOFT_TO_NATIVE.items())
def test_microsoft_florence2_names_map_to_native_names(microsoft, native):
    assert florence2_to_native(microsoft) == native
    assert florence2_to_native(native) == native  # idempotent
    assert native_to_florence2(native) == microsoft  # and invertible


@pytest.mark.parametrize("source, target", LLAVA_TO_FLORENCE_VL.items())
def test_original_checkpoint_names_map_to_florence_vl(source, target):
    mapped = llava_to_florence_vl(source)
    assert mapped.target == target
    assert mapped.transpose is False
    assert llava_to_florence_vl(target).target == target  # idempotent


def test_image_projection_is_transposed_only_from_the_microsoft_layout():
    assert llava_to_florence_vl("model.vision_tower.vision_tower.image_projection").transpose is True
    assert florence2_to_florence_vl("image_projection").transpose is True
    native = florence2_to_florence_vl("model.multi_modal_projector.image_projection.weight")
    assert native.target == "model.vision_tower.image_projector.image_projection.weight" and native.transpose is False


@pytest.mark.parametrize(
    "key",
    [
        "model.vision_tower.vision_tower.language_model.model.decoder.layers.0.fc1.weight",
        "model.vision_tower.vision_tower.language_model.model.decoder.embed_tokens.weight",
        "model.vision_tower.vision_tower.language_model.lm_head.weight",
        "model.vision_tower.vision_tower.language_model.final_logits_bias",
    ],
)
def test_florence2_decoder_side_is_dropped_with_a_reason(key):
    mapped = llava_to_florence_vl(key)
    assert mapped.target is None and "decoder" in mapped.dropped


@pytest.mark.parametrize(
    "key",
    [
        "model.image_newline",
        "model.mm_projector.encoder_mlp.1.weight",  # a Sequential(GELU, Linear) has no weight of its own
        "model.mm_projector.encoder_mlp.0.1.weight",
        "model.vision_tower.vision_tower.vision_tower.norms.weight",
        "model.vision_tower.vision_tower.text_encoder.weight",
        "transformer.h.0.attn.weight",
    ],
)
def test_unknown_keys_raise_naming_the_key(key):
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        llava_to_florence_vl(key)


def _native_florence2_keys():
    config = tiny_config("phi3").vision_config
    with torch.device("meta"):
        native = Florence2ForConditionalGeneration(Florence2Config(
            vision_config=config.vision_config.to_dict(), text_config=config.text_config.to_dict()))
    return list(native.state_dict())


def test_every_native_florence2_key_round_trips_through_the_microsoft_layout():
    native_keys = _native_florence2_keys()
    microsoft = [native_to_florence2(key) for key in native_keys]
    assert len(set(microsoft)) == len(native_keys)  # one Microsoft name per native name
    assert [florence2_to_native(key) for key in microsoft] == native_keys
    assert all(not key.startswith("model.") for key in microsoft if key != "lm_head.weight")


def test_a_whole_original_checkpoint_maps_onto_the_florence_vl_model_exactly_once():
    """Synthetic original key list: LLM + projector + Florence-2 (decoder, tied copies and buffers included)."""
    config = tiny_config("phi3")
    with torch.device("meta"):
        model = FlorenceVLForConditionalGeneration(config)
    florence_vl_keys = set(model.state_dict())
    llm_keys = ["model." + k.removeprefix("model.language_model.") for k in florence_vl_keys
                if k.startswith("model.language_model.")] + ["lm_head.weight"]  # fmt: skip
    projector = ["model.mm_projector.encoder_mlp.0.weight", "model.mm_projector.encoder_mlp.0.bias"] + [
        f"model.mm_projector.encoder_mlp.{i}.1.{kind}" for i in (1, 2) for kind in ("weight", "bias")
    ]
    vision = ["model.vision_tower.vision_tower." + native_to_florence2(k) for k in _native_florence2_keys()]
    vision.append("model.vision_tower.vision_tower.language_model.final_logits_bias")
    source = llm_keys + projector + vision

    mapped = {key: llava_to_florence_vl(key) for key in source}
    targets = Counter(m.target for m in mapped.values() if m.target)
    assert set(targets) == florence_vl_keys
    # The only target reached twice: the BART encoder embedding and the shared embedding it is tied to.
    assert {t for t, n in targets.items() if n > 1} == {"model.vision_tower.encoder.embed_tokens.weight"}
    dropped = [k for k, m in mapped.items() if m.target is None]
    assert all(".decoder." in k or "lm_head" in k or "final_logits_bias" in k for k in dropped)
    assert all(llava_to_florence_vl(t).target == t for t in targets)  # mapping twice changes nothing


def test_hub_file_selection_takes_only_what_a_conversion_reads():
    from florence_vl_hf.conversion.source import select_source_files

    repo = [
        ".gitattributes", "README.md", "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "tokenizer.model", "tokenizer_config.json",
        "special_tokens_map.json", "added_tokens.json", "training_args.bin", "trainer_state.json",
        "checkpoint-3000/model-00001-of-00002.safetensors", "checkpoint-3000/config.json", "llava_phi3.py",
        "vision_tower/config.json", "vision_tower/preprocessor_config.json", "vision_tower/pytorch_model.bin",
        "vision_tower/modeling_florence2.py", "vision_tower/configuration_florence2.py",
    ]  # fmt: skip
    assert select_source_files(repo) == sorted([
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
        "added_tokens.json", "vision_tower/config.json", "vision_tower/preprocessor_config.json",
        "vision_tower/pytorch_model.bin",
    ])  # fmt: skip
    only_bin = [n for n in repo if not n.endswith(".safetensors") and "safetensors" not in n]
    assert "pytorch_model.bin.index.json" in select_source_files(only_bin)
