"""The probe behind "Per-token linear stage-0 heads and position" (docs/florence-vl-tiny-notes.md).

Usage: python stage0_token_heads.py {box,token} STAGE0_STEPS POSITION_STEPS OUT. Stage 0 as in the recipe ("box":
`pretrain_regions`), or with the per-shape heads replaced by linear heads on every token ("token": each token of a
shape's box predicts its colour, type and column, every other token "background"); then, with the tower frozen, the
projector and a random LLM trained on ShapesVQA's position questions alone, and evaluated on the held-out ones.
Needs the recipe's splits in $WORK (default /tmp/tiny-work). A research probe, not part of the package."""
import json, os, sys, collections, torch, torch.nn.functional as F
from pathlib import Path
import PIL.Image
from florence_vl_hf.build import build_random_model
from florence_vl_hf.lab.shapes import SHAPES, WORDS
from florence_vl_hf.training.data import ImageCache
from florence_vl_hf.lab.evaluate import answer
from florence_vl_hf.lab import region_pretraining as rp
from florence_vl_hf.lab.shapes_recipe import (TinyRecipe, _stage, init_position_tables, reinit_davit,
                                                    tiny_shapes_config, zero_davit_mixers)

torch.set_num_threads(int(os.environ.get("NT", 1)))
mode, s0, s2, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
work = Path(os.environ.get("WORK", "/tmp/tiny-work"))
train_dir, test_dir = work / "shapes-train-24000-seed1", work / "shapes-test-300-seed2"
recipe = TinyRecipe()
torch.manual_seed(0)
model, proc = build_random_model(tiny_shapes_config(), seed=0)
reinit_davit(model, 0.1, 0); zero_davit_mixers(model); init_position_tables(model, 3.0)
colors, kinds, grid = len(rp.COLOR_NAMES), len(SHAPES), 8


class TokenHeads(rp.RegionHeads):
    def __init__(self, dim, grid):
        super().__init__(dim, grid)
        self.token = torch.nn.Linear(dim, (colors + 1) + (kinds + 1) + (grid + 1))

    def forward(self, tokens, targets):
        out = super().forward(tokens, targets)
        for name in ("color", "kind", "column"):
            del out[name]
        labels = torch.tensor([[colors, kinds, grid]]).repeat(len(targets) * grid * grid, 1)
        for row, t in enumerate(targets):
            for s in t["shapes"]:
                for token in s["tokens"]:
                    labels[row * grid * grid + token] = torch.tensor([s["color"], s["kind"], s["column"]])
        logits = self.token(tokens.reshape(-1, tokens.shape[-1]))
        parts = logits.split([colors + 1, kinds + 1, grid + 1], dim=-1)
        for i, name in enumerate(("token_color", "token_kind", "token_column")):
            out[name] = (parts[i], labels[:, i])
        return out


if mode == "token":
    rp.RegionHeads = TokenHeads  # pretrain_regions builds its heads from this name
report = rp.pretrain_regions(model, proc, train_dir, s0, eval_dir=test_dir, image_cache=ImageCache(24000))
print("stage 0", report["held_out_accuracy"], round(report["seconds"]), flush=True)
questions = [q for q in json.load(open(train_dir / "instructions.json")) if q["type"] == "position"]
result = _stage(model, proc, questions, train_dir, "finetune", s2, recipe.stage2_lr, recipe, out / "ck",
                ImageCache(24000))
print("position losses", [round(x, 3) for x in result["losses"]], flush=True)
rows = [json.loads(l) for l in open(test_dir / "questions.jsonl") if '"position"' in l]
images = [PIL.Image.open(test_dir / r["image"]).convert("RGB") for r in rows]
model.eval()
predicted = sum((answer(model, proc, images[i:i + 32], [r["question"] for r in rows[i:i + 32]])
                 for i in range(0, len(rows), 32)), [])
counts = collections.Counter((r["answer"], p.strip()) for r, p in zip(rows, predicted))
print("held-out position", sum(v for (a, p), v in counts.items() if a == p) / len(rows), dict(counts), flush=True)
