"""Reading checkpoints safely: local folders or Hub repos, safetensors or .bin (weights only), sharded or not; an
original Florence-VL checkpoint opened as a `Source` (its configs, preprocessing, tokenizer and tensor stores).

No code from a source folder is ever imported or executed: configs are read as JSON, `.bin` files only with
`torch.load(weights_only=True)`.
"""

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, Florence2Config

from ..families import FAMILIES, LLMFamily, family_of_llava
from ..modeling import FlorenceVLConfig
from ..processing import IMAGENET_MEAN, IMAGENET_STD, asset_dir
from .errors import ConversionError

SAFETENSORS_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
SAFETENSORS_SINGLE, BIN_SINGLE = "model.safetensors", "pytorch_model.bin"
_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "I8": torch.int8,
    "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}  # fmt: skip
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_FILE = (
    r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|pytorch_model(-\d+-of-\d+)?\.bin|"
    r"pytorch_model\.bin\.index\.json"
)
_TOP_LEVEL_FILE = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer\.json|tokenizer\.model|tokenizer_config\.json|"
    rf"special_tokens_map\.json|added_tokens\.json|{_WEIGHT_FILE})$"
)
_VISION_FILE = re.compile(rf"^vision_tower/(config\.json|preprocessor_config\.json|{_WEIGHT_FILE})$")


def select_source_files(names: list[str]) -> list[str]:
    """The files of a Hub repo a conversion needs: the top-level config, tokenizer and weights (one format:
    safetensors when present), and vision_tower/'s config, preprocessor and weights. Checkpoint subfolders,
    optimizer states, training_args.bin and remote code are left out."""
    chosen = [n for n in names if _TOP_LEVEL_FILE.match(n) or _VISION_FILE.match(n)]
    for folder in ("", "vision_tower/"):
        here = [n for n in chosen if n.startswith(folder) and "/" not in n[len(folder):]]
        if any(n.endswith(".safetensors") for n in here):
            chosen = [n for n in chosen if n not in here or "pytorch_model" not in n]
    return sorted(chosen)


def resolve_source(source, revision: str | None = None, token: str | None = None) -> tuple[Path, str, str | None]:
    """A local folder, or a Hub repo id downloaded with snapshot_download: returns (folder, source id, revision).

    The revision of a Hub source is the commit hash that was downloaded; None for a local folder.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"Source {source} is a file; expected a checkpoint folder or a Hub repo id")
        return path.resolve(), path.resolve().name, None  # a local path is not published, only its name
    if not _REPO_ID.match(str(source)):
        raise ConversionError(f"Source {source!r} is neither an existing folder nor a Hub repo id (owner/name)")
    from huggingface_hub import HfApi, constants, snapshot_download

    try:
        files = None
        if not constants.HF_HUB_OFFLINE:  # offline, snapshot_download answers from the cache
            files = select_source_files(HfApi(token=token).list_repo_files(str(source), revision=revision))
        folder = Path(snapshot_download(str(source), revision=revision, token=token, allow_patterns=files))
    except Exception as error:
        raise ConversionError(f"Could not download {source!r} from the Hub: {type(error).__name__}: {error}") from error
    return folder, str(source), folder.name


def check_regular(path: Path) -> bool:
    """Whether `path` exists as a regular file (after symlinks); a FIFO, device, socket or symlink loop in its place
    is an error rather than something to read (a FIFO would block the converter forever)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise ConversionError(f"{path} is a broken symlink") from None
        return False
    except OSError as error:  # ELOOP, EACCES, ENAMETOOLONG...
        raise ConversionError(f"Cannot read {path}: {error.strerror or error}") from None
    if stat.S_ISDIR(mode):
        return False
    if not stat.S_ISREG(mode):
        raise ConversionError(f"{path} is not a regular file (a FIFO, socket or device); expected a file")
    return True


