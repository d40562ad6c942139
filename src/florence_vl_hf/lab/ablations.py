"""The paper's fusion and feature ablations in miniature: florence-vl-tiny variants trained by the same recipe."""

import json
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from ..files import write_text_atomic
from .shapes import QUESTION_TYPES
from .shapes_recipe import TinyRecipe, record_recipe, train_tiny

# name -> (fusion, vision_feature_sources); None keeps all four features (depth + the three task prompts).
VARIANTS = {
    "channel (all)": ("channel", None),
    "token (all)": ("token", None),
    "average (all)": ("average", None),
    "depth only": ("channel", ["depth"]),
    "breadth only": ("channel", ["caption", "ocr", "grounding"]),
}
_VARIANT_FIELDS = ("fusion", "vision_feature_sources")


# The sweep's default: florence-vl-tiny's recipe with shorter stages 1 and 2 (15 trainings on a CPU). Stage 0 trains
# only the vision tower, which every variant shares, so it runs once per seed and every variant starts from its tower,
# as the paper's variants all start from one pre-trained Florence-2.
ABLATION_STEPS = {"stage1_steps": 1000, "stage2_steps": 1500}


def run_ablations(output_dir, seeds=(0, 1, 2), variants=None, recipe: TinyRecipe | None = None, log=print) -> dict:
    """Train every variant with every seed (same data, steps and learning rates; one stage 0 per seed), evaluate
    each on the same held-out split, and write `ablations.json` and `ablations.md` (mean accuracy per question type
    over the finished runs, rewritten after each) to `output_dir`. Seeds are the outer loop, so a partial sweep has
    every variant. Finished runs are kept in `runs.jsonl`, so an interrupted sweep resumes where it stopped."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    recipe = recipe or TinyRecipe(**ABLATION_STEPS)
    names = list(variants or VARIANTS)
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise ValueError(f"Unknown variants {unknown}; choose from {list(VARIANTS)}")
    shared = {k: v for k, v in asdict(recipe).items() if k not in ("seed", *_VARIANT_FIELDS)}
    recipe_path = output_dir / "recipe.json"
    if record_recipe(recipe_path, shared):
        raise ValueError(f"{output_dir} holds a sweep of another recipe ({recipe_path}); use another output_dir")
    runs_path = output_dir / "runs.jsonl"
    done = _finished_runs(runs_path)
    for seed in seeds:
        for name in names:
            if (name, seed) in done:
                continue
            log(f"training {name!r} seed {seed}")
            run = _train_variant(output_dir, recipe, name, seed)
            with runs_path.open("a") as handle:
                handle.write(json.dumps(run) + "\n")
            done[(name, seed)] = run
            _write_tables(output_dir, done, names, seeds, recipe)
    return _write_tables(output_dir, done, names, seeds, recipe)


def _finished_runs(runs_path: Path) -> dict:
    """The runs recorded in `runs_path` (runs.jsonl) by (variant, seed)."""
    done = {}
    if runs_path.is_file():
        for line in runs_path.read_text().splitlines():
            run = json.loads(line)
            done[(run["variant"], run["seed"])] = run
    return done


def _train_variant(output_dir: Path, recipe: TinyRecipe, name: str, seed: int) -> dict:
    """Train and evaluate the variant `name` with `seed`, from the seed's cached stage 0; runs.jsonl's record of it."""
    fusion, sources = VARIANTS[name]
    variant = replace(recipe, seed=seed, fusion=fusion, vision_feature_sources=sources)
    with tempfile.TemporaryDirectory(dir=output_dir) as scratch:
        report = train_tiny(Path(scratch) / "model", output_dir / "data", variant, save=False,
                            stage0_cache=output_dir / f"stage0-seed{seed}")  # fmt: skip
    return {"variant": name, "seed": seed, "image_tokens": report["num_image_tokens"],
            "accuracy": report["evaluation"]["accuracy"],
            "per_type": {k: v["accuracy"] for k, v in report["evaluation"]["per_type"].items()},
            "seconds": report["stage1"]["seconds"] + report["stage2"]["seconds"]}  # fmt: skip


def _write_tables(output_dir, done, names, seeds, recipe) -> dict:
    table = summarize([done[(name, seed)] for name in names for seed in seeds if (name, seed) in done], recipe)
    write_text_atomic(output_dir / "ablations.json", json.dumps(table, indent=2) + "\n")
    write_text_atomic(output_dir / "ablations.md", format_table(table) + "\n")
    return table


def summarize(runs: list, recipe: TinyRecipe) -> dict:
    rows = {}
    for run in runs:
        row = rows.setdefault(run["variant"], {"variant": run["variant"], "image_tokens": run["image_tokens"],
                                               "seeds": [], "runs": []})  # fmt: skip
        row["seeds"].append(run["seed"])
        row["runs"].append(run)
    for row in rows.values():
        n = len(row["runs"])
        row["accuracy"] = sum(r["accuracy"] for r in row["runs"]) / n
        row["per_type"] = {t: sum(r["per_type"][t] for r in row["runs"]) / n for t in QUESTION_TYPES}
        row["accuracy_range"] = [min(r["accuracy"] for r in row["runs"]), max(r["accuracy"] for r in row["runs"])]
    return {"recipe": {k: v for k, v in vars(recipe).items() if k not in _VARIANT_FIELDS},
            "rows": list(rows.values())}  # fmt: skip


def format_table(table: dict) -> str:
    header = ["variant", "image tokens", "seeds", *QUESTION_TYPES, "overall (min-max)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["rows"]:
        low, high = row["accuracy_range"]
        cells = [row["variant"], str(row["image_tokens"]), str(len(row["seeds"]))]
        cells += [f"{row['per_type'][t]:.1%}" for t in QUESTION_TYPES]
        cells.append(f"{row['accuracy']:.1%} ({low:.1%}-{high:.1%})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
