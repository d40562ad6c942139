"""Small Florence-VL configurations for tests, demos and CPU experiments (random weights)."""

from .families import family, padded_rows
from .modeling import FlorenceVLConfig


def tiny_config(llm: str = "phi3", image_size: int = 32, **overrides) -> FlorenceVLConfig:
    """A Florence-VL small enough for a CPU test: a 2-stage DaViT, a 2-layer BART encoder and a 2-layer LLM of the
    family `llm` ("phi3" or "llama3").

    The LLM embeds the family's bundled tokenizer with `<image>` (and `<pad>`), padded to a multiple of 64 rows
    (32064 for Phi-3.5, 128320 for Llama-3.1), so the real tokenizers fit; `image_token_id` is that tokenizer's.
    """
    llm_family = family(llm)
    vision = {
        "vision_config": {
            "embed_dim": [16, 32],
            "depths": [1, 1],
            "num_heads": [2, 4],
            "num_groups": [2, 4],
            "patch_size": [7, 3],
            "patch_stride": [4, 2],
            "patch_padding": [3, 1],
            "patch_prenorm": [False, True],
            "window_size": 2,
            "projection_dim": 32,
            "drop_path_rate": 0.0,
        },
        "text_config": {
            "model_type": "bart",
            "vocab_size": 51289,
            "d_model": 32,
            "encoder_layers": 2,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "decoder_layers": 1,
            "decoder_attention_heads": 2,
            "decoder_ffn_dim": 64,
            "max_position_embeddings": 128,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },
    }
    text = {
        "model_type": llm_family.model_type,
        "vocab_size": padded_rows(llm_family.image_token_id + 1),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
    }
    if llm_family.pad_token_id is not None:
        text["pad_token_id"] = llm_family.pad_token_id
    text.update(bos_token_id=llm_family.bos_token_id, eos_token_id=llm_family.eos_token_id)
    overrides.setdefault("image_token_id", llm_family.image_token_id)
    return FlorenceVLConfig(vision_config=vision, text_config=text, image_size=image_size, **overrides)
