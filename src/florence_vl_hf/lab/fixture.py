"""A tiny random checkpoint in exactly the original Florence-VL layout, for tests and demos of the converter.

Layout (as llava/train/train.py saves it): config.json (model_type llava_phi / llava_llama: the LLM's config plus the
LLaVA keys), the main weights (LLM, projector `model.mm_projector.encoder_mlp.*`, and Florence-2 under
`model.vision_tower.vision_tower.*` in Microsoft's key names, buffers included), the LLM tokenizer files as training
saved them, and vision_tower/ with Microsoft's Florence-2 config.json, preprocessor_config.json and a parameters-only
pytorch_model.bin. Remote-code .py files are planted next to the configs: they raise if anything ever executes them.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer
from torch import nn
from transformers import AutoModelForCausalLM, Florence2Config, Florence2ForConditionalGeneration

from ..conversion.convert import DTYPES, staged_output
from ..conversion.keys import LLAVA_VISION_PREFIX, TRANSPOSED_NATIVE_KEYS, native_to_florence2
from ..conversion.source import FLORENCE2_ASSETS, text_config_from_llava
from ..families import LLMFamily, family
from ..processing import asset_dir
from ..tiny import tiny_config

TRAINING_MAX_LENGTH = 2048
TIED_FLORENCE2 = ("language_model.model.encoder.embed_tokens.weight", "language_model.model.decoder.embed_tokens.weight",
                  "language_model.lm_head.weight")  # fmt: skip
_TRAP = 'raise RuntimeError("florence_vl_hf executed code from a source checkpoint: {name}")\n'


def _perturb(module: nn.Module, generator: torch.Generator, scale: float = 0.05):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def _llava_config(llm_family: LLMFamily, text_config, projection_dim: int, dtype: str, pad_token_id: int) -> dict:
    config = json.loads((llm_family.asset_dir / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        config[key] = getattr(text_config, key)
    config["vocab_size"] = llm_family.checkpoint_vocab_size
    scaling = config.get("rope_scaling") or {}
    half_head = text_config.hidden_size // text_config.num_attention_heads // 2
    for key in ("short_factor", "long_factor"):
        if key in scaling:
            scaling[key] = scaling[key][:half_head]
    config.update(
        model_type=llm_family.llava_model_type,
        architectures=[llm_family.llava_architecture],
        mm_vision_tower="microsoft/Florence-2-large-ft",
        mm_projector_type="mlp3x_gelu",
        mm_hidden_size=projection_dim,
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_patch_merge_type="flat",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        mm_projector_lr=None,
        vision_tower_lr=None,
        image_aspect_ratio="pad",
        tokenizer_padding_side="right",
        tokenizer_model_max_length=TRAINING_MAX_LENGTH,
        tune_mm_mlp_adapter=False,
        tune_entire_model=False,
        freeze_mm_mlp_adapter=False,
        use_mm_proj=True,
        use_cache=True,
        torch_dtype=dtype,
        transformers_version="4.43.3",
        pad_token_id=pad_token_id,
    )
    return config


def _microsoft_florence2_config(florence2: Florence2Config) -> dict:
    """Florence-2's remote-code config.json, as transformers 4.43 saves it (vision model_type "", float32)."""
    config = json.loads((asset_dir(FLORENCE2_ASSETS) / "config.json").read_text())
    davit = florence2.vision_config
    config["vision_config"].update(
        model_type="",
        dim_embed=list(davit.embed_dim),
        depths=list(davit.depths),
        num_heads=list(davit.num_heads),
        num_groups=list(davit.num_groups),
        patch_size=list(davit.patch_size),
        patch_stride=list(davit.patch_stride),
        patch_padding=list(davit.patch_padding),
        patch_prenorm=list(davit.patch_prenorm),
        window_size=davit.window_size,
        projection_dim=davit.projection_dim,
    )
    bart = florence2.text_config
    for key in ("vocab_size", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "decoder_layers",
                "decoder_attention_heads", "decoder_ffn_dim", "max_position_embeddings"):  # fmt: skip
        config["text_config"][key] = getattr(bart, key)
    config["text_config"]["num_hidden_layers"] = bart.encoder_layers
    config["projection_dim"] = davit.projection_dim
    config["torch_dtype"] = "float32"
    return config


def _write_weights(folder: Path, state: dict, weights_format: str, shards: int):
    keys = list(state)
    groups = [keys[i::shards] for i in range(shards)] if shards > 1 else [keys]
    suffix = "safetensors" if weights_format == "safetensors" else "bin"
    stem = "model" if suffix == "safetensors" else "pytorch_model"
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        name = f"{stem}-{number:05d}-of-{len(groups):05d}.{suffix}" if len(groups) > 1 else f"{stem}.{suffix}"
        part = {key: state[key].clone().contiguous() for key in group}
        if suffix == "safetensors":
            save_file(part, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(group, name))
    if len(groups) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps(index, indent=2))


