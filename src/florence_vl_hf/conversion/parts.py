"""A new Florence-VL from separately pretrained parts: a Florence-2 checkpoint and any causal LM, with a freshly
initialised projector. This is where training a new Florence-VL starts (stage 1)."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..families import family_of
from ..modeling import FlorenceVLConfig, FlorenceVLForConditionalGeneration
from ..modeling.modeling_florence_vl import FlorenceVLMultiModalProjector
from ..processing import IMAGE_TOKEN, build_processor, prepare_tokenizer
from .convert import TEMPORAL_EMBEDDING_KEY, embedding_rows, map_key, temporal_embedding
from .errors import ConversionError
from .keys import florence2_to_florence_vl
from .source import TensorStore, image_size_from, read_florence2_folder, resolve_source


def florence2_vision_state(folder) -> tuple[object, dict, dict]:
    """(Florence2Config, Florence-VL vision-tower state dict, preprocessor settings) from a Florence-2 checkpoint in
    Microsoft's remote-code layout or transformers' native layout. Its code files are never imported."""
    config, preprocessor = read_florence2_folder(folder)
    store = TensorStore(folder, "florence2")
    state = {}
    for key in store.keys():
        mapped = map_key(florence2_to_florence_vl, store, key)
        if mapped.target is None:
            continue
        tensor = store.get(key)
        tensor = tensor.t() if mapped.transpose else tensor
        if mapped.target in state:
            if not torch.equal(state[mapped.target], tensor.to(state[mapped.target].dtype)):
                raise ConversionError(f"{key!r} differs from the tensor it is tied to ({mapped.target})")
            continue
        state[mapped.target] = tensor
    return config, state, preprocessor


def from_pretrained_parts(
    florence2,
    language_model,
    *,
    tokenizer=None,
    template: str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    token: str | None = None,
    **config_kwargs,
):
    """Build `(model, processor)` from a Florence-2 checkpoint and a causal LM (folders or Hub repo ids).

    `florence2`: e.g. microsoft/Florence-2-large-ft (Microsoft's remote-code layout, read without running its code)
    or florence-community/Florence-2-large (transformers-native). `language_model`: any causal LM, e.g.
    microsoft/Phi-3.5-mini-instruct; its tokenizer is used unless `tokenizer` is given. The projector is new
    (PyTorch's default Linear init, as the original builds it; `seed` fixes it). `config_kwargs` go to
    FlorenceVLConfig (fusion, vision_feature_sources, projector_type, ...). The vocabulary grows (to a multiple of
    64) when the tokenizer with `<image>` does not fit. The decoder of Florence-2 is not loaded.
    """
    folder, _, _ = resolve_source(florence2, token=token)
    florence2_cfg, vision_state, preprocessor = florence2_vision_state(folder)
    llm = AutoModelForCausalLM.from_pretrained(str(language_model), dtype=dtype, token=token)
    tokenizer = tokenizer if tokenizer is not None else str(language_model)
    if isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, token=token)
    template = template or family_of(llm.config).name
    tokenizer = prepare_tokenizer(tokenizer)

    config_kwargs.setdefault("image_size", image_size_from(preprocessor))
    config_kwargs.setdefault("image_token_id", tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    try:
        config = FlorenceVLConfig(vision_config=florence2_cfg.to_dict(), text_config=llm.config.to_dict(), **config_kwargs)
    except ValueError as error:
        raise ConversionError(f"The parts do not make a valid Florence-VL: {error}") from error
    torch.manual_seed(seed)
    projector = FlorenceVLMultiModalProjector(config)
    state = dict(vision_state)
    state.update({f"model.multi_modal_projector.{k}": v for k, v in projector.state_dict().items()})
    base = getattr(llm, llm.base_model_prefix)
    state.update({f"model.language_model.{k}": v for k, v in base.state_dict().items()})
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = llm.get_output_embeddings().weight

    with torch.device("meta"):
        expected = FlorenceVLForConditionalGeneration(config).state_dict()
    if TEMPORAL_EMBEDDING_KEY not in state:
        state[TEMPORAL_EMBEDDING_KEY] = temporal_embedding(config.vision_config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise ConversionError(
            f"The parts do not fit together: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {mismatched[:5]}"
        )
    model = FlorenceVLForConditionalGeneration.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    model.generation_config = llm.generation_config
    del llm, base, state

    rows = embedding_rows(tokenizer, model.config.text_config.vocab_size)
    if rows != model.config.text_config.vocab_size:
        model.resize_token_embeddings(rows)
    processor = build_processor(model.config, tokenizer=tokenizer, template=template)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor
