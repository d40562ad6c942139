import json

import pytest
import torch
from conftest import write_samples

from florence_vl_hf.training import (
    PAPER_RECIPES,
    ConversationDataset,
    FlorenceVLDataCollator,
    FlorenceVLTrainer,
    apply_stage,
    paper_recipe,
    train,
    training_arguments,
)


def batch_of(processor, data_folder, template="phi3"):
    folder, samples = data_folder
    dataset = ConversationDataset(samples, processor, template, image_folder=folder)
    return FlorenceVLDataCollator(processor)([dataset[i] for i in range(len(samples))])


def hand_loss(logits, labels):
    """Shifted cross-entropy averaged over the labels that are not -100, computed by hand."""
    log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    targets = labels[:, 1:]
    keep = targets != -100
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum() / keep.sum()


def test_trainer_loss_is_the_shifted_cross_entropy_at_supervised_positions_only(tiny_phi3, data_folder, tmp_path):
    model, processor = tiny_phi3
    batch = batch_of(processor, data_folder)
    args = training_arguments(tmp_path, "finetune", "phi3", report_to="none", remove_unused_columns=False)
    trainer = FlorenceVLTrainer(model=model, args=args)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        expected = hand_loss(logits, batch["labels"])
        loss = trainer.compute_loss(model, dict(batch))
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        scaled = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(2 * tokens))
        default = model(**batch).loss
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scaled.double(), expected / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(default.double(), expected, rtol=1e-5, atol=1e-5)


def test_stage_presets_freeze_exactly_the_vision_tower(fresh_phi3):
    model, _ = fresh_phi3
    counts = apply_stage(model, "finetune")
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {name for name, _ in model.named_parameters() if name.startswith("model.vision_tower.")}
    assert counts["frozen"] == sum(p.numel() for p in model.model.vision_tower.parameters())
    apply_stage(model, "pretrain")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="stage must be one of"):
        apply_stage(model, "sft")


def test_vision_tower_gets_its_own_learning_rate(fresh_phi3, tmp_path):
    model, _ = fresh_phi3
    args = training_arguments(tmp_path, "pretrain", "phi3", learning_rate=1e-3, weight_decay=0.1)
    trainer = FlorenceVLTrainer(model=model, args=args, vision_tower_lr=2e-5)
    optimizer = trainer.create_optimizer()
    vision = {id(p) for p in model.model.vision_tower.parameters()}
    for group in optimizer.param_groups:
        in_vision = {id(p) in vision for p in group["params"]}
        assert len(in_vision) == 1
        assert group["lr"] == (2e-5 if in_vision.pop() else 1e-3)
    grouped = sum(len(g["params"]) for g in optimizer.param_groups)
    assert grouped == len(list(model.parameters()))


def test_vision_tower_learning_rate_starts_at_the_given_step(fresh_phi3, data_folder, tmp_path):
    model, processor = fresh_phi3
    folder, samples = data_folder
    args = training_arguments(tmp_path / "run", "pretrain", "phi3", learning_rate=1e-3, warmup_steps=0, max_steps=3,
                              per_device_train_batch_size=3, global_batch_size=3,
                              save_strategy="no", report_to="none", disable_tqdm=True)  # fmt: skip
    vision_before = {n: p.detach().clone() for n, p in model.model.vision_tower.named_parameters()}
    llm_before = {n: p.detach().clone() for n, p in model.model.language_model.named_parameters()}
    train(model, processor, write_samples(folder, samples), stage="pretrain", args=args, image_folder=folder,
          vision_tower_lr=5e-4, vision_tower_start_step=3, save=False)
    assert all(torch.equal(p, vision_before[n]) for n, p in model.model.vision_tower.named_parameters())
    assert not all(torch.equal(p, llm_before[n]) for n, p in model.model.language_model.named_parameters())
    with pytest.raises(ValueError, match="vision_tower_start_step must be >= 0"):
        FlorenceVLTrainer(model=model, args=args, vision_tower_start_step=-1)


