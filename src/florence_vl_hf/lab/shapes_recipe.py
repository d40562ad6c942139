"""florence-vl-tiny: a small Florence-VL trained from scratch on ShapesVQA by the two-stage recipe, on a CPU.

`train_tiny(output_dir)` generates the data, builds the model from `tiny_shapes_config()`, runs stage 1 (everything
trainable, "plain" captions) and stage 2 (Florence-2 frozen, phi3 instructions), evaluates on freshly generated
held-out images and saves the model in bf16 with its evaluation report. Everything follows from `TinyRecipe`
(seeds included), so the same recipe on the same software and thread count reproduces the same weights.
"""

import json
import logging
import os
import platform
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from ..build import build_random_model, save_hub_folder
from ..families import family
from ..files import replace_dir, sibling_prefix, write_text_atomic
from ..modeling import FlorenceVLConfig
from .shapes import Scene, make_shapes_data, position_pairs
from ..training.api import train, training_arguments
from ..training.data import ImageCache, load_conversations
from .evaluate import evaluate_shapes
from .region_pretraining import pretrain_regions

logger = logging.getLogger(__name__)

# DaViT in three stages (strides 4, 2, 2: an 8x8 grid at 128 px, 65 image tokens with the average token), a
# 2-layer BART encoder, and a 4-layer Phi-3 with tied embeddings over the real Phi-3.5 vocabulary.
TINY_VISION = {
    "vision_config": {
        "embed_dim": [32, 64, 128],
        "depths": [1, 1, 1],
        "num_heads": [2, 4, 8],
        "num_groups": [2, 4, 8],
        "patch_size": [7, 3, 3],
        "patch_stride": [4, 2, 2],
        "patch_padding": [3, 1, 1],
        "patch_prenorm": [False, True, True],
        "window_size": 4,
        "projection_dim": 64,
        "drop_path_rate": 0.0,
    },
    "text_config": {
        "model_type": "bart",
        "vocab_size": 51289,
        "d_model": 64,
        "encoder_layers": 2,
        "encoder_attention_heads": 4,
        "encoder_ffn_dim": 256,
        "decoder_layers": 1,
        "decoder_attention_heads": 4,
        "decoder_ffn_dim": 64,
        "max_position_embeddings": 256,
        "dropout": 0.0,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
    },
}
TINY_FAMILY = family("phi3")
TINY_TEXT = {
    "model_type": TINY_FAMILY.model_type,
    "vocab_size": TINY_FAMILY.checkpoint_vocab_size,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "pad_token_id": TINY_FAMILY.pad_token_id,
    "bos_token_id": TINY_FAMILY.bos_token_id,
    "eos_token_id": TINY_FAMILY.eos_token_id,
    "tie_word_embeddings": True,
}
TINY_IMAGE_SIZE = 128


def tiny_shapes_config(fusion: str = "channel", vision_feature_sources=None) -> FlorenceVLConfig:
    """The florence-vl-tiny architecture; `fusion` and `vision_feature_sources` select the ablation variants."""
    return FlorenceVLConfig(
        vision_config=TINY_VISION,
        text_config=TINY_TEXT,
        image_token_id=TINY_FAMILY.image_token_id,
        image_size=TINY_IMAGE_SIZE,
        fusion=fusion,
        vision_feature_sources=vision_feature_sources,
    )


