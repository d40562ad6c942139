"""Converting an original Florence-VL checkpoint (LLaVA-fork layout) into a verified, Hub-ready Florence-VL folder.

`convert_checkpoint` runs four steps on a `Source` (source.py):

1. `plan_conversion`: every check and decision about the source, from its configs, tokenizer and tensor headers (no
   tensor data is read): the tokenizer, the embedding rows, the model to fill (on the meta device), the processor,
   where each tensor comes from, the stored dtypes, the generation config;
2. `assemble`: the tensors read, checked and cast into the Florence-VL state dict;
3. `write_folder`: model, processor and licences saved into a staging folder (`staged_output`);
4. `verify_conversion` (verify.py): the written folder against an independent forward from the source tensors;
then the report and the model card are written next to them.
"""

import json
import math
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GenerationConfig
from transformers.models.florence2.modeling_florence2 import Florence2VisionPositionalEmbeddingCosine1D

from .. import __version__
from ..build import generation_config_for
from ..families import padded_rows
from ..files import NAME_MAX, sibling_prefix, write_text_atomic
from ..modeling import FlorenceVLConfig, FlorenceVLForConditionalGeneration
from ..processing import IMAGE_TOKEN, FlorenceVLProcessor, build_processor, prepare_tokenizer
from .card import render_model_card
from .errors import ConversionError
from .hub import REPORT_NAME, foreign_auto_map_entries
from .keys import Mapped, florence2_to_florence_vl, llava_to_florence_vl
from .source import (
    Source,
    TensorStore,
    check_llava_settings,
    image_size_from,
    load_tokenizer,
    open_source,
    text_config_from_llava,
)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
EMBED_TOKENS_KEY = "model.language_model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"
TEMPORAL_EMBEDDING_KEY = "model.vision_tower.image_projector.visual_temporal_embed.pos_idx_to_embed"


# ---- the four steps ------------------------------------------------------------------------------------------------

def convert_checkpoint(
    source,
    output_dir,
    *,
    revision: str | None = None,
    token: str | None = None,
    dtype: str = "bfloat16",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    verify: bool = True,
    verify_dtype: str = "float32",
    verify_device: str | None = None,
    repo_id: str | None = None,
    florence2_config_dir=None,
    log=print,
) -> dict:
    """Convert an original Florence-VL checkpoint (folder or Hub repo id) into `output_dir`; returns the report.

    The folder holds config.json (model_type florence_vl, dtype), safetensors shards with an index, the processor
    and tokenizer (with `<image>`), generation_config.json, the trust_remote_code files, README.md and
    conversion_report.json. Unless `verify=False`, the written folder is loaded back with the Auto classes and
    compared with an independent forward from the source tensors; a failure raises VerificationError and nothing is
    left at `output_dir`.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)  # before a Hub source is downloaded
    source_ckpt = open_source(source, revision, token, florence2_config_dir)
    target = output_dir.resolve()
    if target == source_ckpt.folder or target in source_ckpt.folder.parents:
        raise ConversionError(f"OUTPUT_DIR {output_dir} is the source folder or contains it; choose another folder")
    log(f"source {source_ckpt.source_id} ({source_ckpt.config['model_type']}, {source_ckpt.family.name} template) in "
        f"{source_ckpt.folder}")  # fmt: skip

    # Staged first: a read-only, full or misnamed OUTPUT_DIR fails before minutes of reading tensors.
    with staged_output(output_dir, overwrite, log) as staging:
        plan = plan_conversion(source_ckpt, DTYPES[dtype], log)
        state, tensor_summary = assemble(plan, log)
        log(f"mapped {tensor_summary['mapped']} tensors; dropped " + ", ".join(
            f"{why} ({d['tensors']} tensors, {d['parameters']:,} parameters)" for why, d in tensor_summary["dropped"].items()))  # fmt: skip
        write_folder(plan, state, staging, max_shard_size)
        del state
        log(f"wrote {sum(1 for _ in staging.iterdir())} files to a staging folder")

        report = conversion_report(plan, tensor_summary, dtype, max_shard_size)
        if verify:
            from .verify import verify_conversion

            report["verification"] = verify_conversion(
                source_ckpt, staging, plan.original_vocab_size, compute_dtype=DTYPES[verify_dtype],
                stored_dtype=DTYPES[dtype], device=verify_device, lossless=tensor_summary["changed_by_dtype_cast"] == 0,
                log=log,
            )  # fmt: skip
        else:
            report["verification"] = {"passed": False, "skipped": True}
        card = render_model_card(
            report,
            repo_id or output_dir.resolve().name,
            source_ckpt.family.name,
            base_model=source_ckpt.source_id if source_ckpt.revision else None,
        )
        write_text_atomic(staging / "README.md", card)
        write_text_atomic(staging / REPORT_NAME, json.dumps(report, indent=2) + "\n")
    log(f"saved {output_dir}")
    return report


# ---- decisions shared with from_pretrained_parts --------------------------------------------------------------------

def embedding_rows(tokenizer, rows: int) -> int:
    """Rows the LLM embedding matrix (now `rows` rows) needs for `tokenizer` once the processor prepared it
    (`prepare_tokenizer`, applied here in place, adds '<pad>' where it has no pad token, and '<image>'): `rows` when
    the tokens fit, else the tokens padded to a multiple of EMBEDDING_ROW_MULTIPLE, as the original resized."""
    tokens = len(prepare_tokenizer(tokenizer))
    return rows if tokens <= rows else padded_rows(tokens)


def temporal_embedding(vision_config) -> torch.Tensor:
    """Florence-2's cosine temporal table (a buffer the original's vision_tower/ .bin does not store): the one
    transformers' Florence-2 builds for `vision_config`."""
    return Florence2VisionPositionalEmbeddingCosine1D(vision_config).pos_idx_to_embed


