"""The two training stages of Florence-VL and the paper's hyper-parameters for them."""

from dataclasses import dataclass

from ..families import FAMILY_NAMES

STAGES = ("pretrain", "finetune")
VISION_TOWER_PREFIX = "vision_tower."


@dataclass(frozen=True)
class StageRecipe:
    """Hyper-parameters of one stage of the released Florence-VL models.

    Batch sizes and learning rates are the paper's (appendix 9); schedule, warm-up, weight decay, epochs and
    sequence length are from the released training scripts (`scripts/florence-vl/{phi,llama}/*.sh`), which also
    train Phi-3.5's stage 2 for 3 epochs where the paper's setting is 1.
    """

    template: str
    global_batch_size: int
    learning_rate: float
    num_train_epochs: float = 1.0
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    model_max_length: int = 2048


# By LLM family and stage: stage 1 trains on the "plain" captions, stage 2 on the family's own chat template.
PAPER_RECIPES = {
    ("phi3", "pretrain"): StageRecipe(template="plain", global_batch_size=4096, learning_rate=1e-4),
    ("phi3", "finetune"): StageRecipe(template="phi3", global_batch_size=2048, learning_rate=9e-5),
    ("llama3", "pretrain"): StageRecipe(template="plain", global_batch_size=256, learning_rate=2e-5),
    ("llama3", "finetune"): StageRecipe(template="llama3", global_batch_size=256, learning_rate=1e-5),
}


def paper_recipe(llm_template: str, stage: str) -> StageRecipe:
    """The recipe for an LLM family ("phi3" or "llama3") and a stage ("pretrain" or "finetune")."""
    check_stage(stage)
    try:
        return PAPER_RECIPES[(llm_template, stage)]
    except KeyError:
        raise ValueError(f"No paper recipe for LLM family {llm_template!r}; known: {list(FAMILY_NAMES)}") from None


def check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def is_vision_tower_parameter(name: str) -> bool:
    """True for parameters of the Florence-2 vision tower, also under PEFT or DDP wrappers."""
    return f".{VISION_TOWER_PREFIX}" in f".{name}"


def apply_stage(model, stage: str) -> dict:
    """Set `requires_grad` for a stage: "pretrain" trains everything, the Florence-2 vision tower included;
    "finetune" freezes the vision tower and trains the projector and the LLM. Returns trainable/frozen counts."""
    check_stage(stage)
    counts = {"trainable": 0, "frozen": 0}
    for name, parameter in model.named_parameters():
        trainable = stage == "pretrain" or not is_vision_tower_parameter(name)
        parameter.requires_grad_(trainable)
        counts["trainable" if trainable else "frozen"] += parameter.numel()
    return counts