@dataclass
class TinyRecipe:
    """Data sizes, steps and learning rates of the florence-vl-tiny recipe (cosine schedule, 3% warm-up)."""

    seed: int = 0
    train_images: int = 24000
    test_images: int = 300
    data_seed: int = 1
    test_seed: int = 2
    batch_size: int = 16
    # Stage 0, region-level pre-training of the vision tower with heads that are then discarded
    # (`region_pretraining`): a miniature of Florence-2's own pre-training, which Florence-VL starts from. Without it
    # the tower, trained only through the LLM, never learns to read the word (docs/florence-vl-tiny-notes.md).
    stage0_steps: int = 4000
    stage0_vision_lr: float = 3e-4
    stage0_lr: float = 1e-3
    stage1_steps: int = 6000
    # With the position repeats below, 15 000 steps left the colour lookup at 81% held out; 20 000 reach 99.7%
    # (docs/florence-vl-tiny-notes.md).
    stage2_steps: int = 20000
    stage1_lr: float = 1e-3
    # From scratch, a vision tower trained from the first step keeps the random LLM from learning to read it:
    # count and colour losses stay at the prior through step 1200, while with the tower frozen they leave it by step
    # 400 (docs/florence-vl-tiny-notes.md). So the tower starts later, at a lower rate: after stage 0 a low one, the
    # paper's stage-1 rate for Phi-3.5, so that the LLM's gradient refines the region features rather than washes
    # them out.
    stage1_vision_lr: float | None = 1e-4
    stage1_vision_start_step: int = 500
    stage2_lr: float = 1e-3
    # Add "Which is further left, the {a} or the {b}?" for every position pair (`further_left_questions`) to stage 2.
    # The position question is an XOR of the naming order and the two x: neither alone says anything about the answer,
    # and from a random or a trained LLM it stays at chance. The further-left question needs no naming order, is
    # learnt, and then position is learnt too (docs/florence-vl-tiny-notes.md, "Position: the further-left question").
    stage2_further_left: bool = True
    # Copies of each position and further-left question in stage 2. Once each they are 27% of its data, and position
    # keeps one answer through 15 000 steps; three times (53%) it leaves chance, as in the probe where the two were
    # the whole mix (docs/florence-vl-tiny-notes.md).
    stage2_position_repeats: int = 3
    # DaViT's own init (N(0, 0.02) for every conv and linear) suits pre-training at scale; from scratch its
    # near-identity residual blocks learn slowly. With N(0, 0.1) a DaViT probe supervised on counts leaves the prior
    # in ~150 steps instead of ~600; end to end the gain is small so far (docs/florence-vl-tiny-notes.md).
    # None: DaViT's own init.
    vision_init_std: float | None = 0.1
    # Start the DaViT's spatial mixers (window and channel attention outputs, depthwise convs) as identities: with them
    # trained from a random init the DaViT does not learn to read words, held or started at zero it does, at a vision
    # rate of 3e-4 (docs/florence-vl-tiny-notes.md).
    vision_zero_mixers: bool = True
    # Florence-2's 2-D position embeddings start at N(0, 0.02), against DaViT features that vary by ~1 between images
    # at each position, and stay there: the LLM gets no x and position stays at chance (docs/florence-vl-tiny-notes.md).
    # A scale: start the row and column embeddings as sin-cos tables of that amplitude instead. None: N(0, 0.02).
    vision_position_init_scale: float | None = 3.0
    fusion: str = "channel"
    vision_feature_sources: list | None = None
    extra: dict = field(default_factory=dict)


def reinit_davit(model, std: float, seed: int) -> None:
    """Draw every conv and linear weight of the DaViT backbone from N(0, std) (biases and norms unchanged)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.model.vision_tower.backbone.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)


def zero_davit_mixers(model) -> None:
    """Zero the weights and biases of the DaViT's window and channel attention output projections and depthwise
    convs, so that every block starts as its MLP branch alone (x + MLP(LayerNorm(x)))."""
    with torch.no_grad():
        for name, module in model.model.vision_tower.backbone.named_modules():
            attention_output = name.endswith(("window_attn.proj", "channel_attn.proj"))
            depthwise = isinstance(module, torch.nn.Conv2d) and module.groups > 1
            if attention_output or depthwise:
                for parameter in module.parameters():
                    parameter.zero_()


def init_position_tables(model, scale: float) -> None:
    """Set the DaViT's learned row and column embeddings to sin-cos tables times `scale`: position p, frequency
    100^(-k/K) for k < K = ceil(width / 2), sines then cosines, cut to the embedding width."""
    position_embed = model.model.vision_tower.image_projector.image_position_embed
    with torch.no_grad():
        for embedding in (position_embed.row_embeddings, position_embed.column_embeddings):
            count, width = embedding.weight.shape
            half = (width + 1) // 2
            frequencies = 100.0 ** (-torch.arange(half, dtype=torch.float64) / half)
            angles = torch.arange(count, dtype=torch.float64)[:, None] * frequencies
            table = torch.cat([angles.sin(), angles.cos()], dim=1)[:, :width] * scale
            embedding.weight.copy_(table.to(embedding.weight.dtype))


def make_train_test_splits(work_dir, recipe: TinyRecipe) -> tuple[Path, Path]:
    """The training split and the held-out split (a different generator seed) under `work_dir`, made once."""
    work_dir = Path(work_dir)
    splits = []
    for name, count, seed in (("train", recipe.train_images, recipe.data_seed), ("test", recipe.test_images,
                                                                                  recipe.test_seed)):  # fmt: skip
        folder = work_dir / f"shapes-{name}-{count}-seed{seed}"
        if not (folder / "meta.json").is_file():
            make_shapes_data(folder, count, seed=seed, split_name=name, overwrite=True)
        splits.append(folder)
    return splits[0], splits[1]


def further_left_questions(data_dir, seed: int) -> list[dict]:
    """Stage-2 instructions beyond ShapesVQA: "Which is further left, the {a} or the {b}?", answered "the {color}
    {shape}", for every pair a position question is asked about, the pair named in an order drawn from `seed`.
    LLaVA-format entries built from `data_dir`'s scenes.jsonl."""
    rng = random.Random(seed)
    entries = []
    with open(Path(data_dir) / "scenes.jsonl") as lines:
        for line in lines:
            row = json.loads(line)
            for k, pair in enumerate(position_pairs(Scene.from_dict(row["scene"]))):
                leftmost = min(pair, key=lambda shape: shape.center[0])
                a, b = pair if rng.random() < 0.5 else pair[::-1]
                question = f"Which is further left, the {a.color} {a.kind} or the {b.color} {b.kind}?"
                entries.append({
                    "id": f"{row['id']}_further_left_{k}",
                    "image": row["image"],
                    "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                      {"from": "gpt", "value": f"the {leftmost.color} {leftmost.kind}"}],
                })  # fmt: skip
    return entries


