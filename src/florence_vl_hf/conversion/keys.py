"""Checkpoint key mappings, as data plus pure functions.

Three name spaces meet here:

* Microsoft's remote-code Florence-2 (``vision_tower.convs.0.proj.weight``, ``image_projection``, ...), as saved in
  the original Florence-VL's ``vision_tower/`` folder and, prefixed with ``model.vision_tower.vision_tower.``, in its
  main weights;
* transformers' native Florence-2 (``model.vision_tower.convs.0.conv.weight``, ...), following the facts documented
  by transformers' ``convert_florence2_original_pytorch_to_hf.py``;
* Florence-VL (this package): ``model.vision_tower.{backbone,image_projector,encoder}``,
  ``model.multi_modal_projector.linears``, ``model.language_model``, ``lm_head``.

Every function maps a name that is already in its target name space to itself, so mapping twice changes nothing.
"""

import re
from dataclasses import dataclass

# (Microsoft Florence-2 prefix, native Florence-2 prefix). "{name}" matches a number; the rest is literal.
_DAVIT_BLOCK = "vision_tower.blocks.{stage}.{block}."
_NATIVE_DAVIT_BLOCK = "model.vision_tower.blocks.{stage}.{block}."
FLORENCE2_PREFIX_RULES: tuple[tuple[str, str], ...] = (
    ("vision_tower.convs.{stage}.proj.", "model.vision_tower.convs.{stage}.conv."),
    ("vision_tower.convs.{stage}.norm.", "model.vision_tower.convs.{stage}.norm."),
    *(
        (f"{_DAVIT_BLOCK}{kind}_block.{ms}", f"{_NATIVE_DAVIT_BLOCK}{kind}_block.{native}")
        for kind, attention in (("spatial", "window_attn"), ("channel", "channel_attn"))
        for ms, native in (
            ("conv1.fn.dw.", "conv1."),
            (f"{attention}.norm.", "norm1."),
            (f"{attention}.fn.", f"{attention}."),
            ("conv2.fn.dw.", "conv2."),
            ("ffn.norm.", "norm2."),
            ("ffn.fn.net.", "ffn."),
        )
    ),
    ("image_proj_norm.", "model.multi_modal_projector.image_proj_norm."),
    ("image_pos_embed.", "model.multi_modal_projector.image_position_embed."),
    ("visual_temporal_embed.", "model.multi_modal_projector.visual_temporal_embed."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)
# Whole-key renames. Microsoft's image_projection is an [in, out] matrix used as x @ P: the native Linear weight is
# its transpose.
FLORENCE2_KEY_RULES: dict[str, str] = {
    "image_projection": "model.multi_modal_projector.image_projection.weight",
    "language_model.final_logits_bias": "final_logits_bias",
}
TRANSPOSED_NATIVE_KEYS = frozenset({"model.multi_modal_projector.image_projection.weight"})
NATIVE_FLORENCE2_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head.")

# Native Florence-2 -> Florence-VL's vision tower. The decoder side is never built in Florence-VL.
DROPPED_FLORENCE2: dict[str, str] = {
    "model.language_model.decoder.": "Florence-2 decoder (Florence-VL uses the encoder only)",
    "lm_head.": "Florence-2 LM head (tied to the shared embedding; decoder side)",
    "final_logits_bias": "Florence-2 LM head bias buffer (decoder side)",
}
NATIVE_TO_FLORENCE_VL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.", "model.vision_tower.backbone."),
    ("model.multi_modal_projector.", "model.vision_tower.image_projector."),
    ("model.language_model.encoder.", "model.vision_tower.encoder."),
    ("model.language_model.shared.", "model.vision_tower.encoder.embed_tokens."),
)
# The BART encoder embedding is tied to `shared`: both names may be in a checkpoint and must then hold equal values.
TIED_ALIASES: dict[str, str] = {
    "model.language_model.encoder.embed_tokens.weight": "model.language_model.shared.weight",
}

# Florence-VL's own names: any key matching one is already mapped.
FLORENCE_VL_PATTERN = re.compile(
    r"^(model\.vision_tower\.(backbone|image_projector|encoder)\.|model\.multi_modal_projector\.linears\.\d+\."
    r"|model\.language_model\.|lm_head\.)"
)
FLORENCE_VL_VISION_PATTERN = re.compile(r"^model\.vision_tower\.(backbone|image_projector|encoder)\.")
# The original LLaVA-fork layout.
LLAVA_VISION_PREFIX = "model.vision_tower.vision_tower."
_LLAVA_PROJECTOR = re.compile(r"^model\.mm_projector\.encoder_mlp\.(\d+)\.(?:(1)\.)?(weight|bias)$")
LLAVA_NON_LLM = ("vision_tower.", "mm_projector.", "image_newline")


