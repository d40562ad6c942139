"""Converting an original Florence-VL checkpoint (LLaVA-fork layout) into a verified, Hub-ready Florence-VL folder."""

import hashlib
import json
import math
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.models.florence2.modeling_florence2 import Florence2VisionPositionalEmbeddingCosine1D

from .. import __version__
from ..build import generation_config_for
from ..files import NAME_MAX, sibling_prefix, write_text_atomic
from ..modeling import FlorenceVLConfig, FlorenceVLForConditionalGeneration
from ..processing import IMAGE_TOKEN, IMAGENET_MEAN, IMAGENET_STD, asset_dir, build_processor, prepare_tokenizer
from .card import render_model_card
from .errors import ConversionError
from .hub import REPORT_NAME, foreign_auto_map_entries
from .keys import LLAVA_VISION_PREFIX, Mapped, florence2_to_florence_vl, llava_to_florence_vl
from .source import (
    BIN_INDEX,
    BIN_SINGLE,
    LLAVA_MODEL_TYPES,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    TensorStore,
    check_llava_settings,
    check_regular,
    check_source_files,
    florence2_config,
    read_json,
    resolve_source,
    text_config_from_llava,
)

TEMPLATES = {"llava_phi": "phi3", "llava_llama": "llama3"}
LLM_ASSETS = {"phi3": "phi-3.5-mini-instruct", "llama3": "llama-3.1-8b-instruct"}
LICENSE_FILES = {"phi3": ("LICENSE", "NOTICE.md"), "llama3": ("LICENSE", "USE_POLICY.md")}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TEMPORAL_EMBEDDING_KEY = "model.vision_tower.image_projector.visual_temporal_embed.pos_idx_to_embed"
EMBEDDING_ROW_MULTIPLE = 64


@dataclass
class Source:
    """An original checkpoint opened for reading: configs as JSON, tensors lazily."""

    folder: Path
    source_id: str
    revision: str | None
    config: dict
    florence2: object  # transformers Florence2Config
    preprocessor: dict
    main: TensorStore
    vision: TensorStore | None
    vision_config_from: str = "vision_tower/"
    template: str = field(init=False)

    def __post_init__(self):
        self.template = TEMPLATES[self.config["model_type"]]


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in (SAFETENSORS_INDEX, BIN_INDEX, SAFETENSORS_SINGLE, BIN_SINGLE))


def open_source(source, revision: str | None = None, token: str | None = None, florence2_config_dir=None) -> Source:
    """Open an original checkpoint. Without vision_tower/config.json (train.py writes vision_tower/ only when the
    vision tower was trained), the Florence-2 config and preprocessor come from `florence2_config_dir`, by default the
    bundled Florence-2-large files; the tensors' shapes are checked against it."""
    folder, source_id, revision = resolve_source(source, revision, token)
    check_source_files(folder)
    config = read_json(folder / "config.json")
    if config.get("model_type") not in LLAVA_MODEL_TYPES:
        raise ConversionError(
            f"{folder / 'config.json'} has model_type {config.get('model_type')!r}; expected one of "
            f"{sorted(LLAVA_MODEL_TYPES)} (an original Florence-VL checkpoint)"
        )
    vision_dir = folder / "vision_tower"
    config_dir, config_from = vision_dir, "vision_tower/"
    if not check_regular(vision_dir / "config.json"):
        config_dir = Path(florence2_config_dir) if florence2_config_dir else asset_dir("florence-2-large")
        config_from = str(florence2_config_dir) if florence2_config_dir else "bundled Florence-2-large config"
    florence2 = florence2_config(read_json(config_dir / "config.json"), str(config_dir / "config.json"))
    preprocessor_path = config_dir / "preprocessor_config.json"
    preprocessor = read_json(preprocessor_path) if check_regular(preprocessor_path) else {}
    vision = TensorStore(vision_dir, "vision_tower") if _has_weights(vision_dir) else None
    return Source(folder, source_id, revision, config, florence2, preprocessor, TensorStore(folder, "main"), vision,
                  config_from)  # fmt: skip


