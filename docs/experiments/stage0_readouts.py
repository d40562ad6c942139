"""The probe behind "With a longer phase A the LLM reads the word" (docs/florence-vl-tiny-notes.md).

Usage: python stage0_readouts.py PHASE_A_STEPS PHASE_B_STEPS (e.g. 4000 1500). Needs a ShapesVQA training split in
$SHAPES_TRAIN (default /tmp/tiny-work/shapes-train-24000-seed1); its first 6000 images are preprocessed once and
cached in $PIXELS (default /tmp/pv6000.pt). A research probe, not part of the package."""
import json, os, sys, time, torch, torch.nn.functional as F
from pathlib import Path
from florence_vl_hf.lab.shapes_recipe import tiny_shapes_config, reinit_davit, zero_davit_mixers, init_position_tables
from florence_vl_hf.build import build_random_model
torch.set_num_threads(int(os.environ.get("NT", 2)))
A, B = int(sys.argv[1]), int(sys.argv[2])
W = Path(os.environ.get("SHAPES_TRAIN", "/tmp/tiny-work/shapes-train-24000-seed1"))
torch.manual_seed(0)
model, proc = build_random_model(tiny_shapes_config(), seed=0)
reinit_davit(model, 0.1, 0); zero_davit_mixers(model); init_position_tables(model, 3.0)
tower = model.model.vision_tower; llm = model.model.language_model
scenes = [json.loads(l)["scene"] for l in open(W / "scenes.jsonl")][:6000]
WORDS = "CAT DOG SUN BOX RED CAR HAT PEN MAP CUP BUS KEY FOX OWL BEE ANT EGG JAR TOY ZIP".split()
label = torch.tensor([0 if s["word"] is None else 1 + WORDS.index(s["word"]) for s in scenes])
cells = torch.zeros(6000, 65)
for i, s in enumerate(scenes):
    if s["text_box"]:
        x0, y0, x1, y1 = s["text_box"]
        for r in range(int(y0 / s["height"] * 8), int((y1 - 1) / s["height"] * 8) + 1):
            for c in range(int(x0 / s["width"] * 8), int((x1 - 1) / s["width"] * 8) + 1):
                cells[i, 1 + r * 8 + c] = 1
pixel_file = Path(os.environ.get("PIXELS", "/tmp/pv6000.pt"))
if not pixel_file.exists():
    from PIL import Image
    images = [Image.open(W / json.loads(line)["image"]).convert("RGB") for line in open(W / "scenes.jsonl")][:6000]
    torch.save(proc.image_processor(images, return_tensors="pt")["pixel_values"], pixel_file)
pixels = torch.load(pixel_file)
train, held = torch.arange(5400), torch.arange(5400, 6000)
order = train[torch.randperm(5400, generator=torch.Generator().manual_seed(0))]
q = torch.nn.Parameter(torch.zeros(4, 64)); phead = torch.nn.Linear(256, 2)
whead = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 20))
opt = torch.optim.AdamW([{"params": tower.backbone.parameters(), "lr": 3e-4},
                         {"params": list(tower.image_projector.parameters()) + [q] + list(phead.parameters()) + list(whead.parameters()), "lr": 1e-3}], weight_decay=0.0)
t0 = time.time(); hist = []
for step in range(1, A + 1):
    idx = order[(step - 1) * 16 % 5400:][:16]
    x = tower.image_projector(tower.backbone(pixels[idx]).last_hidden_state)
    a = (x @ q.T / 8).softmax(1)
    pl = phead(torch.einsum("btq,btd->bqd", a, x).flatten(1))
    y = label[idx]; loss = F.cross_entropy(pl, (y > 0).long())
    m = y > 0
    if m.any():
        c = cells[idx][m]; boxmean = (c[..., None] * x[m]).sum(1) / c.sum(1, keepdim=True)
        loss = loss + F.cross_entropy(whead(boxmean), y[m] - 1)
    opt.zero_grad(); loss.backward(); opt.step(); hist.append(loss.item())
    if step % 100 == 0:
        with torch.no_grad():
            x = tower.image_projector(tower.backbone(pixels[held]).last_hidden_state)
            a = (x @ q.T / 8).softmax(1); pp = phead(torch.einsum("btq,btd->bqd", a, x).flatten(1)).argmax(-1)
            y = label[held]; m = y > 0; c = cells[held][m]
            wp = whead((c[..., None] * x[m]).sum(1) / c.sum(1, keepdim=True)).argmax(-1)
        print(f"A {step} loss {sum(hist[-100:])/100:.3f} held presence {(pp == m.long()).float().mean():.2f} word@box {(wp == y[m] - 1).float().mean():.2f} {time.time()-t0:.0f}s", flush=True)
for p in tower.parameters(): p.requires_grad_(False)
head = torch.nn.Linear(128, 21)
rest = list(model.model.multi_modal_projector.parameters()) + list(llm.parameters()) + list(head.parameters())
opt = torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.0)
text_ids = torch.tensor(proc.tokenizer(" 2 shapes: a red circle. The text says", add_special_tokens=False)["input_ids"])
prompts = torch.tensor(proc.task_prompt_ids)
def readout(idx):
    f = model.model.get_image_features(pixels[idx], prompts.expand(len(idx), -1, -1)).pooler_output
    h = llm(inputs_embeds=torch.cat([f, llm.embed_tokens(text_ids).expand(len(idx), -1, -1)], 1)).last_hidden_state[:, -1]
    return head(h)
hist = []
for step in range(1, B + 1):
    idx = order[(step - 1) * 16 % 5400:][:16]
    loss = F.cross_entropy(readout(idx), label[idx]); opt.zero_grad(); loss.backward(); opt.step(); hist.append(loss.item())
    if step % 100 == 0:
        with torch.no_grad():
            pred = torch.cat([readout(held[i:i + 100]).argmax(-1) for i in range(0, 600, 100)])
        y = label[held]; m = y > 0
        print(f"B {step} loss {sum(hist[-100:])/100:.3f} held presence {((pred > 0) == m).float().mean():.2f} word {(pred[m] == y[m]).float().mean():.2f} {time.time()-t0:.0f}s", flush=True)
