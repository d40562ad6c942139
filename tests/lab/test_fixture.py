"""make-fixture writes exactly the original layout (llava/train/train.py's save, Microsoft's Florence-2 format)."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from florence_vl_hf.families import family
from florence_vl_hf.lab.fixture import make_fixture
from florence_vl_hf.processing import asset_dir


def main_keys(folder):
    keys = []
    for path in folder.glob("model*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            keys += list(handle.keys())
    for path in folder.glob("pytorch_model*.bin"):
        keys += list(torch.load(path, weights_only=True))
    return keys


def test_phi3_fixture_layout(fixtures):
    folder = fixtures["phi3"]
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert "tokenizer.json" not in names  # Phi-3.5 training saved the slow tokenizer only
    assert {"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors", "tokenizer.model",
            "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vision_tower/config.json",
            "vision_tower/preprocessor_config.json", "vision_tower/pytorch_model.bin"} <= set(names)  # fmt: skip
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llava_phi" and config["architectures"] == ["LlavaPhiForCausalLM"]
    assert config["mm_projector_type"] == "mlp3x_gelu" and config["mm_patch_merge_type"] == "flat"
    assert config["image_aspect_ratio"] == "pad" and config["mm_use_im_start_end"] is False
    assert config["vocab_size"] == 32064 and config["mm_hidden_size"] == 32
    assert (folder / "tokenizer.model").read_bytes() == (asset_dir("phi-3.5-mini-instruct") / "tokenizer.model").read_bytes()


def test_main_weights_hold_llm_projector_and_microsoft_named_florence2(fixtures):
    keys = main_keys(fixtures["phi3"])
    assert "model.mm_projector.encoder_mlp.0.weight" in keys and "model.mm_projector.encoder_mlp.2.1.bias" in keys
    assert "model.layers.0.self_attn.qkv_proj.weight" in keys and "lm_head.weight" in keys
    vision = [k.removeprefix("model.vision_tower.vision_tower.") for k in keys if k.startswith("model.vision_tower.")]
    assert "vision_tower.blocks.0.0.spatial_block.window_attn.fn.qkv.weight" in vision
    assert "image_projection" in vision and "language_model.model.shared.weight" in vision
    assert "visual_temporal_embed.pos_idx_to_embed" in vision and "language_model.final_logits_bias" in vision  # buffers
    # train.py copies each key to the CPU on its own, so the tied BART copies are saved too
    assert "language_model.model.encoder.embed_tokens.weight" in vision and "language_model.lm_head.weight" in vision
    assert any(k.startswith("language_model.model.decoder.") for k in vision)


def test_vision_tower_folder_is_microsoft_format_with_parameters_only(fixtures):
    folder = fixtures["phi3"] / "vision_tower"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "florence2" and config["vision_config"]["model_type"] == ""  # as 4.43 writes it
    assert config["vision_config"]["dim_embed"] == [16, 32] and config["torch_dtype"] == "float32"
    weights = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert "visual_temporal_embed.pos_idx_to_embed" not in weights and "language_model.final_logits_bias" not in weights
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert weights["image_projection"].shape == (32, 32)
    # No tensor sits at a trivial init: norms are not all ones, biases not all zeros.
    norms = [t for k, t in weights.items() if "norm" in k and k.endswith("weight")]
    biases = [t for k, t in weights.items() if k.endswith("bias")]
    assert norms and all(not torch.all(t == 1) for t in norms) and all(torch.any(t != 0) for t in biases)


def test_llama_fixture_has_the_fast_tokenizer_with_the_added_pad(fixtures):
    folder = fixtures["llama"]
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    assert {"content": "<pad>", "id": 128256} in [{k: t[k] for k in ("content", "id")} for t in tokenizer["added_tokens"]]
    assert json.loads((folder / "special_tokens_map.json").read_text())["pad_token"]["content"] == "<pad>"
    assert sorted(p.name for p in folder.glob("pytorch_model*")) == [
        "pytorch_model-00001-of-00003.bin", "pytorch_model-00002-of-00003.bin", "pytorch_model-00003-of-00003.bin",
        "pytorch_model.bin.index.json"]  # fmt: skip
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 128257


def test_fixture_is_reproducible_from_its_seed(tmp_path):
    first = make_fixture(tmp_path / "a", "phi3", seed=3, shards=1)
    second = make_fixture(tmp_path / "b", "phi3", seed=3, shards=1)
    for name in ("model.safetensors", "config.json", "vision_tower/config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_config_pad_token_id_is_the_pad_the_training_tokenizer_holds(fixtures):
    """Llama-3.1 has no pad token: training added '<pad>' after its 128256 tokens; Phi-3.5 pads with <|endoftext|>."""
    for key, name, pad_id in (("phi3", "phi3", 32000), ("llama", "llama3", 128256)):
        config = json.loads((fixtures[key] / "config.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(str(family(name).asset_dir))
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
        assert config["pad_token_id"] == tokenizer.pad_token_id == pad_id


def test_an_unknown_family_is_refused_with_the_family_names(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown LLM family 'llama'; choose one of \('phi3', 'llama3'\)"):
        make_fixture(tmp_path / "x", "llama")
    assert not (tmp_path / "x").exists()