def image_size_from(preprocessor: dict) -> int:
    """Florence-2's square input size; refuses preprocessing the converted processor would not reproduce."""
    size = preprocessor.get("size", {"height": 768, "width": 768})
    if isinstance(size, dict) and not {"height", "width"} <= set(size):
        raise ConversionError(f"Florence-2 preprocessor size {size}: expected a fixed height and width")
    height, width = (size["height"], size["width"]) if isinstance(size, dict) else (size, size)
    checks = {
        "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "resample": 3, "do_normalize": True,
        "do_rescale": True, "do_center_crop": False,
    }  # fmt: skip
    for key, expected in checks.items():
        value = preprocessor.get(key, expected)
        if (list(value) if isinstance(value, (list, tuple)) else value) != expected:
            raise ConversionError(f"vision_tower/preprocessor_config.json has {key}={value!r}; Florence-2 uses {expected!r}")
    if height != width:
        raise ConversionError(f"vision_tower/preprocessor_config.json resizes to {height}x{width}; expected a square")
    if not isinstance(height, int) or isinstance(height, bool) or height <= 0:
        raise ConversionError(f"vision_tower/preprocessor_config.json has size {size!r}; expected a positive integer")
    return height


def load_tokenizer(source: Source):
    """The LLM tokenizer of the source as a fast tokenizer, and the vocabulary size the original model used.

    Phi-3.5 sources hold only the sentencepiece files; if they are byte-identical to Phi-3.5-mini-instruct's, the
    bundled fast tokenizer.json of that model is used (the processor reproduces the slow tokenizer's ids).
    """
    folder = source.folder
    if (folder / "tokenizer.json").is_file():
        # config= keeps AutoTokenizer away from config.json, whose llava_* model_type transformers does not know.
        tokenizer = AutoTokenizer.from_pretrained(str(folder), config=text_config_from_llava(source.config))
        # A source's tokenizer auto_map names code the converter never runs: it is not carried into the output.
        tokenizer.init_kwargs.pop("auto_map", None)
        tokenizer._auto_map = None
        return tokenizer, len(tokenizer)
    if not (folder / "tokenizer.model").is_file():
        raise ConversionError(f"No tokenizer in {folder}: expected tokenizer.json or tokenizer.model")
    bundled = asset_dir(LLM_ASSETS[source.template])
    if not (bundled / "tokenizer.model").is_file():
        raise ConversionError(f"{folder} has only tokenizer.model; a {source.template} source needs tokenizer.json")
    for name in ("tokenizer.model", "added_tokens.json"):
        ours, theirs = folder / name, bundled / name
        if theirs.is_file() and (not ours.is_file() or _sha256(ours) != _sha256(theirs)):
            if name == "added_tokens.json" and ours.is_file() and read_json(ours) == read_json(theirs):
                continue
            raise ConversionError(
                f"{ours} differs from {LLM_ASSETS[source.template]}'s {name}: this source's sentencepiece tokenizer is "
                "not the one the converter knows; save it as a fast tokenizer (tokenizer.json) next to it"
            )
    tokenizer = AutoTokenizer.from_pretrained(str(bundled))
    source_settings = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    if "model_max_length" in source_settings:
        tokenizer.model_max_length = source_settings["model_max_length"]
        tokenizer.init_kwargs["model_max_length"] = source_settings["model_max_length"]
    return tokenizer, len(tokenizer)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
            try:
                mapped = mapper(key)
            except KeyError as error:
                raise ConversionError(f"Unknown tensor {key!r} in {store.location(key)}: {error.args[0]}") from None
            plan.add(store, key, mapped)
    return plan


def _temporal_embedding(rows: int, width: int) -> torch.Tensor:
    """Florence-2's cosine temporal table (a buffer the vision_tower/ .bin does not store), as transformers builds it."""
    sine, cosine = Florence2VisionPositionalEmbeddingCosine1D.get_sinusoid_embeddings(rows, width)
    table = torch.empty(rows, width)
    table[:, 0::2], table[:, 1::2] = sine, cosine
    return table


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