def map_key(mapper, store: TensorStore, key: str) -> Mapped:
    """`mapper(key)`, an unknown key being a ConversionError naming the file that holds it."""
    try:
        return mapper(key)
    except KeyError as error:
        raise ConversionError(f"Unknown tensor {key!r} in {store.location(key)}: {error.args[0]}") from None


# ---- 1. plan ------------------------------------------------------------------------------------------------------

def build_model(source: Source, vocab_rows: int, image_token_id: int) -> FlorenceVLForConditionalGeneration:
    """The Florence-VL model the source describes, on the meta device (no memory): its config, state dict keys,
    shapes and dtypes are what the converted weights are checked against, and it saves them."""
    check_llava_settings(source.config, source.florence2.vision_config.projection_dim)
    text_config = text_config_from_llava(source.config)
    text_config.vocab_size = vocab_rows
    image_size = image_size_from(source.preprocessor)
    try:
        config = FlorenceVLConfig(
            vision_config=source.florence2.to_dict(),
            text_config=text_config.to_dict(),
            image_size=image_size,
            projector_type=source.config["mm_projector_type"],
            image_token_id=image_token_id,
        )
        with torch.device("meta"):
            return FlorenceVLForConditionalGeneration(config)
    except Exception as error:  # a value the checks above do not know, deep inside transformers
        raise ConversionError(
            f"Cannot build the model from {source.folder / 'config.json'} and {source.vision_config_from} config: "
            f"{type(error).__name__}: {error}"
        ) from error


@dataclass
class TensorPlan:
    """For each Florence-VL key: where its tensor comes from. Built from key names only (no tensor is read)."""

    sources: dict[str, tuple[TensorStore, str, bool]] = field(default_factory=dict)
    dropped: dict[str, dict] = field(default_factory=dict)
    duplicates: list[tuple[str, TensorStore, str, bool]] = field(default_factory=list)
    source_tensors: int = 0

    def add(self, store: TensorStore, key: str, mapped: Mapped):
        self.source_tensors += 1
        if mapped.target is None:
            reason = mapped.dropped if store.label == "main" else f"{mapped.dropped}, copy in {store.label}/"
            entry = self.dropped.setdefault(reason, {"tensors": 0, "parameters": 0, "keys": []})
            entry["tensors"] += 1
            entry["parameters"] += math.prod(store.shape(key))
            entry["keys"].append(f"{store.location(key)}:{key}")
        elif mapped.target in self.sources:
            self.duplicates.append((mapped.target, store, key, mapped.transpose))
        else:
            self.sources[mapped.target] = (store, key, mapped.transpose)


