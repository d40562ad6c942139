"""The probes behind "Position: the further-left question" (docs/florence-vl-tiny-notes.md).

Usage: TYPES=position,further python position_probe_questions.py MODEL LAYERS HEADS STEPS OUT. Takes the vision tower
of a trained florence-vl-tiny (MODEL, a saved folder), freezes it, and trains the projector and a random Phi-3 LLM of
LAYERS layers and HEADS heads (width 128) on the chosen question types only, then scores them on the held-out split.
Types: ShapesVQA's (count, color, shape, text, position) and probe questions built here from scenes.jsonl, each for
a shape whose (colour, type) is unique: half ("Is the {c} {s} in the left or right half?", centre >= 0.1 W from the
middle), word / wordrev ("Is the {c} {s} left or right of the word?" and "Is the word left or right of the {c} {s}?",
centres >= 0.15 W apart), other ("Is the {c} {s} left or right of the other shape?", two-shape images), further /
furtherright ("Which is further left/right, the {a} or the {b}?", every position pair). Needs the recipe's splits in
$WORK (default /tmp/tiny-work). A research probe, not part of the package; 1 thread unless NT is set."""
import collections, json, os, random, sys
from pathlib import Path
import PIL.Image, torch
from transformers import AutoModelForImageTextToText
from florence_vl_hf.build import build_random_model
from florence_vl_hf.modeling import FlorenceVLConfig
from florence_vl_hf.lab.shapes import Scene, position_pairs
from florence_vl_hf.training.data import ImageCache
from florence_vl_hf.lab.evaluate import answer
from florence_vl_hf.lab.shapes_recipe import TINY_IMAGE_SIZE, TINY_TEXT, TINY_VISION, TinyRecipe, _stage

torch.set_num_threads(int(os.environ.get("NT", 1)))
source, layers, heads, steps, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
types = os.environ.get("TYPES", "position").split(",")
work = Path(os.environ.get("WORK", "/tmp/tiny-work"))
train_dir, test_dir = work / "shapes-train-24000-seed1", work / "shapes-test-300-seed2"


def probe_questions(folder):
    rng, rows = random.Random(0), []
    for line in open(folder / "scenes.jsonl"):
        row = json.loads(line)
        scene = Scene.from_dict(row["scene"])
        ask = lambda kind, q, a: rows.append({"id": f"{row['id']}_{kind}{len(rows)}", "image": row["image"], "type": kind,
                                              "question": q, "answer": a, "conversations": [
                                                  {"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]})
        counts = collections.Counter((s.color, s.kind) for s in scene.shapes)
        for shape in (s for s in scene.shapes if counts[(s.color, s.kind)] == 1):
            x, name = shape.center[0], f"{shape.color} {shape.kind}"
            if abs(x - scene.width / 2) >= 0.1 * scene.width:
                ask("half", f"Is the {name} in the left or right half?", "left" if x < scene.width / 2 else "right")
            if scene.word is not None:
                word_x = (scene.text_box[0] + scene.text_box[2]) / 2
                if abs(x - word_x) >= 0.15 * scene.width:
                    ask("word", f"Is the {name} left or right of the word?", "left" if x < word_x else "right")
                    ask("wordrev", f"Is the word left or right of the {name}?", "left" if word_x < x else "right")
            if len(scene.shapes) == 2:
                other_x = next(s for s in scene.shapes if s is not shape).center[0]
                if abs(x - other_x) >= 0.15 * scene.width:
                    ask("other", f"Is the {name} left or right of the other shape?", "left" if x < other_x else "right")
        for pair in position_pairs(scene):
            a, b = pair if rng.random() < 0.5 else pair[::-1]
            for side, pick in (("left", min), ("right", max)):
                chosen = pick(pair, key=lambda s: s.center[0])
                ask("further" if side == "left" else "furtherright",
                    f"Which is further {side}, the {a.color} {a.kind} or the {b.color} {b.kind}?",
                    f"the {chosen.color} {chosen.kind}")
    return [r for r in rows if r["type"] in types]


text = dict(TINY_TEXT, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads)
model, processor = build_random_model(FlorenceVLConfig(vision_config=TINY_VISION, text_config=text,
                                                       image_size=TINY_IMAGE_SIZE), seed=0)
trained = AutoModelForImageTextToText.from_pretrained(source).float()
model.model.vision_tower.load_state_dict(trained.model.vision_tower.state_dict())
spec = lambda folder, name: [json.loads(l) for l in open(folder / name) if json.loads(l)["type"] in types]
train_rows = [q for q in json.load(open(train_dir / "instructions.json")) if q["type"] in types]
train_rows += probe_questions(train_dir)
result = _stage(model, processor, train_rows, train_dir, "finetune", steps, TinyRecipe().stage2_lr, TinyRecipe(),
                out / "checkpoints", ImageCache(24000))
print(len(train_rows), "questions; losses", [round(x, 3) for x in result["losses"]], flush=True)
rows = spec(test_dir, "questions.jsonl") + probe_questions(test_dir)
images = [PIL.Image.open(test_dir / r["image"]).convert("RGB") for r in rows]
model.eval()
predicted = sum((answer(model, processor, images[i:i + 32], [r["question"] for r in rows[i:i + 32]])
                 for i in range(0, len(rows), 32)), [])
right = collections.defaultdict(list)
for row, prediction in zip(rows, predicted):
    right[row["type"]].append(prediction.strip() == row["answer"])
print("held-out", {kind: round(sum(v) / len(v), 3) for kind, v in right.items()}, flush=True)