def _check_finite(tensor: torch.Tensor, where: str):
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        nan = torch.isnan(tensor).sum().item()
        raise ConversionError(
            f"{where} has {bad:,} non-finite values of {tensor.numel():,} ({nan:,} NaN, {bad - nan:,} Inf): the "
            "checkpoint is corrupted, nothing is written"
        )


def assemble(source: Source, plan: TensorPlan, skeleton: FlorenceVLForConditionalGeneration, dtype: torch.dtype,
             log=print):
    """The Florence-VL state dict in `dtype`, checked against the (meta) model's own keys, shapes and dtypes, every
    tensor finite, and a summary."""
    config = skeleton.config
    model_state = skeleton.state_dict()
    expected = {k: v.shape for k, v in model_state.items()}
    derived, resized = [], {}
    missing = [k for k in expected if k not in plan.sources]
    if TEMPORAL_EMBEDDING_KEY in missing:
        missing.remove(TEMPORAL_EMBEDDING_KEY)
        derived.append(TEMPORAL_EMBEDDING_KEY)
    if "lm_head.weight" in missing and config.tie_word_embeddings:
        missing.remove("lm_head.weight")
    if missing:
        raise ConversionError(f"The source lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}")
    extra = [f"{store.location(key)}:{key} -> {target}" for target, (store, key, _) in plan.sources.items()
             if target not in expected]  # fmt: skip
    if extra:
        raise ConversionError(f"{len(extra)} source tensors have no place in the Florence-VL model, e.g. {extra[:5]}")
    check_stored_dtypes(source, plan, {k: v.dtype for k, v in model_state.items()}, log)

    duplicates: dict[str, list[tuple[TensorStore, str, bool]]] = {}
    for target, store, key, transpose in plan.duplicates:
        duplicates.setdefault(target, []).append((store, key, transpose))
    state, changed_by_cast = {}, 0
    for target, (store, key, transpose) in plan.sources.items():
        tensor = _load(store, key, transpose)
        _check_finite(tensor, f"{store.location(key)}:{key}")
        for other_store, other_key, other_transpose in duplicates.get(target, []):
            _check_same(tensor, store, key, _load(other_store, other_key, other_transpose), other_store, other_key, target)
        want = expected[target]
        if tensor.shape != want:
            if target in ("model.language_model.embed_tokens.weight", "lm_head.weight") and (
                tensor.shape[1:] == want[1:] and tensor.shape[0] < want[0]
            ):
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
    if TEMPORAL_EMBEDDING_KEY in derived:
        rows, width = expected[TEMPORAL_EMBEDDING_KEY]
        state[TEMPORAL_EMBEDDING_KEY] = _temporal_embedding(rows, width).to(dtype)
    summary = {
        "source": plan.source_tensors,
        "mapped": len(plan.sources),
        "checked_duplicates": len(plan.duplicates),
        "derived": derived,
        "resized": resized,
        "changed_by_dtype_cast": changed_by_cast,
        "dropped": {why: {"tensors": d["tensors"], "parameters": d["parameters"]} for why, d in plan.dropped.items()},
        "dropped_keys": {why: d["keys"] for why, d in plan.dropped.items()},
    }
    return state, summary


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
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"{output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ConversionError(f"{output_dir} is not empty (use --overwrite to replace it)")
    if len(os.fsencode(output_dir.name)) > NAME_MAX:
        raise ConversionError(f"OUTPUT_DIR's name is {len(os.fsencode(output_dir.name))} bytes; file systems allow {NAME_MAX}")
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
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ConversionError(f"{output_dir} is not empty (use --overwrite to replace it)")
    source_ckpt = open_source(source, revision, token, florence2_config_dir)
    target = output_dir.resolve()
    if target == source_ckpt.folder or target in source_ckpt.folder.parents:
        raise ConversionError(f"OUTPUT_DIR {output_dir} is the source folder or contains it; choose another folder")
    template = source_ckpt.template
    log(f"source {source_ckpt.source_id} ({source_ckpt.config['model_type']}, {template} template) in {source_ckpt.folder}")

    # Staged first: a read-only, full or misnamed OUTPUT_DIR fails before minutes of reading tensors.
    with staged_output(output_dir, overwrite, log) as staging:
        tokenizer, original_vocab = load_tokenizer(source_ckpt)
        prepare_tokenizer(tokenizer)
        plan = plan_tensors(source_ckpt)
        embed_key = "model.language_model.embed_tokens.weight"
        if embed_key not in plan.sources:
            raise ConversionError("The source has no LLM input embedding (model.embed_tokens.weight)")
        store, key, _ = plan.sources[embed_key]
        source_rows = store.shape(key)[0]
        needed = len(tokenizer) + (0 if IMAGE_TOKEN in tokenizer.get_vocab() else 1)
        rows = source_rows if needed <= source_rows else -(-needed // EMBEDDING_ROW_MULTIPLE) * EMBEDDING_ROW_MULTIPLE
        skeleton = build_model(source_ckpt, rows, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        config = skeleton.config
        processor = build_processor(config, tokenizer=tokenizer, template=template)
        processor.image_aspect_ratio = source_ckpt.config.get("image_aspect_ratio", "pad")
        state, tensor_summary = assemble(source_ckpt, plan, skeleton, DTYPES[dtype], log)
        log(f"mapped {tensor_summary['mapped']} tensors; dropped " + ", ".join(
            f"{why} ({d['tensors']} tensors, {d['parameters']:,} parameters)" for why, d in tensor_summary["dropped"].items()))  # fmt: skip

        generation_config = generation_config_for(template)
        if generation_config.pad_token_id is None:
            generation_config.pad_token_id = tokenizer.pad_token_id
        suppressed = list(range(original_vocab, rows))
        if suppressed:
            generation_config.suppress_tokens = suppressed
        report = {
            "converter": {"name": "florence_vl_hf", "version": __version__},
            "source": {
                "id": source_ckpt.source_id,
                "revision": source_ckpt.revision,
                "model_type": source_ckpt.config["model_type"],
                "template": template,
                "florence2_config": source_ckpt.vision_config_from,
                "weight_files": {store.label: sorted(store.files) for store in (source_ckpt.main, source_ckpt.vision) if store},
            },
            "output": {"dtype": dtype, "max_shard_size": str(max_shard_size)},
            "tensors": {k: v for k, v in tensor_summary.items() if k != "dropped_keys"},
            "dropped_keys": tensor_summary["dropped_keys"],
            "vocabulary": {
                "source_embedding_rows": source_rows,
                "original_vocab_size": original_vocab,
                "embedding_rows": rows,
                "image_token_id": processor.image_token_id,
                "suppressed_token_ids": [suppressed[0], suppressed[-1]] if suppressed else [],
            },
            "image_tokens_per_image": config.num_image_tokens,
        }

        skeleton.to(DTYPES[dtype])
        skeleton.generation_config = generation_config
        skeleton.save_pretrained(staging, state_dict=state, max_shard_size=max_shard_size)
        del state
        processor.save_pretrained(staging)
        for name in LICENSE_FILES[template]:
            shutil.copyfile(asset_dir(LLM_ASSETS[template]) / name, staging / name)
        foreign = foreign_auto_map_entries(staging)
        if foreign:  # load_tokenizer drops the source's; this guards every other way one could get in
            raise ConversionError(f"The output would carry auto_map entries the converter did not write: {foreign[:3]}")
        log(f"wrote {sum(1 for _ in staging.iterdir())} files to a staging folder")
        if verify:
            from .verify import verify_conversion

            report["verification"] = verify_conversion(
                source_ckpt, staging, original_vocab, compute_dtype=DTYPES[verify_dtype], stored_dtype=DTYPES[dtype],
                device=verify_device, lossless=tensor_summary["changed_by_dtype_cast"] == 0, log=log,
            )  # fmt: skip
        else:
            report["verification"] = {"passed": False, "skipped": True}
        card = render_model_card(
            report,
            repo_id or output_dir.resolve().name,
            template,
            base_model=source_ckpt.source_id if source_ckpt.revision else None,
        )
        write_text_atomic(staging / "README.md", card)
        write_text_atomic(staging / REPORT_NAME, json.dumps(report, indent=2) + "\n")
    log(f"saved {output_dir}")
    return report
