"""The vision-language "alignment loss" of Florence-VL (arXiv 2412.04424, section 4, Figures 4 and 5).

The paper measures how well a vision encoder's features align with an LLM without any fine-tuning: for N
image-caption pairs it takes the vision features f^v_n (tokens x d') and the LLM's last-layer hidden states over the
caption f^t_n (tokens x d), applies a trainable projection P: d' -> d to the vision features, average-pools both
over tokens, L2-normalises them along the hidden dimension and trains only P to minimise the cross-entropy of
softmax(F^v F^t^T) (rows: images, columns: captions of the batch) against the identity matching. The loss curve
while P trains is the measurement; Figure 5 compares it for the DBFusion feature sets with one feature removed.

Choices the paper leaves open, made here (each is a parameter):

* P is a linear map with a bias (``torch.nn.Linear``'s default). Because it is affine, average pooling commutes
  with it, so :func:`extract_features` stores only the mean-pooled vision vector of each feature and the
  projection is applied to that vector. An MLP would break this; keep P linear.
* No temperature (``temperature=1``): the logits are the plain dot products of unit vectors, as the paper writes
  the loss. The loss of a batch is the mean over its rows (the paper's sum divided by the batch size), which
  keeps values comparable across batch sizes; with unrelated pairs it sits at log(batch size).
* Batches of 64 pairs drawn without replacement from the N pairs by a seeded ``torch.Generator`` (a new draw each
  step); every feature subset sees the same sequence of batches for a seed.
* AdamW with lr 1e-3 and torch's default weight decay 0.01; 1000 steps (the paper's Figure 4 shows ~6000).
* A feature subset's vision feature is the channel concatenation of its features in the config's order (as
  DBFusion's channel fusion does), so P maps k*D -> d for k features of width D.
* The vision features are those the LLM would receive, before the model's own projector: the depth feature
  (DaViT tokens after Florence-2's image projection) and one breadth feature per task prompt (the BART encoder's
  outputs at the image positions), without the average-image token when the config leaves it out.
* The caption is tokenized as plain text with the tokenizer's default special tokens (Llama-3.1 adds BOS, Phi-3.5
  adds none) and the representation averages the last hidden state over its real tokens.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from ..modeling.configuration_florence_vl import DEFAULT_TASK_PROMPTS, DEPTH_FEATURE
from ..files import sibling_prefix

#: The feature names of a default config: the depth feature, then one breadth feature per task prompt.
FEATURE_NAMES = (DEPTH_FEATURE, *DEFAULT_TASK_PROMPTS)

#: Line colours of :func:`plot_curves`, in the order of the curves (then repeated).
PALETTE = (
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (255, 127, 14),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (23, 190, 207),
    (188, 189, 34),
    (127, 127, 127),
)


def feature_names(config) -> tuple[str, ...]:
    """``("depth", *config.task_prompt_names)``: every feature the vision tower can produce for this config."""
    return (DEPTH_FEATURE, *(config.task_prompt_names or []))


@dataclass
class AlignmentFeatures:
    """Mean-pooled features of N image-caption pairs.

    ``vision[name]`` is ``(N, D)`` (float32, CPU) for each of ``names``; ``text`` is ``(N, d)``: the LLM's last
    hidden state averaged over each caption's tokens.
    """

    names: tuple[str, ...]
    vision: dict[str, torch.Tensor]
    text: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.text.shape[0]

    def concat(self, subset: Sequence[str]) -> torch.Tensor:
        """The channel concatenation ``(N, k*D)`` of the features in ``subset``, in the given order."""
        unknown = [name for name in subset if name not in self.vision]
        if unknown or not subset:
            raise ValueError(f"a subset needs one or more of {list(self.names)}, got {list(subset)}")
        return torch.cat([self.vision[name] for name in subset], dim=-1)


def feature_subsets(names: Sequence[str] = FEATURE_NAMES) -> dict[str, tuple[str, ...]]:
    """The variants of the paper's Figure 5 and Table 4: ``"all"``, ``"remove X"`` for each feature X, and
    ``"depth only"`` (when there is a depth feature and something else). Each maps to its feature names in order."""
    names = tuple(names)
    if not names:
        raise ValueError("feature_subsets needs at least one feature name")
    subsets = {"all": names}
    if len(names) > 1:
        for removed in names:
            subsets[f"remove {removed}"] = tuple(name for name in names if name != removed)
        if DEPTH_FEATURE in names:
            subsets[f"{DEPTH_FEATURE} only"] = (DEPTH_FEATURE,)
    return subsets


def _base_model(model):
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, "language_model") else model


def _open_image(image) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    return image


def extract_features(
    model,
    processor,
    images: Sequence,
    captions: Sequence[str],
    batch_size: int = 16,
    log: Callable[[str], None] | None = None,
) -> AlignmentFeatures:
    """Mean-pooled vision features (every feature of :func:`feature_names`) and caption representations.

    ``images`` are PIL images or paths (opened one batch at a time); ``captions`` are plain strings, one per image.
    The model runs under ``torch.inference_mode`` in its own dtype and on its own device; the pooled results are
    returned as float32 on the CPU.

    Storing one pooled vector per feature is exact for the alignment loss because P is linear (affine):
    mean_t(W x_t + b) = W mean_t(x_t) + b, so projecting then pooling equals pooling then projecting.

    The vision features are the model's own ``get_image_features(..., return_source_features=True)``: every task
    prompt of the config (whatever ``vision_feature_sources`` selects), as fusion would receive them. Captions are
    right-padded within a batch (the tokenizer's ``pad``), so their positions start at 0 and, the LLM being causal,
    the padding cannot reach the real tokens; the mean runs over the real tokens only.
    """
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images and {len(captions)} captions: one caption per image")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    base = _base_model(model)
    names = feature_names(base.config)
    device, dtype = next(model.parameters()).device, model.dtype
    vision = {name: [] for name in names}
    text = []
    was_training = model.training
    model.eval()  # no dropout; the caller's mode is restored below
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                pooled, pooled_text = _pooled_batch(
                    base, processor, images[start : start + batch_size], captions[start : start + batch_size],
                    device, dtype, first_index=start,
                )  # fmt: skip
                for name, feature in zip(names, pooled):
                    vision[name].append(feature)
                text.append(pooled_text)
                if log is not None:
                    log(f"features of {min(start + batch_size, len(images))}/{len(images)} pairs")
    finally:
        model.train(was_training)
    if not text:
        raise ValueError("extract_features needs at least one image-caption pair")
    # Tensors made under inference_mode cannot be saved for backward: clone them outside it.
    return AlignmentFeatures(
        names=names,
        vision={name: torch.cat(chunks).clone() for name, chunks in vision.items()},
        text=torch.cat(text).clone(),
    )


def _pooled_batch(base, processor, images, captions, device, dtype, first_index=0):
    """One batch: ([depth, *breadth] pooled over image tokens, caption states pooled over real tokens), CPU float32."""
    config = base.config
    num_prompts = len(config.task_prompt_names or [])
    images = [_open_image(image) for image in images]
    inputs = processor(images=images, text=[processor.image_token] * len(images), return_tensors="pt")
    prompt_ids = inputs["task_prompt_ids"].to(device)
    if prompt_ids.shape[1] != num_prompts:
        raise ValueError(f"the processor sends {prompt_ids.shape[1]} task prompts but the config names {num_prompts} "
                         f"({config.task_prompt_names})")  # fmt: skip
    sources = base.get_image_features(
        inputs["pixel_values"].to(device, dtype), task_prompt_ids=prompt_ids, return_source_features=True
    ).source_features
    pooled = [sources[name].float().mean(dim=1).cpu() for name in feature_names(config)]

    sequences = processor.tokenizer(list(captions))["input_ids"]
    empty = [first_index + i for i, ids in enumerate(sequences) if not ids]
    if empty:
        raise ValueError(f"captions {empty} have no tokens")
    text = processor.tokenizer.pad({"input_ids": sequences}, padding=True, padding_side="right", return_tensors="pt")
    hidden = base.language_model(
        input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device)
    ).last_hidden_state.float()
    mask = text["attention_mask"].to(device, hidden.dtype).unsqueeze(-1)
    return pooled, ((hidden * mask).sum(dim=1) / mask.sum(dim=1)).cpu()


def alignment_loss(projected_vision: torch.Tensor, text: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of the row-wise softmax of the similarity matrix of L2-normalised ``(B, d)`` vision and text
    vectors against the identity matching (image i with caption i), averaged over the B rows."""
    if projected_vision.shape != text.shape or projected_vision.ndim != 2:
        raise ValueError(f"need two (B, d) tensors of one shape, got {tuple(projected_vision.shape)} and "
                         f"{tuple(text.shape)}")  # fmt: skip
    logits = F.normalize(projected_vision, dim=-1) @ F.normalize(text, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def make_projection(in_dim: int, out_dim: int, seed: int = 0, bias: bool = True) -> nn.Linear:
    """P: ``nn.Linear(in_dim, out_dim)`` with torch's default initialisation drawn from ``seed`` (the global RNG
    is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(in_dim, out_dim, bias=bias)


def alignment_curve(
    vision: torch.Tensor,
    text: torch.Tensor,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    temperature: float = 1.0,
    weight_decay: float = 0.01,
    bias: bool = True,
    device: str | torch.device | None = None,
) -> list[float]:
    """Train only P on pooled ``vision`` ``(N, d')`` and ``text`` ``(N, d)`` vectors; return each step's loss.

    Each step draws ``min(batch_size, N)`` distinct pairs with a ``torch.Generator`` seeded by ``seed``, records the
    batch's :func:`alignment_loss` and takes one AdamW step. P is :func:`make_projection` with the same seed, so the
    curve is a function of the inputs and the seed.
    """
    if vision.ndim != 2 or text.ndim != 2 or vision.shape[0] != text.shape[0]:
        raise ValueError(f"need vision (N, d') and text (N, d), got {tuple(vision.shape)} and {tuple(text.shape)}")
    if vision.shape[0] < 2:
        raise ValueError("the alignment loss needs at least 2 pairs")
    if steps < 1 or batch_size < 2:
        raise ValueError(f"need steps >= 1 and batch_size >= 2, got {steps} and {batch_size}")
    device = torch.device(device) if device is not None else vision.device
    vision = vision.detach().to(device, torch.float32).clone()
    text = text.detach().to(device, torch.float32).clone()
    num_pairs = vision.shape[0]
    batch = min(batch_size, num_pairs)
    generator = torch.Generator().manual_seed(seed)
    projection = make_projection(vision.shape[1], text.shape[1], seed=seed, bias=bias).to(device)
    optimizer = torch.optim.AdamW(projection.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            index = torch.randperm(num_pairs, generator=generator)[:batch].to(device)
            loss = alignment_loss(projection(vision[index]), text[index], temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


def final_loss(losses: Sequence[float], fraction: float = 0.1) -> float:
    """The mean of the last ``fraction`` of the steps (at least one step)."""
    if not losses:
        raise ValueError("no losses")
    count = max(1, math.ceil(len(losses) * fraction))
    return sum(losses[-count:]) / count


def _select_subsets(subsets, names) -> dict[str, tuple[str, ...]]:
    standard = feature_subsets(names)
    if subsets is None:
        return standard
    if isinstance(subsets, Mapping):
        return {str(key): tuple(value) for key, value in subsets.items()}
    selected = {}
    for key in subsets:
        if key not in standard:
            raise ValueError(f"unknown subset {key!r}; the standard ones are {list(standard)} (or pass a mapping)")
        selected[key] = standard[key]
    return selected


def run_alignment(
    model,
    processor,
    images: Sequence,
    captions: Sequence[str],
    subsets: Mapping[str, Sequence[str]] | Iterable[str] | None = None,
    *,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    temperature: float = 1.0,
    weight_decay: float = 0.01,
    extract_batch_size: int = 16,
    device: str | torch.device | None = None,
    features: AlignmentFeatures | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Alignment-loss curves ``{subset name: per-step losses}`` for feature subsets of one model.

    ``subsets``: None for every variant of :func:`feature_subsets`, an iterable of some of their names, or a
    mapping from names to feature-name sequences. Features are extracted once (or taken from ``features``); each
    subset trains its own P with the same seed, hence on the same batches. P trains on ``device`` (default: the
    model's device).
    """
    if features is None:
        features = extract_features(model, processor, images, captions, batch_size=extract_batch_size, log=log)
    if device is None:
        device = next(model.parameters()).device if model is not None else "cpu"
    curves = {}
    for name, subset in _select_subsets(subsets, features.names).items():
        curves[name] = alignment_curve(
            features.concat(subset),
            features.text,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            temperature=temperature,
            weight_decay=weight_decay,
            device=device,
        )
        if log is not None:
            log(f"{name}: final loss {final_loss(curves[name]):.4f}")
    return curves


# --------------------------------------------------------------------------------------------------- plotting


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _nice_ticks(low: float, high: float, target: int = 6, integer: bool = False) -> tuple[list[float], float]:
    raw = (high - low) / max(target, 1)
    if integer:
        raw = max(raw, 1.0)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first = math.ceil(low / step - 1e-9) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(value)
        value = first + len(ticks) * step
    return ticks, step


def _tick_label(value: float, step: float) -> str:
    magnitude = math.floor(math.log10(step))
    mantissa = step / 10**magnitude
    decimals = max(0, -magnitude + (0 if abs(mantissa - round(mantissa)) < 1e-9 else 1))  # 2.5 needs one more
    text = f"{value:.{decimals}f}"
    return text.lstrip("-") if float(text) == 0 else text


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average: point i is the mean of values[max(0, i - window + 1) : i + 1]."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


_GRID, _AXIS = (225, 225, 225), (0, 0, 0)


@dataclass
class _Frame:
    """The plot area in the image (pixels), the values its edges stand for, and the ticks along its axes."""

    left: int
    right: int
    top: int
    bottom: int
    x_low: float
    x_high: float
    low: float
    high: float
    x_ticks: list[float]
    x_labels: list[str]
    y_ticks: list[float]
    y_labels: list[str]

    def x(self, step: float) -> float:
        return self.left + (step - self.x_low) / (self.x_high - self.x_low) * (self.right - self.left)

    def y(self, value: float) -> float:
        return self.bottom - (value - self.low) / (self.high - self.low) * (self.bottom - self.top)


def plot_curves(
    curves: Mapping[str, Sequence[float]],
    path,
    title: str = "",
    width: int = 800,
    height: int = 500,
    smooth: int | None = None,
) -> Path:
    """Draw the loss curves (x: step from 1, y: loss) as a PNG with Pillow; return the path.

    ``smooth`` is the window of a trailing moving average applied to every curve before drawing: None chooses
    ``max(1, longest curve // 50)`` (a light smoothing of the per-batch noise), 1 draws the raw losses. One colour
    of :data:`PALETTE` per curve, in the mapping's order, with a legend in the upper right. The file is written to a
    temporary file beside ``path`` and renamed into place.
    """
    drawn, longest = _smoothed_curves(curves, width, height, smooth)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = _font(12)
    frame = _layout(draw, drawn, longest, width, height, title, font)
    _draw_axes(draw, frame, title, width, height, font)
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(drawn)}
    _draw_lines(draw, frame, drawn, colours, longest)
    _draw_legend(draw, frame, colours, font)
    return _save_png(image, path)


def _smoothed_curves(curves, width: int, height: int, smooth: int | None) -> tuple[dict[str, list[float]], int]:
    """(the curves as drawn, after the moving average, the length of the longest), after checking the inputs."""
    curves = {str(name): [float(v) for v in values] for name, values in curves.items()}
    if not curves or not all(curves.values()):
        raise ValueError("plot_curves needs at least one non-empty curve")
    if width < 200 or height < 150:
        raise ValueError(f"the plot needs at least 200 x 150 pixels, got {width} x {height}")
    longest = max(len(values) for values in curves.values())
    window = max(1, longest // 50) if smooth is None else max(1, int(smooth))
    return {name: moving_average(values, window) for name, values in curves.items()}, longest


def _layout(draw, drawn: dict, longest: int, width: int, height: int, title: str, font) -> _Frame:
    """The value ranges (5% margins), the ticks, and the plot area left of which the y labels fit."""
    low = min(min(values) for values in drawn.values())
    high = max(max(values) for values in drawn.values())
    if not all(math.isfinite(v) for v in (low, high)):
        raise ValueError("the curves hold non-finite losses")
    pad = (high - low) * 0.05 if high > low else max(abs(high) * 0.05, 0.05)
    low, high = low - pad, high + pad
    x_low, x_high = (1.0, float(longest)) if longest > 1 else (0.0, 2.0)
    y_ticks, y_step = _nice_ticks(low, high)
    x_ticks, x_step = _nice_ticks(x_low, x_high, integer=True)
    x_ticks = [t for t in x_ticks if t >= x_low]
    y_labels = [_tick_label(t, y_step) for t in y_ticks]
    label_width = max(draw.textlength(label, font=font) for label in y_labels)
    return _Frame(
        left=int(label_width) + 16, right=width - 16, top=34 if title else 16, bottom=height - 42,
        x_low=x_low, x_high=x_high, low=low, high=high,
        x_ticks=x_ticks, x_labels=[_tick_label(t, x_step) for t in x_ticks], y_ticks=y_ticks, y_labels=y_labels,
    )  # fmt: skip


def _draw_axes(draw, frame: _Frame, title: str, width: int, height: int, font) -> None:
    """Grid lines, ticks and their labels, the frame, the axis names and the title."""
    for tick, label in zip(frame.y_ticks, frame.y_labels):
        y = round(frame.y(tick))
        draw.line([(frame.left, y), (frame.right, y)], fill=_GRID)
        draw.line([(frame.left - 5, y), (frame.left, y)], fill=_AXIS)
        draw.text((frame.left - 8, y), label, fill=_AXIS, font=font, anchor="rm")
    for tick, label in zip(frame.x_ticks, frame.x_labels):
        x = round(frame.x(tick))
        draw.line([(x, frame.top), (x, frame.bottom)], fill=_GRID)
        draw.line([(x, frame.bottom), (x, frame.bottom + 5)], fill=_AXIS)
        draw.text((x, frame.bottom + 8), label, fill=_AXIS, font=font, anchor="mt")
    draw.rectangle([frame.left, frame.top, frame.right, frame.bottom], outline=_AXIS)
    draw.text(((frame.left + frame.right) / 2, height - 4), "step", fill=_AXIS, font=font, anchor="mb")
    draw.text((frame.left, frame.top - 4), "loss", fill=_AXIS, font=font, anchor="lb")
    if title:
        draw.text((width / 2, 6), title, fill=_AXIS, font=_font(15), anchor="mt")


def _draw_lines(draw, frame: _Frame, drawn: dict, colours: dict, longest: int) -> None:
    """Each curve as a line (a dot when the plot has a single step)."""
    for name, values in drawn.items():
        if longest > 1:
            points = [(frame.x(i + 1), frame.y(v)) for i, v in enumerate(values)]
        else:
            points = [(frame.x(1), frame.y(values[0]))]
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colours[name])
        else:
            draw.line(points, fill=colours[name], width=2)


def _draw_legend(draw, frame: _Frame, colours: dict, font) -> None:
    """A swatch and the name of every curve, in a box in the upper right of the plot area."""
    line_height, swatch = 16, 22
    legend_width = swatch + 14 + int(max(draw.textlength(name, font=font) for name in colours))
    legend_height = line_height * len(colours) + 8
    x0, y0 = frame.right - legend_width - 8, frame.top + 8
    draw.rectangle([x0, y0, x0 + legend_width, y0 + legend_height], fill="white", outline=(160, 160, 160))
    for i, (name, colour) in enumerate(colours.items()):
        y = y0 + 4 + line_height * i + line_height // 2
        draw.line([(x0 + 5, y), (x0 + 5 + swatch, y)], fill=colour, width=3)
        draw.text((x0 + 10 + swatch, y), name, fill=_AXIS, font=font, anchor="lm")


def _save_png(image: Image.Image, path) -> Path:
    """Write `image` to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=sibling_prefix(path, "write"), suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
