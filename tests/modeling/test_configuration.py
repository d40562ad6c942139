import json

import pytest

from florence_vl_hf import FlorenceVLConfig
from florence_vl_hf.tiny import tiny_config


def test_defaults_are_florence2_large_with_phi3():
    config = FlorenceVLConfig()
    davit, encoder = config.vision_config.vision_config, config.vision_config.text_config
    assert list(davit.embed_dim) == [256, 512, 1024, 2048]
    assert list(davit.depths) == [1, 1, 9, 1]
    assert list(davit.num_heads) == list(davit.num_groups) == [8, 16, 32, 64]
    assert davit.projection_dim == 1024 and encoder.d_model == 1024 and encoder.encoder_layers == 12
    assert config.text_config.model_type == "phi3"
    # 768 px: strides 4*2*2*2 -> 24x24 patches, plus the spatial-average token.
    assert config.image_grid_side == 24
    assert config.num_image_tokens == 577
    assert config.projector_input_dim == 4 * 1024
    assert config.vision_feature_sources == ["depth", "caption", "ocr", "grounding"]
    assert config.fusion == "channel" and config.projector_type == "mlp3x_gelu"


@pytest.mark.parametrize(
    "overrides, tokens, width",
    [
        ({"include_average_image_token": False}, 576, 4096),
        ({"fusion": "token"}, 4 * 577, 1024),
        ({"fusion": "average"}, 577, 1024),
        ({"vision_feature_sources": ["depth"]}, 577, 1024),
        ({"vision_feature_sources": ["caption", "ocr", "grounding"], "fusion": "token"}, 3 * 577, 1024),
        # 384 px: (384+6-7)//4+1 = 96 -> 48 -> 24 -> 12 per side.
        ({"image_size": 384}, 1 + 12 * 12, 4096),
        # 100 px: 25 -> 13 -> 7 -> 4 per side.
        ({"image_size": 100}, 1 + 4 * 4, 4096),
    ],
)
def test_token_count_and_projector_width_follow_the_settings(overrides, tokens, width):
    config = FlorenceVLConfig(**overrides)
    assert config.num_image_tokens == tokens
    assert config.projector_input_dim == width


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"fusion": "concat"}, "fusion must be one of"),
        ({"vision_feature_sources": ["depth", "captions"]}, "vision_feature_sources"),
        ({"vision_feature_sources": []}, "vision_feature_sources"),
        ({"vision_feature_sources": ["depth", "depth"]}, "vision_feature_sources"),
        ({"projector_type": "mlp"}, "projector_type"),
        ({"projector_type": "mlp0x_gelu"}, "projector_type"),
        ({"task_prompt_names": ["a"], "task_prompt_ids": [[0, 2], [0, 2]]}, "one unique name per row"),
        ({"task_prompt_names": ["a", "b"], "task_prompt_ids": [[0, 2], [0, 5, 2]]}, "padded to one length"),
        ({"task_prompt_names": ["depth"], "task_prompt_ids": [[0, 2]]}, "reserved"),
        ({"task_prompt_texts": ["Describe in detail what is shown in the image."]}, "one text"),
        ({"task_prompt_names": ["a"], "task_prompt_texts": [7], "task_prompt_ids": [[0, 2]]}, "one text"),
        ({"image_size": 4000}, "position embedding"),
    ],
)
def test_inconsistent_settings_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        FlorenceVLConfig(**overrides)


def test_projection_width_must_match_encoder_width():
    vision = {"vision_config": {"projection_dim": 512}, "text_config": {"model_type": "bart", "d_model": 1024}}
    with pytest.raises(ValueError, match="projection_dim"):
        FlorenceVLConfig(vision_config=vision)


def test_prompt_plus_image_tokens_must_fit_the_encoder_positions():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        tiny_config("phi3", image_size=96)  # 1 + 12*12 image tokens + 14 prompt tokens > 128 positions


@pytest.mark.parametrize("llm", ["phi3", "llama3"])
def test_round_trip_through_dict_and_disk(llm, tmp_path):
    config = tiny_config(llm, fusion="token", include_average_image_token=False)
    config.save_pretrained(tmp_path)
    loaded = FlorenceVLConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert type(loaded.text_config).__name__ == type(config.text_config).__name__
    assert loaded.num_image_tokens == config.num_image_tokens == 4 * 16  # 4 feature sets side by side, 4x4 grid
    assert loaded.get_text_config(decoder=True) is loaded.text_config


def test_vision_config_names_its_width_and_saves_as_plain_florence2(tmp_path):
    from transformers import Florence2Config

    from florence_vl_hf.modeling.configuration_florence_vl import FlorenceVLVisionConfig

    config = tiny_config("phi3")
    assert isinstance(config.vision_config, FlorenceVLVisionConfig)
    assert config.vision_config.hidden_size == config.vision_config.text_config.d_model == 32
    saved = config.to_dict()["vision_config"]
    assert saved["model_type"] == "florence2" and "hidden_size" not in saved
    # A plain Florence2Config (e.g. read from a Florence-2 checkpoint) is taken as the same config.
    plain = Florence2Config(**config.vision_config.to_dict())
    again = FlorenceVLConfig(vision_config=plain, text_config=config.text_config, image_size=32)
    assert type(again.vision_config) is FlorenceVLVisionConfig
    assert again.vision_config.to_dict() == config.vision_config.to_dict()
    config.save_pretrained(tmp_path)
    assert type(FlorenceVLConfig.from_pretrained(tmp_path).vision_config) is FlorenceVLVisionConfig


ORIGINAL_TASK_PROMPTS = {
    "caption": "Describe in detail what is shown in the image.",
    "ocr": "What is the text in the image?",
    "grounding": "Locate the objects in the image, with their descriptions.",
}


def test_task_prompt_texts_default_to_the_originals_and_round_trip(tmp_path):
    config = FlorenceVLConfig()
    assert dict(zip(config.task_prompt_names, config.task_prompt_texts)) == ORIGINAL_TASK_PROMPTS
    texts = ["Describe the image.", "Read the text."]
    custom = tiny_config("phi3", task_prompt_names=["short", "read"], task_prompt_texts=texts,
                         task_prompt_ids=[[0, 1, 2], [0, 3, 2]])  # fmt: skip
    custom.save_pretrained(tmp_path)
    assert FlorenceVLConfig.from_pretrained(tmp_path).task_prompt_texts == texts


def test_a_config_saved_without_texts_loads_with_the_original_texts(tmp_path):
    """The bundled florence-vl-tiny's config.json predates the texts; so do converted folders."""
    import florence_vl_hf

    folder = florence_vl_hf.tiny_model_dir()
    saved = json.loads((folder / "config.json").read_text())
    assert "task_prompt_texts" not in saved
    config = FlorenceVLConfig.from_pretrained(folder)
    assert config.task_prompt_names == saved["task_prompt_names"]
    assert config.task_prompt_texts == [ORIGINAL_TASK_PROMPTS[name] for name in saved["task_prompt_names"]]
    # A subset of the original prompts gets their texts too; other names load without texts.
    subset = dict(saved, task_prompt_names=["ocr"], task_prompt_ids=[saved["task_prompt_ids"][1]],
                  vision_feature_sources=["depth", "ocr"])  # fmt: skip
    assert FlorenceVLConfig.from_dict(subset).task_prompt_texts == [ORIGINAL_TASK_PROMPTS["ocr"]]
    renamed = dict(subset, task_prompt_names=["read"], vision_feature_sources=["depth", "read"])
    assert FlorenceVLConfig.from_dict(renamed).task_prompt_texts is None