@dataclass(frozen=True)
class Mapped:
    """Where one source tensor goes: `target` (None when dropped on purpose, with `dropped` giving the reason)."""

    target: str | None
    transpose: bool = False
    dropped: str | None = None


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>\\d+)" for i, part in enumerate(parts))
    return re.compile("^" + pattern)


_FORWARD = [(_compile(ms), native) for ms, native in FLORENCE2_PREFIX_RULES]
_BACKWARD = [(_compile(native), ms) for ms, native in FLORENCE2_PREFIX_RULES]


def _rewrite(key: str, rules) -> str | None:
    for pattern, template in rules:
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict()) + key[match.end():]
    return None


def florence2_to_native(key: str) -> str:
    """Microsoft Florence-2 key -> transformers' native Florence-2 key (native keys map to themselves)."""
    if key in FLORENCE2_KEY_RULES:
        return FLORENCE2_KEY_RULES[key]
    if key.startswith(NATIVE_FLORENCE2_PREFIXES) or key == "final_logits_bias":
        return key
    mapped = _rewrite(key, _FORWARD)
    if mapped is None:
        raise KeyError(f"Unknown Florence-2 checkpoint key {key!r}")
    return mapped


def native_to_florence2(key: str) -> str:
    """The inverse of `florence2_to_native` (used to write checkpoints in Microsoft's layout)."""
    for ms, native in FLORENCE2_KEY_RULES.items():
        if key == native:
            return ms
    mapped = _rewrite(key, _BACKWARD)
    if mapped is None:
        raise KeyError(f"No Microsoft Florence-2 name for native key {key!r}")
    return mapped


def native_florence2_to_florence_vl(native_key: str) -> Mapped:
    """Native Florence-2 key -> Florence-VL key, or dropped with a reason."""
    native_key = TIED_ALIASES.get(native_key, native_key)
    for prefix, reason in DROPPED_FLORENCE2.items():
        if native_key.startswith(prefix):
            return Mapped(None, dropped=reason)
    for prefix, target in NATIVE_TO_FLORENCE_VL_PREFIXES:
        if native_key.startswith(prefix):
            return Mapped(target + native_key[len(prefix):])
    raise KeyError(f"Unknown native Florence-2 key {native_key!r}")


def florence2_to_florence_vl(key: str) -> Mapped:
    """A Florence-2 key in either layout (Microsoft or native) -> Florence-VL."""
    if FLORENCE_VL_VISION_PATTERN.match(key):
        return Mapped(key)
    native = florence2_to_native(key)
    mapped = native_florence2_to_florence_vl(native)
    if mapped.target is None:
        return mapped
    return Mapped(mapped.target, transpose=native in TRANSPOSED_NATIVE_KEYS and native != key)


def llava_to_florence_vl(key: str) -> Mapped:
    """A key of the original Florence-VL checkpoint (LLaVA-fork layout) -> Florence-VL.

    The LLM's `model.*` keys go under `model.language_model.`, the projector's Sequential indices become
    `linears.i`, and the Florence-2 weights under `model.vision_tower.vision_tower.` follow `florence2_to_florence_vl`.
    """
    if FLORENCE_VL_PATTERN.match(key):
        return Mapped(key)
    if key.startswith(LLAVA_VISION_PREFIX):
        try:
            return florence2_to_florence_vl(key[len(LLAVA_VISION_PREFIX):])
        except KeyError as error:
            raise KeyError(f"Unknown key {key!r} in the Florence-VL checkpoint ({error.args[0]})") from None
    match = _LLAVA_PROJECTOR.match(key)
    if match:
        index, nested, kind = match.groups()
        if (index == "0") != (nested is None):
            raise KeyError(f"Unexpected projector key {key!r}: expected encoder_mlp.0.* or encoder_mlp.<i>.1.*")
        return Mapped(f"model.multi_modal_projector.linears.{index}.{kind}")
    if key.startswith("model.") and not key[len("model."):].startswith(LLAVA_NON_LLM):
        return Mapped("model.language_model." + key[len("model."):])
    raise KeyError(f"Unknown key {key!r} in the Florence-VL checkpoint")
