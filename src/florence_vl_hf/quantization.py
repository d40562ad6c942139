"""int8 weight-only quantization of the LLM, through torchao's config at `from_pretrained` (optional extra:
`pip install "florence-vl-hf[int8]"`).

Only the LLM's linear layers are quantized (per-row int8 weights, activations stay in the model dtype); the vision
tower, the projector, the LM head and the embeddings keep their dtype. A quantized model saves and reloads with
`save_pretrained` / `from_pretrained` (torchao's safetensors format). In eager mode torchao dequantizes each weight
before its matmul, which is slower than bf16: decode runs fast once compiled, e.g.
`generate(..., cache_implementation="static", compile_config=CompileConfig(...))`.
"""

# The submodules kept in the model dtype, as transformers' quantizers match them (from the start of a parameter
# name, up to a module boundary).
KEPT_MODULES = ("model.vision_tower", "model.multi_modal_projector", "lm_head")


def int8_weight_only_config():
    """A `TorchAoConfig` for `from_pretrained(..., quantization_config=...)`: int8 weight-only on the LLM's linear
    layers, everything in KEPT_MODULES unchanged."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError as error:
        raise ImportError('int8 quantization needs torchao: pip install "florence-vl-hf[int8]"') from error
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=list(KEPT_MODULES))
