"""Small Florence-VL configurations for tests, demos and CPU experiments (random weights)."""

from .modeling import FlorenceVLConfig

# Vocabulary sizes of the official LLMs (rows of their embedding matrices, padded to a multiple of 64).
VOCAB_SIZE = {"phi3": 32064, "llama": 128320}


def tiny_config(llm: str = "phi3", image_size: int = 32, **overrides) -> FlorenceVLConfig:
    """A Florence-VL small enough for a CPU test: a 2-stage DaViT, a 2-layer BART encoder and a 2-layer LLM.

    The LLM keeps the real vocabulary size so the real Phi-3.5 / Llama-3.1 tokenizers fit.
    """
    if llm not in VOCAB_SIZE:
        raise ValueError(f"llm must be one of {sorted(VOCAB_SIZE)}, got {llm!r}")
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
        "model_type": llm,
        "vocab_size": VOCAB_SIZE[llm],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
    }
    if llm == "phi3":
        text.update(pad_token_id=32000, bos_token_id=1, eos_token_id=32000)
    else:
        text.update(bos_token_id=128000, eos_token_id=128009)
    return FlorenceVLConfig(vision_config=vision, text_config=text, image_size=image_size, **overrides)