class _TrainingTokenizer:
    """The LLM tokenizer as the original training left it: the family's own, with the '<pad>' train.py added to a
    tokenizer without a pad token (Llama-3.1's), and the settings its save wrote."""

    def __init__(self, llm_family: LLMFamily):
        self.family, assets = llm_family, llm_family.asset_dir
        self.settings = json.loads((assets / "tokenizer_config.json").read_text())
        self.settings.update(model_max_length=TRAINING_MAX_LENGTH, padding_side="right")
        self.special = json.loads((assets / "special_tokens_map.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(assets / "tokenizer.json"))
        if self.settings.get("pad_token") is None:
            self.tokenizer.add_special_tokens([AddedToken("<pad>", special=True, normalized=False)])
            pad = {"content": "<pad>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
            self.settings["added_tokens_decoder"][str(self.tokenizer.token_to_id("<pad>"))] = {**pad, "special": True}
            self.settings["pad_token"] = "<pad>"
            self.special["pad_token"] = pad

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.token_to_id(self.settings["pad_token"])

    def save(self, folder: Path):
        if self.family.sentencepiece_leading_space:  # the slow tokenizer only, as transformers 4.43 saved it
            for name in ("tokenizer.model", "added_tokens.json"):
                shutil.copyfile(self.family.asset_dir / name, folder / name)
        else:
            self.tokenizer.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(self.settings, indent=2))
        (folder / "special_tokens_map.json").write_text(json.dumps(self.special, indent=2))


def make_fixture(
    output_dir,
    llm: str = "phi3",
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    weights_format: str = "safetensors",
    shards: int = 2,
    image_size: int = 32,
    vision_tower_weights: bool = True,
    tied_copies: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a tiny random original-layout Florence-VL checkpoint of the LLM family `llm` ("phi3" or "llama3") to
    `output_dir` (see the module docstring).

    `tied_copies`: the main weights also hold the BART embed_tokens / lm_head copies of the shared embedding, as
    train.py's save of a GPU model does (each key is copied to the CPU on its own); `False` gives the deduplicated
    layout of a save that kept them shared. `vision_tower_weights=False` leaves out vision_tower/pytorch_model.bin.
    """
    llm_family = family(llm)
    if weights_format not in ("safetensors", "bin"):
        raise ValueError(f"weights_format must be 'safetensors' or 'bin', got {weights_format!r}")
    torch_dtype = DTYPES[dtype]
    generator = torch.Generator().manual_seed(seed)
    tiny = tiny_config(llm_family.name, image_size=image_size)
    florence2_config = Florence2Config(
        vision_config=tiny.vision_config.vision_config.to_dict(), text_config=tiny.vision_config.text_config.to_dict()
    )
    tokenizer = _TrainingTokenizer(llm_family)
    llava_config = _llava_config(llm_family, tiny.text_config, florence2_config.vision_config.projection_dim, dtype,
                                 tokenizer.pad_token_id)  # fmt: skip

    torch.manual_seed(seed)
    florence2 = Florence2ForConditionalGeneration(florence2_config).eval()
    _perturb(florence2, generator)
    language_model = AutoModelForCausalLM.from_config(text_config_from_llava(llava_config))
    _perturb(language_model, generator)
    width, hidden = 4 * florence2_config.vision_config.projection_dim, tiny.text_config.hidden_size
    projector = nn.ModuleList([nn.Linear(width, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)])
    _perturb(projector, generator)

    florence2_params = {name for name, _ in florence2.named_parameters()}  # tied copies are listed once
    microsoft, microsoft_params = {}, {}
    for name, tensor in florence2.state_dict().items():
        key = native_to_florence2(name)
        value = tensor.t() if name in TRANSPOSED_NATIVE_KEYS else tensor
        if key in TIED_FLORENCE2 and not tied_copies:
            continue
        microsoft[key] = value
        if name in florence2_params:
            microsoft_params[key] = value
    microsoft["language_model.final_logits_bias"] = torch.zeros(1, florence2_config.text_config.vocab_size)

    main = {key: value for key, value in language_model.state_dict().items()}
    for index, linear in enumerate(projector):
        prefix = "model.mm_projector.encoder_mlp." + ("0." if index == 0 else f"{index}.1.")
        main[prefix + "weight"], main[prefix + "bias"] = linear.weight.data, linear.bias.data
    main.update({LLAVA_VISION_PREFIX + key: value for key, value in microsoft.items()})
    main = {key: value.to(torch_dtype) if value.is_floating_point() else value for key, value in main.items()}

    with staged_output(Path(output_dir), overwrite) as folder:
        (folder / "config.json").write_text(json.dumps(llava_config, indent=2))
        shutil.copyfile(llm_family.asset_dir / "generation_config.json", folder / "generation_config.json")
        _write_weights(folder, main, weights_format, shards)
        tokenizer.save(folder)
        vision = folder / "vision_tower"
        vision.mkdir()
        (vision / "config.json").write_text(json.dumps(_microsoft_florence2_config(florence2_config), indent=2))
        preprocessor = json.loads((asset_dir(FLORENCE2_ASSETS) / "preprocessor_config.json").read_text())
        preprocessor.update(size={"height": image_size, "width": image_size}, crop_size={"height": image_size, "width": image_size},
                            image_seq_length=tiny.num_encoder_image_tokens)  # fmt: skip
        (vision / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
        if vision_tower_weights:
            params = {key: value.to(torch_dtype).clone() for key, value in microsoft_params.items()}
            torch.save(params, vision / "pytorch_model.bin")
        for trap in ("configuration_florence2.py", "modeling_florence2.py", "processing_florence2.py"):
            (vision / trap).write_text(_TRAP.format(name=trap))
        (folder / "llava_trap.py").write_text(_TRAP.format(name="llava_trap.py"))
    return Path(output_dir)