def stage2_data(train_dir, recipe: TinyRecipe) -> list[dict]:
    """Stage 2's instructions: ShapesVQA's, and the further-left questions unless the recipe turns them off; the
    position and further-left questions `recipe.stage2_position_repeats` times each."""
    extra = further_left_questions(train_dir, recipe.seed) if recipe.stage2_further_left else []
    instructions = load_conversations(Path(train_dir) / "instructions.json")
    position = [entry for entry in instructions if entry.get("type") == "position"] + extra
    return instructions + extra + position * (recipe.stage2_position_repeats - 1)


def _stage(model, processor, data, folder, stage, steps, lr, recipe, checkpoints, image_cache, vision_lr=None,
           vision_start=0, checkpoint_steps=None, callbacks=None):
    saving = {"save_strategy": "steps", "save_steps": checkpoint_steps, "save_total_limit": 1} if checkpoint_steps \
        else {"save_strategy": "no"}  # fmt: skip
    args = training_arguments(
        checkpoints,
        stage,
        TINY_FAMILY.name,
        global_batch_size=recipe.batch_size,
        per_device_train_batch_size=recipe.batch_size,
        max_steps=steps,
        learning_rate=lr,
        logging_steps=max(1, steps // 50),
        disable_tqdm=True,
        seed=recipe.seed,
        data_seed=recipe.seed,
        **saving,
    )
    resume = checkpoint_steps is not None and any(Path(checkpoints).glob("checkpoint-*"))
    started = time.perf_counter()
    result = train(model, processor, data, stage=stage, args=args, image_folder=folder, save=False,
                   cache_images=image_cache, vision_tower_lr=vision_lr, vision_tower_start_step=vision_start,
                   resume_from_checkpoint=True if resume else None, callbacks=callbacks)  # fmt: skip
    losses = [entry["loss"] for entry in result.trainer.state.log_history if "loss" in entry]
    return {"seconds": time.perf_counter() - started, "losses": losses, "skipped": result.skipped, "resumed": resume}


def record_recipe(path: Path, fields: dict) -> list[str]:
    """Write a recipe's `fields` to `path` (its folder's recipe.json) if there is none yet. Returns the fields in
    which a recipe found there differs: none when it is the same recipe, so the folder's contents are this recipe's."""
    wanted = json.loads(json.dumps(fields))
    if not path.is_file():
        write_text_atomic(path, json.dumps(wanted, indent=1) + "\n")
        return []
    found = json.loads(path.read_text())
    if found == wanted:
        return []
    return sorted(key for key in set(found) | set(wanted)
                  if key not in found or key not in wanted or found[key] != wanted[key])  # fmt: skip


def _save_weights(module: torch.nn.Module, path: Path) -> None:
    temporary = f"{path}.partial"
    save_model(module, temporary)
    os.replace(temporary, path)


class _ResumableRun:
    """The checkpoints of an interruptible `train_tiny` in `work_dir/train-tiny-run`: Trainer checkpoints per stage,
    and each finished stage's weights and report, for one recipe."""

    def __init__(self, work_dir: Path, recipe: TinyRecipe):
        self.folder = work_dir / "train-tiny-run"
        self.folder.mkdir(parents=True, exist_ok=True)
        changed = record_recipe(self.folder / "recipe.json", asdict(recipe))
        if changed:
            raise ValueError(f"{self.folder} holds a run of another recipe (differs in {', '.join(changed)}); "
                             "use another work_dir or delete that folder")  # fmt: skip

    def checkpoint_dir(self, stage: str) -> Path:
        return self.folder / f"checkpoints-{stage}"

    def load_finished(self, stage: str, model) -> dict | None:
        """The report of `stage` if it finished in an earlier call, its weights then loaded into `model`."""
        report = self.folder / f"{stage}.json"
        if not report.is_file():
            return None
        load_model(model, self.folder / f"{stage}.safetensors")
        return json.loads(report.read_text())

    def save_finished(self, stage: str, model, report: dict) -> None:
        _save_weights(model, self.folder / f"{stage}.safetensors")
        write_text_atomic(self.folder / f"{stage}.json", json.dumps(report))
        shutil.rmtree(self.checkpoint_dir(stage), ignore_errors=True)


def _load_or_train(run: _ResumableRun | None, stage: str, model, train_stage) -> dict:
    """`stage`'s report: from `run` if it finished there before, else from `train_stage()`, then saved in `run`."""
    if run is not None and (finished := run.load_finished(stage, model)) is not None:
        return finished
    report = train_stage()
    if run is not None:
        run.save_finished(stage, model, report)
    return report


# The recipe fields stage 0 depends on: a stage-0 tower cached under these can start any fusion or feature variant.
STAGE0_FIELDS = ("seed", "train_images", "test_images", "data_seed", "test_seed", "batch_size", "stage0_steps",
                 "stage0_vision_lr", "stage0_lr", "vision_init_std", "vision_zero_mixers",
                 "vision_position_init_scale")  # fmt: skip


def _run_or_load_stage0(model, processor, recipe, train_dir, test_dir, image_cache, cache) -> dict:
    """Stage 0, or its vision tower and report from `cache` (a folder) when an earlier call left them there."""
    tower = model.model.vision_tower
    fields = {key: getattr(recipe, key) for key in STAGE0_FIELDS}
    if cache is not None and (Path(cache) / "stage0.json").is_file():
        cached = json.loads((Path(cache) / "stage0.json").read_text())
        if cached["recipe"] != json.loads(json.dumps(fields)):
            raise ValueError(f"{cache} holds the stage 0 of another recipe: {cached['recipe']}")
        load_model(tower, Path(cache) / "stage0.safetensors")
        return cached["report"]
    report = pretrain_regions(model, processor, train_dir, recipe.stage0_steps, recipe.batch_size,
                              recipe.stage0_vision_lr, recipe.stage0_lr, recipe.seed, image_cache, eval_dir=test_dir)
    if cache is not None:
        Path(cache).mkdir(parents=True, exist_ok=True)
        _save_weights(tower, Path(cache) / "stage0.safetensors")
        write_text_atomic(Path(cache) / "stage0.json", json.dumps({"recipe": fields, "report": report}))
    return report


def _hardware_description() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []  # fmt: skip
    return f"{names[0] if names else platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def _train_stages(model, processor, recipe, train_dir, test_dir, staging, run, checkpoint_steps, callbacks,
                  stage0_cache) -> dict:
    report = {"recipe": asdict(recipe), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "hardware": _hardware_description()}
    image_cache = ImageCache(recipe.train_images)  # 4.7 GB at the default 24 000 images of 128 px
    if recipe.stage0_steps:
        report["stage0"] = _load_or_train(run, "stage0", model, partial(
            _run_or_load_stage0, model, processor, recipe, train_dir, test_dir, image_cache, stage0_cache))
    stages = (
        ("stage1", train_dir / "captions.json", "pretrain", recipe.stage1_steps, recipe.stage1_lr,
         recipe.stage1_vision_lr, recipe.stage1_vision_start_step),
        ("stage2", stage2_data(train_dir, recipe), "finetune", recipe.stage2_steps, recipe.stage2_lr, None, 0),
    )  # fmt: skip
    for name, data, stage, steps, lr, vision_lr, vision_start in stages:
        checkpoints = run.checkpoint_dir(name) if run is not None else staging / f"checkpoints-{stage}"
        report[name] = _load_or_train(run, name, model, partial(
            _stage, model, processor, data, train_dir, stage, steps, lr, recipe, checkpoints, image_cache, vision_lr,
            vision_start, checkpoint_steps, callbacks))
    return report