def read_json(path: Path) -> dict:
    """A JSON object from a file of the source, or a ConversionError naming the file and what is wrong with it."""
    path = Path(path)
    if not check_regular(path):
        raise ConversionError(f"Missing {path}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConversionError(f"Cannot read {path}: {error}") from error
    if not isinstance(value, dict):
        raise ConversionError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def check_source_files(folder: Path):
    """Refuse what a conversion would read from `folder` (and its vision_tower/) before anything reads it: special
    files in place of known files, symlink loops, JSON files that are no object."""
    vision_dir = Path(folder) / "vision_tower"
    if os.path.islink(vision_dir):
        try:
            os.stat(vision_dir)
        except OSError as error:
            raise ConversionError(f"{vision_dir} is a symlink that cannot be followed: {error.strerror or error}") from None
    for sub in ("", "vision_tower"):
        here = Path(folder) / sub
        if not here.is_dir():
            continue
        pattern = _TOP_LEVEL_FILE if not sub else _VISION_FILE
        for entry in sorted(here.iterdir()):
            relative = entry.name if not sub else f"{sub}/{entry.name}"
            if pattern.match(relative) and check_regular(entry) and entry.suffix == ".json":
                read_json(entry)


def confined_name(folder: Path, name, index: Path) -> str:
    """A weight file name from an index: a plain relative path inside the checkpoint folder (no absolute path, no
    `..`), so an index cannot make the converter read files from elsewhere."""
    if not isinstance(name, str) or not name:
        raise ConversionError(f"{index} names the weight file {name!r}; expected a file name")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if PurePosixPath(name).is_absolute() or Path(name).is_absolute() or ".." in parts or not parts:
        raise ConversionError(f"{index} names the weight file {name!r}, outside {folder}; only files inside it are read")
    return name


class TensorStore:
    """Lazy access to the tensors of one checkpoint folder: key -> tensor, from the file that holds it."""

    def __init__(self, folder: Path, label: str):
        self.folder, self.label = Path(folder), label
        self.files: dict[str, list[str]] = {}  # file name -> keys
        self._where: dict[str, str] = {}
        self._open: dict[str, object] = {}
        index = next((name for name in (SAFETENSORS_INDEX, BIN_INDEX) if check_regular(self.folder / name)), None)
        if index is not None:
            weight_map = read_json(self.folder / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{self.folder / index} has no weight_map")
            listed: dict[str, set[str]] = {}
            for key, name in weight_map.items():
                listed.setdefault(confined_name(self.folder, name, self.folder / index), set()).add(key)
            for name, keys in sorted(listed.items()):
                present = set(self._scan(name))
                if keys - present:
                    raise ConversionError(
                        f"{self.folder / index} lists {sorted(keys - present)[:3]} in {name}, which lacks them"
                    )
                if present - keys:
                    raise ConversionError(
                        f"{self.folder / name} holds tensors the index does not list: {sorted(present - keys)[:3]}"
                    )
        else:
            single = [name for name in (SAFETENSORS_SINGLE, BIN_SINGLE) if check_regular(self.folder / name)]
            if not single:
                raise ConversionError(
                    f"No weights in {self.folder}: expected {SAFETENSORS_INDEX}, {BIN_INDEX}, {SAFETENSORS_SINGLE} or "
                    f"{BIN_SINGLE}"
                )
            self._scan(single[0])

    def _scan(self, name: str) -> list[str]:
        path = self.folder / name
        if not check_regular(path):
            raise ConversionError(f"Missing weight file {path}")
        try:
            if name.endswith(".safetensors"):
                handle = safe_open(str(path), framework="pt")
                keys = list(handle.keys())
            else:
                try:
                    handle = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as error:
                    if "mmap" not in str(error):
                        raise
                    handle = torch.load(path, map_location="cpu", weights_only=True)  # legacy, non-zip format
                if not isinstance(handle, dict) or not all(isinstance(v, torch.Tensor) for v in handle.values()):
                    raise ConversionError(f"{path} is not a state dict of tensors")
                keys = list(handle)
        except ConversionError:
            raise
        except Exception as error:
            raise ConversionError(f"Cannot read {path} (truncated or corrupted?): {type(error).__name__}: {error}") from error
        for key in keys:
            if key in self._where:
                raise ConversionError(f"Tensor {key!r} is in both {self._where[key]} and {name} of {self.folder}")
            self._where[key] = name
        self._open[name] = handle
        self.files[name] = keys
        return keys

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def location(self, key: str) -> str:
        return f"{self.label}:{self._where[key]}"

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape without reading its data (safetensors header; .bin files are memory-mapped)."""
        name = self._where[key]
        handle = self._open[name]
        return tuple(handle.get_slice(key).get_shape() if name.endswith(".safetensors") else handle[key].shape)

    def dtype(self, key: str) -> torch.dtype | str:
        """The tensor's stored dtype without reading its data (a safetensors header name torch lacks as a string)."""
        name = self._where[key]
        handle = self._open[name]
        if not name.endswith(".safetensors"):
            return handle[key].dtype
        stored = handle.get_slice(key).get_dtype()
        return _SAFETENSORS_DTYPES.get(stored, stored)

    def get(self, key: str) -> torch.Tensor:
        name = self._where[key]
        handle = self._open[name]
        try:
            return handle.get_tensor(key) if name.endswith(".safetensors") else handle[key]
        except Exception as error:
            raise ConversionError(
                f"Cannot read tensor {key!r} from {self.folder / name} (truncated or corrupted?): {error}"
            ) from error


# ---- configs ----------------------------------------------------------------------------------------------------

def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_sizes(config: dict, where: str, required=(), optional=(), divisible=()):
    """Refuse sizes a model cannot be built from, naming the file and key: `required` keys must be present positive
    integers, `optional` ones positive integers when present, and each (a, b) of `divisible` a multiple a % b == 0."""
    for key in required:
        if key not in config:
            raise ConversionError(f"{where} has no {key!r}")
    for key in (*required, *optional):
        if key in config and not _positive_int(config[key]):
            raise ConversionError(f"{where} has {key}={config[key]!r}; expected a positive integer")
    for a, b in divisible:
        if a in config and b in config and config[a] % config[b]:
            raise ConversionError(f"{where} has {a}={config[a]}, not a multiple of {b}={config[b]}")


def check_stage_lists(config: dict, where: str, keys, element=_positive_int, length: int | None = None) -> int:
    """DaViT's per-stage lists: present, one entry per stage each, valid entries; returns the number of stages."""
    for key in keys:
        value = config.get(key)
        if not isinstance(value, list) or not value:
            raise ConversionError(f"{where} has {key}={value!r}; expected a list with one entry per DaViT stage")
        length = len(value) if length is None else length
        if len(value) != length:
            raise ConversionError(
                f"{where} has {key} with {len(value)} entries; the other per-stage lists have {length}"
            )
        if not all(element(v) for v in value):
            raise ConversionError(f"{where} has {key}={value!r}; expected positive integers")
    return length


_BART_SIZES = (
    "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
    "encoder_ffn_dim", "decoder_ffn_dim", "vocab_size", "max_position_embeddings",
)  # fmt: skip
_BART_DIVISIBLE = (("d_model", "encoder_attention_heads"), ("d_model", "decoder_attention_heads"))
_LLM_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_LLM_DIVISIBLE = (("hidden_size", "num_attention_heads"), ("num_attention_heads", "num_key_value_heads"))


_DAVIT_RENAMES = {"dim_embed": "embed_dim"}
_DAVIT_KEYS = (
    "depths", "num_heads", "num_groups", "patch_size", "patch_stride", "patch_padding", "patch_prenorm",
    "window_size", "projection_dim", "drop_path_rate",
)  # fmt: skip
# What save_pretrained records about the saving run rather than the model: dropped from the configs read.
_SAVE_METADATA = ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype", "auto_map")


def florence2_config(config: dict, where: str = "The Florence-2 config") -> Florence2Config:
    """transformers' Florence2Config from a Florence-2 config.json in Microsoft's remote-code layout (vision_config
    with dim_embed, image_pos_embed, visual_temporal_embedding) or in transformers' native layout. `where` names the
    file in errors."""
    vision, text = config.get("vision_config"), config.get("text_config")
    if not isinstance(vision, dict) or not isinstance(text, dict) or not vision or not text:
        raise ConversionError(f"{where} needs both vision_config and text_config (JSON objects)")
    vision, text = dict(vision), dict(text)
    check_sizes(text, f"{where} text_config", _BART_SIZES, divisible=_BART_DIVISIBLE)
    native = "dim_embed" not in vision
    check_sizes(vision, f"{where} vision_config", ("projection_dim", "window_size"))
    dims = "embed_dim" if native else "dim_embed"
    stages = check_stage_lists(vision, f"{where} vision_config", (dims, "depths", "num_heads", "num_groups"))
    check_stage_lists(vision, f"{where} vision_config", ("patch_size", "patch_stride"), length=stages)
    check_stage_lists(vision, f"{where} vision_config", ("patch_padding",), length=stages,
                      element=lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)  # fmt: skip
    for dim, heads in zip(vision[dims], vision["num_heads"]):
        if dim % heads:
            raise ConversionError(f"{where} vision_config has {dims} {vision[dims]} not divisible by num_heads {vision['num_heads']}")
    if native:
        return Florence2Config.from_dict(config)
    if vision.get("model_type") not in ("davit", "", None):
        raise ConversionError(f"Florence-2 vision_config.model_type {vision['model_type']!r}: only DaViT is supported")
    position = vision.get("image_pos_embed") or {}
    temporal = vision.get("visual_temporal_embedding") or {}
    if not isinstance(position, dict) or not isinstance(temporal, dict) or (
        position.get("type") != "learned_abs_2d" or temporal.get("type") != "COSINE"
    ):
        raise ConversionError(
            f"Unsupported Florence-2 embeddings in {where}: image_pos_embed {position}, visual_temporal_embedding "
            f"{temporal}"
        )
    check_sizes(position, f"{where} vision_config.image_pos_embed", ("max_pos_embeddings",))
    check_sizes(temporal, f"{where} vision_config.visual_temporal_embedding", ("max_temporal_embeddings",))
    check_stage_lists(vision, f"{where} vision_config", ("patch_prenorm",), length=stages,
                      element=lambda v: isinstance(v, bool))  # fmt: skip
    sources = vision.get("image_feature_source", ["spatial_avg_pool", "temporal_avg_pool"])
    if not isinstance(sources, list) or sources != ["spatial_avg_pool", "temporal_avg_pool"]:
        raise ConversionError(f"Unsupported Florence-2 image_feature_source {sources}")
    davit = {_DAVIT_RENAMES.get(k, k): v for k, v in vision.items() if k in _DAVIT_KEYS or k in _DAVIT_RENAMES}
    davit.update(
        max_position_embeddings=position["max_pos_embeddings"],
        max_temporal_embeddings=temporal["max_temporal_embeddings"],
    )
    bart = {k: v for k, v in text.items() if k not in _SAVE_METADATA}
    bart["model_type"] = "bart"
    return Florence2Config(vision_config=davit, text_config=bart)


# Keys the LLaVA fork adds to the LLM's config.json (training and multimodal settings).
LLAVA_CONFIG_KEYS = (
    "mm_vision_tower", "mm_projector_type", "mm_hidden_size", "mm_vision_select_layer", "mm_vision_select_feature",
    "mm_patch_merge_type", "mm_use_im_start_end", "mm_use_im_patch_token", "mm_projector_lr", "image_aspect_ratio",
    "image_grid_pinpoints", "tokenizer_padding_side", "tokenizer_model_max_length", "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter", "tune_entire_model", "tune_vision_model", "unfreeze_mm_vision_tower", "use_mm_proj",
    "vision_tower_lr", "mm_vision_tower_lr",
)  # fmt: skip


def llava_family(config: dict, where: str = "config.json") -> LLMFamily:
    """The LLM family of an original checkpoint, by the LLaVA-fork model_type of its config.json (`where`)."""
    try:
        return family_of_llava(config.get("model_type"))
    except ValueError:
        expected = sorted(f.llava_model_type for f in FAMILIES.values())
        raise ConversionError(
            f"{where} has model_type {config.get('model_type')!r}; expected one of {expected} (an original "
            "Florence-VL checkpoint)"
        ) from None


def text_config_from_llava(config: dict):
    """The LLM's own config (Phi3Config / LlamaConfig) from the LLaVA model's config.json."""
    llm_family = llava_family(config)
    check_sizes(config, "config.json", _LLM_SIZES, ("num_key_value_heads", "max_position_embeddings"), _LLM_DIVISIBLE)
    dropped = {*LLAVA_CONFIG_KEYS, *_SAVE_METADATA, "model_type"}
    keys = {k: v for k, v in config.items() if k not in dropped}
    try:
        return AutoConfig.for_model(llm_family.model_type, **keys)
    except Exception as error:  # e.g. a malformed rope_scaling, refused by transformers' own validation
        raise ConversionError(f"config.json: {type(error).__name__}: {error}") from error


def _is_projector_type(value) -> bool:
    """Whether FlorenceVLConfig accepts `value` as its projector_type."""
    try:
        FlorenceVLConfig(projector_type=str(value))
    except ValueError:
        return False
    return True


def check_llava_settings(config: dict, projection_dim: int):
    """Refuse LLaVA settings the Florence-VL architecture does not have (they would change what the model computes)."""
    # Missing keys take the original loader's defaults (builder.py: mm_use_im_patch_token defaults to True).
    expected = {"mm_patch_merge_type": ("flat", "flat"), "mm_use_im_start_end": (False, False),
                "mm_use_im_patch_token": (False, True)}  # fmt: skip
    for key, (value, default) in expected.items():
        if config.get(key, default) != value:
            raise ConversionError(
                f"config.json has {key}={config.get(key, default)!r}{'' if key in config else ' (its default)'}; "
                f"Florence-VL checkpoints use {value!r}"
            )
    if config.get("image_aspect_ratio", "pad") not in ("pad", "square"):
        raise ConversionError(f"config.json has image_aspect_ratio={config['image_aspect_ratio']!r}; expected 'pad'")
    if not _is_projector_type(config.get("mm_projector_type")):
        raise ConversionError(f"config.json has mm_projector_type={config.get('mm_projector_type')!r}; expected mlpNx_gelu")
    if config.get("mm_hidden_size", projection_dim) != projection_dim:
        raise ConversionError(
            f"config.json has mm_hidden_size={config['mm_hidden_size']}, but the Florence-2 projection_dim is "
            f"{projection_dim}"
        )


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


def read_florence2_folder(folder: Path) -> tuple[Florence2Config, dict]:
    """The Florence-2 config of a Florence-2 folder (either layout) and its preprocessor settings ({} without
    preprocessor_config.json)."""
    folder = Path(folder)
    config = florence2_config(read_json(folder / "config.json"), str(folder / "config.json"))
    preprocessor_path = folder / "preprocessor_config.json"
    return config, read_json(preprocessor_path) if check_regular(preprocessor_path) else {}


# ---- the source checkpoint ------------------------------------------------------------------------------------------

# The Florence-2 whose config and preprocessing a source without vision_tower/config.json gets by default.
FLORENCE2_ASSETS = "florence-2-large"


@dataclass
class Source:
    """An original checkpoint opened for reading: configs as JSON, tensors lazily."""

    folder: Path
    source_id: str
    revision: str | None
    config: dict
    family: LLMFamily
    florence2: Florence2Config
    preprocessor: dict
    main: TensorStore
    vision: TensorStore | None
    vision_config_from: str = "vision_tower/"


def has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in (SAFETENSORS_INDEX, BIN_INDEX, SAFETENSORS_SINGLE, BIN_SINGLE))


def open_source(source, revision: str | None = None, token: str | None = None, florence2_config_dir=None) -> Source:
    """Open an original checkpoint. Without vision_tower/config.json (train.py writes vision_tower/ only when the
    vision tower was trained), the Florence-2 config and preprocessor come from `florence2_config_dir`, by default the
    bundled Florence-2-large files; the tensors' shapes are checked against it."""
    folder, source_id, revision = resolve_source(source, revision, token)
    check_source_files(folder)
    config = read_json(folder / "config.json")
    llm_family = llava_family(config, str(folder / "config.json"))
    vision_dir = folder / "vision_tower"
    if check_regular(vision_dir / "config.json"):
        config_dir, config_from = vision_dir, "vision_tower/"
    elif florence2_config_dir:
        config_dir, config_from = Path(florence2_config_dir), str(florence2_config_dir)
    else:
        config_dir, config_from = asset_dir(FLORENCE2_ASSETS), "bundled Florence-2-large config"
    florence2, preprocessor = read_florence2_folder(config_dir)
    vision = TensorStore(vision_dir, "vision_tower") if has_weights(vision_dir) else None
    return Source(folder, source_id, revision, config, llm_family, florence2, preprocessor, TensorStore(folder, "main"),
                  vision, config_from)  # fmt: skip


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_tokenizer(source: Source):
    """The LLM tokenizer of the source as a fast tokenizer, and its number of tokens: the vocabulary the original
    loader resized the LLM to.

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
    bundled = source.family.asset_dir
    if not (bundled / "tokenizer.model").is_file():
        raise ConversionError(f"{folder} has only tokenizer.model; a {source.family.name} source needs tokenizer.json")
    for name in ("tokenizer.model", "added_tokens.json"):
        ours, theirs = folder / name, bundled / name
        if theirs.is_file() and (not ours.is_file() or _sha256(ours) != _sha256(theirs)):
            if name == "added_tokens.json" and ours.is_file() and read_json(ours) == read_json(theirs):
                continue
            raise ConversionError(
                f"{ours} differs from {source.family.assets}'s {name}: this source's sentencepiece tokenizer is "
                "not the one the converter knows; save it as a fast tokenizer (tokenizer.json) next to it"
            )
    tokenizer = AutoTokenizer.from_pretrained(str(bundled))
    source_settings = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    if "model_max_length" in source_settings:
        tokenizer.model_max_length = source_settings["model_max_length"]
        tokenizer.init_kwargs["model_max_length"] = source_settings["model_max_length"]
    return tokenizer, len(tokenizer)