def check_stored_dtypes(source: Source, plan: TensorPlan, expected_dtypes: dict[str, torch.dtype], log=print):
    """Every tensor's stored dtype (from its header, no data read) against what the model expects and what its
    folder declares: a floating-point weight stored as integers, or one tensor whose header declares another float
    type than the rest of its folder (a corrupted header: same byte size, reinterpreted bits), is refused by name."""
    by_store: dict[str, dict] = {}
    entries = [(target, store, key) for target, (store, key, _) in plan.sources.items()]
    entries += [(target, store, key) for target, store, key, _ in plan.duplicates]
    for target, store, key in entries:
        stored, want = store.dtype(key), expected_dtypes[target]
        where = f"{store.location(key)}:{key}"
        if want.is_floating_point and not (isinstance(stored, torch.dtype) and stored.is_floating_point):
            raise ConversionError(f"{where} is stored as {stored}; the model's {target} is a floating-point weight")
        if isinstance(stored, torch.dtype) and stored.is_floating_point:
            by_store.setdefault(store.label, {}).setdefault(stored, []).append(where)
    declared = source.config.get("torch_dtype", source.config.get("dtype"))
    for label, groups in by_store.items():
        if label == "main" and declared in DTYPES and len(groups) == 1 and DTYPES[declared] not in groups:
            # Uniform, so not a corrupted header: a checkpoint saved in another dtype than its config records.
            log(f"note: config.json declares torch_dtype {declared}; the main weights are all stored as {next(iter(groups))}")
        if len(groups) > 1:
            majority = max(groups, key=lambda d: len(groups[d]))
            if label == "main" and declared in DTYPES and DTYPES[declared] in groups:
                majority = DTYPES[declared]
            odd = [f"{where} ({dtype})" for dtype, wheres in groups.items() if dtype != majority for where in wheres]
            raise ConversionError(
                f"{len(odd)} tensors of the {label} weights are stored in another dtype than the other "
                f"{len(groups[majority])} ({majority}), a corrupted header or a mixed checkpoint: {odd[:3]}"
            )


def plan_tensors(source: Source) -> TensorPlan:
    """Map every source tensor to one Florence-VL key or drop it on purpose; unknown keys are errors.

    Rule for the vision weights: the main weights' copy (model.vision_tower.vision_tower.*) is the one the original
    loader uses; a vision_tower/ copy of the same tensor must be equal to it (checked in `assemble`).
    """
    plan = TensorPlan()
    for store, mapper in ((source.main, llava_to_florence_vl), (source.vision, florence2_to_florence_vl)):
        if store is None:
            continue
        for key in store.keys():
            plan.add(store, key, map_key(mapper, store, key))
    return plan


def check_tensor_plan(source: Source, tensors: TensorPlan, skeleton: FlorenceVLForConditionalGeneration,
                      log=print) -> list[str]:
    """Check the planned tensors against the (meta) model's keys and dtypes; returns the keys to derive instead."""
    model_state = skeleton.state_dict()
    derived = []
    missing = [k for k in model_state if k not in tensors.sources]
    if TEMPORAL_EMBEDDING_KEY in missing:
        missing.remove(TEMPORAL_EMBEDDING_KEY)
        derived.append(TEMPORAL_EMBEDDING_KEY)
    if LM_HEAD_KEY in missing and skeleton.config.tie_word_embeddings:
        missing.remove(LM_HEAD_KEY)
    if missing:
        raise ConversionError(f"The source lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}")
    extra = [f"{store.location(key)}:{key} -> {target}" for target, (store, key, _) in tensors.sources.items()
             if target not in model_state]  # fmt: skip
    if extra:
        raise ConversionError(f"{len(extra)} source tensors have no place in the Florence-VL model, e.g. {extra[:5]}")
    check_stored_dtypes(source, tensors, {k: v.dtype for k, v in model_state.items()}, log)
    return derived


