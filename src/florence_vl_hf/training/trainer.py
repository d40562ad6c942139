"""transformers.Trainer for Florence-VL: an optional learning rate (and start step) of its own for the vision tower,
and a loss that runs the LM head only where a label is predicted."""

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer

from .data import IGNORE_INDEX
from .stages import is_vision_tower_parameter


class FlorenceVLTrainer(Trainer):
    """A `Trainer` with two additions.

    - `vision_tower_lr`: the Florence-2 vision tower's parameters get this learning rate (the rest keep
      `args.learning_rate`); the scheduler scales both alike.
    - `vision_tower_start_step`: the vision tower's learning rate is 0 before this optimizer step (then follows
      the schedule), so a randomly initialised projector and LLM first learn to read its features as they are.
    - The loss is computed from logits at the positions that predict a label only (`logits_to_keep` set to those
      positions): with a 32k-128k vocabulary most of the LM head's work in a caption or VQA batch is spent on
      prompt and image positions whose logits are discarded. The loss is the same shifted cross-entropy, normalised
      the way the model normalises it (`num_items_in_batch` under gradient accumulation).
    """

    def __init__(self, *args, vision_tower_lr: float | None = None, vision_tower_start_step: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if vision_tower_start_step < 0:
            raise ValueError(f"vision_tower_start_step must be >= 0, got {vision_tower_start_step}")
        self.vision_tower_lr = vision_tower_lr
        self.vision_tower_start_step = vision_tower_start_step

    def create_optimizer(self, model=None):
        if self.optimizer is not None or (self.vision_tower_lr is None and not self.vision_tower_start_step):
            return super().create_optimizer(model)
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[bool, bool], list] = {}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                groups.setdefault((is_vision_tower_parameter(name), name in decay), []).append(parameter)
        param_groups = []
        # The LLM's groups first: the Trainer logs the first group's learning rate.
        for (vision, decayed), parameters in sorted(groups.items(), key=lambda item: item[0][0]):
            group = {"params": parameters, "weight_decay": self.args.weight_decay if decayed else 0.0}
            if vision and self.vision_tower_lr is not None:
                group["lr"] = self.vision_tower_lr
            group["vision_tower"] = vision
            param_groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("params", None)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        created = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        start = self.vision_tower_start_step
        groups = (optimizer or self.optimizer).param_groups
        if not (created and start and any(group.get("vision_tower") for group in groups)):
            return scheduler
        if not isinstance(scheduler, LambdaLR):
            raise ValueError(
                f"vision_tower_start_step needs a step-based learning rate schedule, not {type(scheduler).__name__} "
                f"(lr_scheduler_type={self.args.lr_scheduler_type!r})"
            )

        def delayed(factor):
            return lambda step: factor(step) if step >= start else 0.0

        factors = [delayed(f) if group.get("vision_tower") else f for f, group in zip(scheduler.lr_lambdas, groups)]
        self.lr_scheduler = LambdaLR(scheduler.optimizer, factors)
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is None or return_outputs or self.label_smoother is not None or self.compute_loss_func is not None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = {key: value for key, value in inputs.items() if key != "labels"}
        targets = labels[:, 1:]
        positions = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
        outputs = model(**inputs, logits_to_keep=positions)
        logits = outputs.logits.float()
        kept = targets[:, positions].to(logits.device)
        loss = F.cross_entropy(logits.flatten(0, 1), kept.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        if num_items_in_batch is None:
            return loss / (kept != IGNORE_INDEX).sum().clamp(min=1)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
        if self.args.average_tokens_across_devices:
            # The Trainer's num_items_in_batch counts every process's tokens; DDP averages the gradients.
            loss = loss * self.accelerator.num_processes
        return loss