def train_tiny(
    output_dir,
    work_dir=None,
    recipe: TinyRecipe | None = None,
    overwrite: bool = False,
    save: bool = True,
    checkpoint_steps: int | None = None,
    callbacks=None,
    stage0_cache=None,
) -> dict:
    """Run the recipe and save the bf16 model, its processor and `training_report.json` to `output_dir`
    (`save=False`: only return the report).

    `checkpoint_steps`: save a Trainer checkpoint every this many steps under `work_dir/train-tiny-run`, and each
    finished stage's weights; calling again with the same `work_dir` and recipe resumes where the last call
    stopped, to the same weights as an uninterrupted run. The run folder is removed once the model is saved.
    `callbacks`: TrainerCallbacks for both stages.
    `stage0_cache`: a folder for the vision tower after stage 0. If an earlier call left it there (for the same
    `STAGE0_FIELDS` of the recipe), stage 0 is not run again: fusion and feature variants start from one tower.
    """
    recipe = recipe or TinyRecipe()
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} is not empty")
    if checkpoint_steps is not None and (checkpoint_steps < 1 or work_dir is None):
        raise ValueError(f"checkpoint_steps must be >= 1 and needs a work_dir to resume from, got {checkpoint_steps} "
                         f"and work_dir={work_dir}")  # fmt: skip
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="florence-vl-tiny-"))
    train_dir, test_dir = make_train_test_splits(work_dir, recipe)
    model, processor = _initial_model(recipe)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=sibling_prefix(output_dir, "staging"), dir=output_dir.parent))
    run = _ResumableRun(work_dir, recipe) if checkpoint_steps else None
    try:
        report = _train_stages(model, processor, recipe, train_dir, test_dir, staging, run, checkpoint_steps,
                               callbacks, stage0_cache)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report["evaluation"] = _evaluate_held_out(model, processor, test_dir, recipe)
    report["num_image_tokens"] = model.config.num_image_tokens
    for folder in staging.glob("checkpoints-*"):
        shutil.rmtree(folder)
    if save:
        _save_bf16_model(model, processor, report, staging, output_dir)
    else:
        shutil.rmtree(staging)
    if run is not None:
        shutil.rmtree(run.folder)
    return report