@dataclass
class ConversionPlan:
    """Everything decided about one source before its tensors are read."""

    source: Source
    dtype: torch.dtype  # of the written weights
    tokenizer: object  # the source's LLM tokenizer, prepared for the processor ('<pad>', '<image>')
    original_vocab_size: int  # tokens of the source tokenizer: the original loader resized the LLM to these
    source_rows: int  # rows of the source's embedding matrix
    embedding_rows: int  # rows of the converted one
    skeleton: FlorenceVLForConditionalGeneration  # on the meta device: the keys, shapes and dtypes to fill
    processor: FlorenceVLProcessor
    tensors: TensorPlan
    derived: list[str]  # model keys computed, not read from the source
    generation_config: GenerationConfig

    @property
    def suppressed_token_ids(self) -> list[int]:
        """Ids the converted model has rows for but the original could not produce, `<image>` among them."""
        return list(range(self.original_vocab_size, self.embedding_rows))


def plan_conversion(source: Source, dtype: torch.dtype, log=print) -> ConversionPlan:
    """Take every decision about `source` (see ConversionPlan) and run every check that needs no tensor data."""
    tokenizer, original_vocab_size = load_tokenizer(source)
    tensors = plan_tensors(source)
    if EMBED_TOKENS_KEY not in tensors.sources:
        raise ConversionError("The source has no LLM input embedding (model.embed_tokens.weight)")
    store, key, _ = tensors.sources[EMBED_TOKENS_KEY]
    source_rows = store.shape(key)[0]
    rows = embedding_rows(tokenizer, source_rows)
    skeleton = build_model(source, rows, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    processor = build_processor(skeleton.config, tokenizer=tokenizer, template=source.family.name)
    processor.image_aspect_ratio = source.config.get("image_aspect_ratio", "pad")
    derived = check_tensor_plan(source, tensors, skeleton, log)

    generation_config = generation_config_for(source.family.name)
    if generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    plan = ConversionPlan(source, dtype, tokenizer, original_vocab_size, source_rows, rows, skeleton, processor, tensors,
                          derived, generation_config)  # fmt: skip
    if plan.suppressed_token_ids:
        generation_config.suppress_tokens = plan.suppressed_token_ids
    return plan


# ---- 2. assemble --------------------------------------------------------------------------------------------------

def _load(store: TensorStore, key: str, transpose: bool) -> torch.Tensor:
    tensor = store.get(key)
    return tensor.t() if transpose else tensor


def _check_same(kept: torch.Tensor, kept_store, kept_key, other: torch.Tensor, store, key, target):
    """Two source tensors for one target (a vision_tower/ copy, a tied alias) must be equal in the kept one's dtype."""
    if other.shape == kept.shape and torch.equal(other.to(kept.dtype), kept):
        return
    difference = (
        f"max abs difference {(other.float() - kept.float()).abs().max().item():.3g}"
        if other.shape == kept.shape
        else f"shapes {tuple(other.shape)} vs {tuple(kept.shape)}"
    )
    raise ConversionError(
        f"{store.location(key)}:{key} and {kept_store.location(kept_key)}:{kept_key} both give {target} but differ "
        f"({difference}). The original loader uses the main weights' copy; a differing copy means the checkpoint is "
        "inconsistent"
    )


def _check_finite(tensor: torch.Tensor, where: str):
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        nan = torch.isnan(tensor).sum().item()
        raise ConversionError(
            f"{where} has {bad:,} non-finite values of {tensor.numel():,} ({nan:,} NaN, {bad - nan:,} Inf): the "
            "checkpoint is corrupted, nothing is written"
        )


def assemble(plan: ConversionPlan, log=print) -> tuple[dict, dict]:
    """The Florence-VL state dict in the plan's dtype, each tensor checked against the (meta) model's shape, finite,
    equal to its duplicates; and a summary for the report."""
    expected = {k: v.shape for k, v in plan.skeleton.state_dict().items()}
    tensors, dtype = plan.tensors, plan.dtype
    duplicates: dict[str, list[tuple[TensorStore, str, bool]]] = {}
    for target, store, key, transpose in tensors.duplicates:
        duplicates.setdefault(target, []).append((store, key, transpose))
    state, resized, changed_by_cast = {}, {}, 0
    for target, (store, key, transpose) in tensors.sources.items():
        tensor = _load(store, key, transpose)
        _check_finite(tensor, f"{store.location(key)}:{key}")
        for other_store, other_key, other_transpose in duplicates.get(target, []):
            _check_same(tensor, store, key, _load(other_store, other_key, other_transpose), other_store, other_key, target)
        want = expected[target]
        if tensor.shape != want:
            if target in (EMBED_TOKENS_KEY, LM_HEAD_KEY) and tensor.shape[1:] == want[1:] and tensor.shape[0] < want[0]:
                resized[target] = [tensor.shape[0], want[0]]
                tensor = torch.cat([tensor, tensor.new_zeros(want[0] - tensor.shape[0], *want[1:])])
            else:
                raise ConversionError(
                    f"Shape mismatch for {key!r} ({store.location(key)}): {tuple(tensor.shape)}"
                    f"{' after transposing' if transpose else ''}, the model's {target} is {tuple(want)}"
                )
        if tensor.is_floating_point():
            converted = tensor.to(dtype)
            if tensor.dtype != dtype and not torch.equal(converted.to(tensor.dtype), tensor):
                changed_by_cast += 1
                _check_finite(converted, f"{store.location(key)}:{key} cast to {dtype}")
            tensor = converted
        state[target] = tensor.contiguous()
    if TEMPORAL_EMBEDDING_KEY in plan.derived:
        state[TEMPORAL_EMBEDDING_KEY] = temporal_embedding(plan.skeleton.config.vision_config).to(dtype)
    summary = {
        "source": tensors.source_tensors,
        "mapped": len(tensors.sources),
        "checked_duplicates": len(tensors.duplicates),
        "derived": plan.derived,
        "resized": resized,
        "changed_by_dtype_cast": changed_by_cast,
        "dropped": {why: {"tensors": d["tensors"], "parameters": d["parameters"]} for why, d in tensors.dropped.items()},
        "dropped_keys": {why: d["keys"] for why, d in tensors.dropped.items()},
    }
    return state, summary


# ---- 3. write -----------------------------------------------------------------------------------------------------

def write_folder(plan: ConversionPlan, state: dict, folder: Path, max_shard_size: str | int):
    """Save the model (config, generation config, sharded safetensors), the processor and the LLM's licence files."""
    model = plan.skeleton.to(plan.dtype)
    model.generation_config = plan.generation_config
    model.save_pretrained(folder, state_dict=state, max_shard_size=max_shard_size)
    plan.processor.save_pretrained(folder)
    for name in plan.source.family.licence_files:
        shutil.copyfile(plan.source.family.asset_dir / name, folder / name)
    foreign = foreign_auto_map_entries(folder)
    if foreign:  # load_tokenizer drops the source's; this guards every other way one could get in
        raise ConversionError(f"The output would carry auto_map entries the converter did not write: {foreign[:3]}")


def conversion_report(plan: ConversionPlan, tensor_summary: dict, dtype: str, max_shard_size: str | int) -> dict:
    source, suppressed = plan.source, plan.suppressed_token_ids
    return {
        "converter": {"name": "florence_vl_hf", "version": __version__},
        "source": {
            "id": source.source_id,
            "revision": source.revision,
            "model_type": source.config["model_type"],
            "template": source.family.name,
            "florence2_config": source.vision_config_from,
            "weight_files": {store.label: sorted(store.files) for store in (source.main, source.vision) if store},
        },
        "output": {"dtype": dtype, "max_shard_size": str(max_shard_size)},
        "tensors": {k: v for k, v in tensor_summary.items() if k != "dropped_keys"},
        "dropped_keys": tensor_summary["dropped_keys"],
        "vocabulary": {
            "source_embedding_rows": plan.source_rows,
            "original_vocab_size": plan.original_vocab_size,
            "embedding_rows": plan.embedding_rows,
            "image_token_id": plan.processor.image_token_id,
            "suppressed_token_ids": [suppressed[0], suppressed[-1]] if suppressed else [],
        },
        "image_tokens_per_image": plan.skeleton.config.num_image_tokens,
    }


# ---- OUTPUT_DIR, staged -------------------------------------------------------------------------------------------

def check_output_dir(output_dir: Path, overwrite: bool):
    """Refuse an OUTPUT_DIR that is a file, a non-empty folder (unless `overwrite`) or a name too long to create."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"{output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ConversionError(f"{output_dir} is not empty (use --overwrite to replace it)")
    if len(os.fsencode(output_dir.name)) > NAME_MAX:
        raise ConversionError(f"OUTPUT_DIR's name is {len(os.fsencode(output_dir.name))} bytes; file systems allow {NAME_MAX}")


def _sibling_name(output_dir: Path, kind: str) -> str:
    """A sibling folder name carrying this run's pid, so that a later run recognises the folder of a dead run."""
    return f"{sibling_prefix(output_dir, kind)}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_dead_staging(output_dir: Path, log=print) -> list[Path]:
    """Remove the staging (and retired) folders that runs into `output_dir` killed by SIGKILL or a power cut left next
    to it; folders of runs still alive (another conversion into the same folder) are kept. Returns what was removed."""
    removed = []
    if not output_dir.parent.is_dir():
        return removed
    prefixes = [sibling_prefix(output_dir, "partial"), sibling_prefix(output_dir, "old")]
    for entry in output_dir.parent.iterdir():
        prefix = next((p for p in prefixes if entry.name.startswith(p)), None)
        if prefix is None or not entry.is_dir() or entry.is_symlink():
            continue
        pid = entry.name[len(prefix):].split("-")[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
            log(f"removed {entry.name}, left next to {output_dir.name} by a run that died (pid {pid})")
    return removed


def _create_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders created (deepest last) so a failed run can remove them again."""
    missing = []
    for parent in [folder, *folder.parents]:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ConversionError(f"Cannot create OUTPUT_DIR under {parent}: it is a file, not a folder")
            break
        missing.append(parent)
    created = []
    for parent in reversed(missing):
        parent.mkdir()
        created.append(parent)
    return created


@contextmanager
def staged_output(output_dir: Path, overwrite: bool, log=print):
    """Write into a hidden sibling folder and rename it to `output_dir` only when everything succeeded. A failure
    leaves neither the staging folder nor parent folders this run created; an OSError (read-only file system, full
    disk, no permission) becomes a ConversionError naming OUTPUT_DIR and the cause."""
    output_dir = Path(output_dir).resolve()
    check_output_dir(output_dir, overwrite)
    created, staging = [], None
    try:
        created = _create_parents(output_dir.parent)
        remove_dead_staging(output_dir, log)
        staging = output_dir.parent / _sibling_name(output_dir, "partial")
        staging.mkdir(mode=0o700)
        yield staging
        _default_permissions(staging)
        if output_dir.exists():
            retired = output_dir.parent / _sibling_name(output_dir, "old")
            os.replace(output_dir, retired)
            os.replace(staging, output_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, output_dir)
    except OSError as error:
        if error.filename is not None and not str(error.filename).startswith(str(output_dir.parent)):
            raise  # reading something else (the source) failed, not writing OUTPUT_DIR
        raise ConversionError(
            f"Cannot write OUTPUT_DIR {output_dir}: {error.strerror or error}"
            f"{f' ({error.filename})' if error.filename else ''}; nothing was written there"
        ) from error
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if not output_dir.exists():
            for parent in reversed(created):
                try:
                    parent.rmdir()
                except OSError:
                    break


def _default_permissions(folder: Path):
    """mkdtemp and some writers create owner-only entries; give the result the permissions of a plain copy."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
