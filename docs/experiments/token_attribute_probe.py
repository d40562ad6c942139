"""The per-token probe in "Position: the further-left question" (docs/florence-vl-tiny-notes.md): how linearly an
image token inside a shape gives the shape's colour and type, on the LLM's image inputs (`get_image_features`).

Usage: python token_attribute_probe.py WEIGHTS.safetensors (a florence-vl-tiny state dict, e.g. a recipe run's
stage1.safetensors). Takes the tokens of the inner half of each shape's box, from the first 1500 training scenes and
the 300 held-out ones in $WORK (default /tmp/tiny-work); fits a linear classifier on the former (Adam, 500 full-batch
steps) and scores it on the latter. A research probe, not part of the package."""
import os
import sys
import json, torch, PIL.Image
torch.set_num_threads(1)
from pathlib import Path
from safetensors.torch import load_model
from florence_vl_hf.build import build_random_model
from florence_vl_hf.lab.shapes_recipe import tiny_shapes_config
from florence_vl_hf.lab.region_pretraining import box_tokens
from florence_vl_hf.lab.shapes import SHAPES, COLORS
model, proc = build_random_model(tiny_shapes_config(), seed=0)
load_model(model, sys.argv[1]); model.eval()
def feats(folder, n):
    X, K, C = [], [], []
    rows = [json.loads(l) for l in open(folder / "scenes.jsonl")][:n]
    for i in range(0, len(rows), 50):
        batch = rows[i:i+50]
        ims = [PIL.Image.open(folder / r["image"]).convert("RGB") for r in batch]
        pv = proc.image_processor(ims, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            f = model.model.get_image_features(pixel_values=pv)
        f = f if torch.is_tensor(f) else f[0] if isinstance(f, (list, tuple)) else f.pooler_output
        f = f.reshape(len(batch), -1, f.shape[-1])[:, 1:]
        for r, fe in zip(batch, f):
            s = r["scene"]
            for sh in s["shapes"]:
                x0, y0, x1, y1 = sh["box"]; m = (x1 - x0) // 4  # inner half of the box only
                for t in box_tokens((x0 + m, y0 + m, x1 - m, y1 - m), s["width"], s["height"], 8, True):
                    X.append(fe[t]); K.append(SHAPES.index(sh["kind"])); C.append(list(COLORS).index(sh["color"]))
    return torch.stack(X).float(), torch.tensor(K), torch.tensor(C)
work = Path(os.environ.get("WORK", "/tmp/tiny-work"))
tr, te = feats(work / "shapes-train-24000-seed1", 1500), feats(work / "shapes-test-300-seed2", 300)
print("tokens", len(tr[0]), len(te[0]), "dim", tr[0].shape[1], flush=True)
mu, sd = tr[0].mean(0), tr[0].std(0) + 1e-6
for name, j, n in (("kind", 1, 3), ("colour", 2, 6)):
    lin = torch.nn.Linear(tr[0].shape[1], n); opt = torch.optim.Adam(lin.parameters(), 1e-2)
    for step in range(500):
        opt.zero_grad(); loss = torch.nn.functional.cross_entropy(lin((tr[0] - mu) / sd), tr[j]); loss.backward(); opt.step()
    acc = (lin((te[0] - mu) / sd).argmax(-1) == te[j]).float().mean().item()
    print(name, "linear per-token held out", round(acc, 3), "train loss", round(loss.item(), 3), flush=True)
