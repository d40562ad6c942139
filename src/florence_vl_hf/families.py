"""The language-model families of the official Florence-VL checkpoints: every fact the package needs about an LLM,
in one table (not part of the Hub payload).

A family is named as the original code's `--version` and chat template: "phi3" (Florence-VL 3B, Phi-3.5-mini-instruct)
and "llama3" (Florence-VL 8B, Llama-3.1-8B-Instruct). Everything that takes an LLM family by name (`tiny_config`,
`build_processor`, `training_arguments`, `make_fixture`, the `--llm` options) takes these names; code holding a
text config looks its family up by the config's transformers `model_type` with `family_of`.
"""

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

# The original padded the LLM's embedding matrix to a multiple of 64 rows when it added tokens.
EMBEDDING_ROW_MULTIPLE = 64


def padded_rows(num_tokens: int) -> int:
    """Rows of an embedding matrix holding `num_tokens` tokens, padded up to a multiple of EMBEDDING_ROW_MULTIPLE."""
    return -(-num_tokens // EMBEDDING_ROW_MULTIPLE) * EMBEDDING_ROW_MULTIPLE


@dataclass(frozen=True)
class LLMFamily:
    name: str  # the family's name in this package, the original's `--version`, and its chat template's name
    model_type: str  # transformers' model_type of its text config
    display_name: str  # the upstream model
    hub_id: str  # the upstream model's Hub repository
    assets: str  # folder of its bundled tokenizer and configs under florence_vl_hf/assets
    licence: str  # Hub licence identifier of models built on it
    licence_files: tuple[str, ...]  # copied from the assets into every converted folder
    llava_model_type: str  # model_type of the original LLaVA-fork checkpoints
    llava_architecture: str
    checkpoint_vocab_size: int  # rows of the released checkpoints' embedding matrices
    image_token_id: int  # '<image>' in its bundled tokenizer after prepare_tokenizer (the last token added)
    bos_token_id: int  # the text config's special ids of the configs built on it (tiny_config, the tiny recipe)
    eos_token_id: int
    pad_token_id: int | None
    assistant_marker: str  # a string only this family's chat template contains
    sentencepiece_leading_space: bool  # the original tokenized it with the slow sentencepiece tokenizer
    lora_targets: tuple[str, ...]  # its attention and MLP linear layers, adapted by LoRA by default

    @property
    def asset_dir(self) -> Path:
        return Path(str(resources.files("florence_vl_hf") / "assets" / self.assets))


_LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FAMILIES = {
    family.name: family
    for family in (
        LLMFamily(
            name="phi3",
            model_type="phi3",
            display_name="Phi-3.5-mini-instruct",
            hub_id="microsoft/Phi-3.5-mini-instruct",
            assets="phi-3.5-mini-instruct",
            licence="mit",
            licence_files=("LICENSE", "NOTICE.md"),
            llava_model_type="llava_phi",
            llava_architecture="LlavaPhiForCausalLM",
            checkpoint_vocab_size=32064,
            image_token_id=32011,
            bos_token_id=1,
            eos_token_id=32000,  # <|endoftext|>, as Phi-3.5's config.json
            pad_token_id=32000,
            assistant_marker="<|assistant|>",
            sentencepiece_leading_space=True,
            lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        ),
        LLMFamily(
            name="llama3",
            model_type="llama",
            display_name="Llama-3.1-8B-Instruct",
            hub_id="meta-llama/Llama-3.1-8B-Instruct",
            assets="llama-3.1-8b-instruct",
            licence="llama3.1",
            licence_files=("LICENSE", "USE_POLICY.md"),
            llava_model_type="llava_llama",
            llava_architecture="LlavaLlamaForCausalLM",
            checkpoint_vocab_size=128257,  # 128256 + the '<pad>' the original's training added
            image_token_id=128257,  # after that '<pad>' (128256)
            bos_token_id=128000,
            eos_token_id=128009,  # <|eot_id|>, the end of a turn (one of the three its config.json lists)
            pad_token_id=None,
            assistant_marker="<|start_header_id|>",
            sentencepiece_leading_space=False,
            lora_targets=_LLAMA_LINEARS,
        ),
    )
}
FAMILY_NAMES = tuple(FAMILIES)


def family(name: str) -> LLMFamily:
    """The family named `name` ("phi3" or "llama3"); ValueError lists the names otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"Unknown LLM family {name!r}; choose one of {FAMILY_NAMES}") from None


def family_of(text_config) -> LLMFamily:
    """The family of a text config (or a model_type string), by transformers' model_type."""
    model_type = text_config if isinstance(text_config, str) else text_config.model_type
    for candidate in FAMILIES.values():
        if candidate.model_type == model_type:
            return candidate
    raise ValueError(
        f"{model_type!r} is not the LLM of a Florence-VL family ({', '.join(f.model_type for f in FAMILIES.values())})"
    )


def family_of_llava(llava_model_type: str) -> LLMFamily:
    """The family of an original checkpoint, by the LLaVA-fork model_type of its config.json."""
    for candidate in FAMILIES.values():
        if candidate.llava_model_type == llava_model_type:
            return candidate
    raise ValueError(
        f"{llava_model_type!r} is not an original Florence-VL model_type "
        f"({', '.join(f.llava_model_type for f in FAMILIES.values())})"
    )


__all__ = [
    "EMBEDDING_ROW_MULTIPLE",
    "FAMILIES",
    "FAMILY_NAMES",
    "LLMFamily",
    "family",
    "family_of",
    "family_of_llava",
    "padded_rows",
]