def _initial_model(recipe: TinyRecipe):
    """The untrained model and its processor, with the recipe's vision-tower inits applied."""
    torch.manual_seed(recipe.seed)
    config = tiny_shapes_config(recipe.fusion, recipe.vision_feature_sources)
    model, processor = build_random_model(config, seed=recipe.seed)
    if recipe.vision_init_std is not None:
        reinit_davit(model, recipe.vision_init_std, recipe.seed)
    if recipe.vision_zero_mixers:
        zero_davit_mixers(model)
    if recipe.vision_position_init_scale is not None:
        init_position_tables(model, recipe.vision_position_init_scale)
    return model, processor


def _evaluate_held_out(model, processor, test_dir, recipe: TinyRecipe) -> dict:
    model.eval()
    started = time.perf_counter()
    evaluation = evaluate_shapes(model, processor, test_dir)
    evaluation["seconds"] = time.perf_counter() - started
    evaluation["data"] = {"images": recipe.test_images, "seed": recipe.test_seed}
    return evaluation


def _save_bf16_model(model, processor, report: dict, staging: Path, output_dir: Path) -> None:
    """The bf16 model, its processor and the report, saved in `staging`, which then replaces `output_dir`."""
    save_hub_folder(model.to(torch.bfloat16), processor, staging)
    (staging / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    replace_dir(staging, output_dir)