def test_vision_tower_start_step_delays_only_the_vision_tower(fresh_phi3, tmp_path):
    model, _ = fresh_phi3
    args = training_arguments(tmp_path, "pretrain", "phi3", learning_rate=1e-3, warmup_steps=0,
                              lr_scheduler_type="constant")  # fmt: skip
    trainer = FlorenceVLTrainer(model=model, args=args, vision_tower_lr=2e-4, vision_tower_start_step=2)
    trainer.create_optimizer_and_scheduler(num_training_steps=5)
    vision = [group["vision_tower"] for group in trainer.optimizer.param_groups]
    rates = []
    for _ in range(4):
        rates.append(dict(zip(vision, trainer.lr_scheduler.get_last_lr())))
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert rates == [{True: 0.0, False: 1e-3}] * 2 + [{True: 2e-4, False: 1e-3}] * 2
    plateau = training_arguments(tmp_path, "pretrain", "phi3", lr_scheduler_type="reduce_lr_on_plateau",
                                 eval_strategy="steps")  # fmt: skip
    trainer = FlorenceVLTrainer(model=model, args=plateau, eval_dataset=[{}], vision_tower_start_step=2)
    with pytest.raises(ValueError, match="needs a step-based learning rate schedule, not ReduceLROnPlateau"):
        trainer.create_optimizer_and_scheduler(num_training_steps=5)


def test_paper_recipes_are_the_documented_defaults(tmp_path):
    expected = {("phi3", "pretrain"): (4096, 1e-4), ("phi3", "finetune"): (2048, 9e-5),
                ("llama3", "pretrain"): (256, 2e-5), ("llama3", "finetune"): (256, 1e-5)}  # fmt: skip
    assert {key: (r.global_batch_size, r.learning_rate) for key, r in PAPER_RECIPES.items()} == expected
    args = training_arguments(tmp_path, "finetune", "llama3", per_device_train_batch_size=8, world_size=4)
    assert args.gradient_accumulation_steps == 256 // (8 * 4)
    assert (args.learning_rate, args.lr_scheduler_type.value, args.warmup_steps, args.weight_decay) == (
        1e-5, "cosine", 0.03, 0.0)  # fmt: skip
    assert paper_recipe("phi3", "pretrain").template == "plain"
    with pytest.raises(ValueError, match="No paper recipe"):
        paper_recipe("qwen2", "pretrain")


def test_training_lowers_the_loss_and_resumes_from_a_checkpoint(fresh_phi3, data_folder, tmp_path):
    model, processor = fresh_phi3
    folder, samples = data_folder
    data = write_samples(folder, samples)
    common = dict(per_device_train_batch_size=3, global_batch_size=3, learning_rate=3e-3, warmup_steps=0,
                  logging_steps=1, save_steps=4, disable_tqdm=True, seed=0)  # fmt: skip
    args = training_arguments(tmp_path / "run", "finetune", "phi3", max_steps=8, **common)
    result = train(model, processor, data, stage="finetune", args=args, image_folder=folder)
    losses = [entry["loss"] for entry in result.trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < losses[0] - 1.0
    assert (tmp_path / "run" / "checkpoint-4").is_dir() and (tmp_path / "run" / "config.json").is_file()
    frozen_before = model.model.vision_tower.backbone.convs[0].conv.weight.clone()

    # Resuming at step 4 continues to the same weights as the uninterrupted run.
    from florence_vl_hf.build import build_random_model
    from florence_vl_hf.tiny import tiny_config

    again, _ = build_random_model(tiny_config("phi3"), seed=1)
    args = training_arguments(tmp_path / "run", "finetune", "phi3", max_steps=8, **common)
    train(again, processor, data, stage="finetune", args=args, image_folder=folder,
          resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"), save=False)  # fmt: skip
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(model.model.vision_tower.backbone.convs[0].conv.weight, frozen_before)
    state = json.loads((tmp_path / "run" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback; a GPU trains bf16 on the GPU")
def test_bf16_training_runs_on_a_cpu(fresh_phi3, data_folder, tmp_path):
    model, processor = fresh_phi3
    folder, samples = data_folder
    args = training_arguments(tmp_path, "finetune", "phi3", bf16=True, per_device_train_batch_size=3,
                              global_batch_size=3, max_steps=2, learning_rate=1e-3, warmup_steps=0, logging_steps=1,
                              disable_tqdm=True)  # fmt: skip
    assert args.bf16 and args.use_cpu
    before = model.model.multi_modal_projector.linears[0].weight.detach().clone()
    result = train(model, processor, write_samples(folder, samples), stage="finetune", args=args,
                   image_folder=folder, save=False)  # fmt: skip
    losses = [entry["loss"] for entry in result.trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert model.model.multi_modal_projector.linears[0].weight.dtype == torch.float32  # autocast, fp32 master weights
    assert not torch.equal(model.model.multi_modal_projector.linears[0].weight, before)
    with pytest.raises(ValueError, match="bf16"):
        training_arguments(tmp_path, "finetune", "phi3", bf16=True, use_cpu=False)
