"""The policy trainer on tiny-llama: logprobs agree with a plain forward, updates follow advantages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import ModelConfig
from posttrain.rlvr.batch import build_batch, micro_batches
from posttrain.rlvr.config import AlgorithmConfig, LossConfig, RLTrainConfig
from posttrain.rlvr.trainer import PolicyTrainer
from posttrain.rollout.types import Rollout
from posttrain.training.config import LoraConfig


def rollout(prompt, tokens, logprobs=None):
    return Rollout(prompt_index=0, sample_index=0, prompt_ids=prompt, token_ids=tokens,
                   logprobs=logprobs or [0.0] * len(tokens), text="", finish_reason="stop", reasoning=None,
                   answer="", reasoning_closed=True, reasoning_tokens=0)


@pytest.fixture
def trainer(tiny_llama_dir):
    train = RLTrainConfig(lr=1e-2, gradient_checkpointing=False, micro_batch_tokens=16)
    return PolicyTrainer(ModelConfig(name="tiny-llama"), train, LoraConfig(), LossConfig(
        importance_sampling=False, seq_error_threshold=None))


def reference_logprobs(model, prompt, tokens, temperature=1.0):
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0].float() / temperature
    lp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    return lp[len(prompt) - 1:]


def test_batch_layout_and_micro_batches():
    rs = [rollout([1, 2, 3], [4, 5]), rollout([1], [6, 7, 8, 9])]
    batch = build_batch(rs, torch.tensor([1.0, -1.0]), torch.tensor([True, False]), pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [1, 6, 7, 8, 9]]
    assert batch.positions.tolist() == [[2, 3, 0, 0], [0, 1, 2, 3]]
    assert batch.mask.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0]]
    assert micro_batches(batch, 5) == [[0], [1]] and micro_batches(batch, 10) == [[0, 1]]
    with pytest.raises(ValueError, match="logprobs"):
        build_batch([rollout([1], [2, 3], [0.0])], torch.zeros(1), torch.ones(1), 0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_a_plain_forward(trainer, temperature):
    rs = [rollout([1, 5, 9], [11, 12, 13]), rollout([2, 3], [40, 41, 42, 43, 44])]
    batch = build_batch(rs, torch.zeros(2), torch.ones(2), pad_id=trainer.tokenizer.pad_token_id)
    got = trainer.logprobs(batch, temperature)
    trainer.model.eval()
    for i, r in enumerate(rs):
        ref = reference_logprobs(trainer.model, r.prompt_ids, r.token_ids, temperature)
        assert torch.allclose(got[i, : len(r.token_ids)], ref, atol=1e-5)


def test_update_moves_logprobs_along_advantages(trainer):
    good, bad = rollout([1, 5, 9], [100, 101, 102]), rollout([1, 5, 9], [200, 201, 202])
    batch = build_batch([good, bad], torch.tensor([1.0, -1.0]), torch.ones(2), trainer.tokenizer.pad_token_id)
    before = trainer.logprobs(batch, 1.0)
    metrics = trainer.train_step(batch, 1.0)
    after = trainer.logprobs(batch, 1.0)
    assert after[0, :3].sum() > before[0, :3].sum()
    assert after[1, :3].sum() < before[1, :3].sum()
    assert metrics["train/grad_norm"] > 0 and metrics["tokens/trained"] == 6


def test_masked_rows_do_not_train(trainer):
    r = rollout([1, 5, 9], [100, 101, 102])
    batch = build_batch([r, r], torch.tensor([1.0, -1.0]), torch.tensor([False, False]), 0)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step(batch, 1.0)
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_published_weights(tmp_path, trainer):
    update = trainer.publish_weights(str(tmp_path))
    assert update.kind == "full" and update.path.startswith(str(tmp_path))

    (weights,) = [load_file(p) for p in Path(update.path).glob("*.safetensors")]
    assert "lm_head.weight" in weights  # the tied head is sent: vLLM-CPU keeps a stale one otherwise
    assert torch.equal(weights["model.embed_tokens.weight"], trainer.model.state_dict()["model.embed_tokens.weight"])


def test_lora_trainer_publishes_the_adapter(tmp_path, tiny_llama_dir):
    trainer = PolicyTrainer(ModelConfig(name="tiny-llama"), RLTrainConfig(gradient_checkpointing=False),
                            LoraConfig(enabled=True, r=4, alpha=8), LossConfig())
    update = trainer.publish_weights(str(tmp_path))
    assert update.kind == "lora"
    assert json.loads((Path(update.path) / "adapter_config.json").read_text())["r"] == 4


def test_variants_fill_defaults_and_explicit_fields_win():
    assert AlgorithmConfig(variant="dr_grpo").scale == "none"
    assert AlgorithmConfig(variant="dr_grpo", scale="std").scale == "std"
    assert AlgorithmConfig().eps_high == 0.28
    assert AlgorithmConfig(variant="grpo").aggregation == "seq_mean_token_mean"


def test_dr_grpo_divides_by_the_generation_length(monkeypatch, tiny_llama_dir):
    """The trainers a stage starts normalise Dr.GRPO's token sums by generation.max_new_tokens (48
    here), not by a constant: the loss of one 3-token sequence with per-token loss 1 is 3 / 48."""
    from posttrain.config import load_config
    from posttrain.orchestration import cluster
    from posttrain.rlvr.config import RLVRConfig
    from posttrain.rlvr.policy_loss import policy_loss
    from posttrain.rlvr.trainer_group import TrainerGroup

    started = []
    monkeypatch.setattr(cluster, "init_ray", lambda *args, **kwargs: None)
    monkeypatch.setattr(cluster, "start_actor", lambda cls, name, *args, **kwargs: started.append(cls(*args)))
    cfg = load_config(RLVRConfig, overrides=["model.name=tiny-llama", "algorithm.variant=dr_grpo",
                                             "generation.max_new_tokens=48", "train.gradient_checkpointing=false"])
    TrainerGroup(cfg)
    (trainer,) = started
    zeros = torch.zeros(1, 3)
    out = policy_loss(zeros, zeros, zeros, torch.tensor([-1.0]), torch.ones(1, 3), trainer.loss_cfg)
    assert out.loss.item() == pytest.approx(3 / 48)


def test_mixed_precision_trains_in_bf16_with_fp32_weights_and_logprobs(tiny_llama_dir):
    """``train.mixed_precision: bf16``: the policy's decoder runs in bf16 (the forward of the logprob pass
    and of the update), its logprobs come back in fp32 close to the fp32 forward's, the weights stay
    fp32, and an update still follows the advantages."""
    train = RLTrainConfig(lr=1e-2, gradient_checkpointing=False, micro_batch_tokens=16, mixed_precision="bf16")
    trainer = PolicyTrainer(ModelConfig(name="tiny-llama"), train, LoraConfig(), LossConfig(
        importance_sampling=False, seq_error_threshold=None))
    seen: set = set()
    for name, m in trainer.model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    good, bad = rollout([1, 5, 9], [100, 101, 102]), rollout([1, 5, 9], [200, 201, 202])
    batch = build_batch([good, bad], torch.tensor([1.0, -1.0]), torch.ones(2), trainer.tokenizer.pad_token_id)
    before = trainer.logprobs(batch, 1.0)
    assert seen == {torch.bfloat16} and before.dtype == torch.float32
    trainer.model.eval()
    ref = reference_logprobs(trainer.model, good.prompt_ids, good.token_ids)  # fp32: no autocast here
    assert torch.allclose(before[0, :3], ref, atol=5e-2) and not torch.equal(before[0, :3], ref)
    trainer.train_step(batch, 1.0)
    after = trainer.logprobs(batch, 1.0)
    assert after[0, :3].sum() > before[0, :3].sum() and after[1, :3].sum() < before[1, :3].sum()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_rejected_tokens_are_out_of_the_loss_denominator(tiny_llama_dir, aggregation):
    """A rollout the mismatch mask rejects (its engine logprobs are far from the trainer's) neither trains
    nor counts: the step's gradient equals the gradient of the batch without it (slime PR 657). Counting its
    tokens in the token mean's divisor would shrink the gradient by 9 / 12 here."""
    from posttrain.rlvr.batch import TrainBatch

    def fresh():
        train = RLTrainConfig(lr=1e-3, gradient_checkpointing=False, micro_batch_tokens=16, max_grad_norm=None)
        return PolicyTrainer(ModelConfig(name="tiny-llama"), train, LoraConfig(),
                             LossConfig(aggregation=aggregation, seq_error_threshold=2.0, is_cap=2.0))

    def on_policy(trainer, rs, adv) -> TrainBatch:
        batch = build_batch(rs, torch.tensor(adv), torch.ones(len(rs)), trainer.tokenizer.pad_token_id)
        batch.rollout_logprobs = trainer.logprobs(batch, 1.0)  # the engine agreed with the trainer
        return batch

    good, other = rollout([1, 5, 9], list(range(100, 109))), rollout([2, 7], [200, 201, 202])  # 2 passes
    rejected = fresh()
    both = on_policy(rejected, [good, other], [1.0, -1.0])
    both.rollout_logprobs[1] -= 3.0  # exp(mean |diff|) = 20 > 2: masked
    with_it = rejected.train_step(both, 1.0)
    alone = fresh()
    without = alone.train_step(on_policy(alone, [good], [1.0]), 1.0)
    assert with_it["tokens/trained"] == without["tokens/trained"] == 9
    assert with_it["mismatch/rejected_token_share"] == pytest.approx(3 / 12)
    assert with_it["train/grad_norm"] == pytest.approx(without["train/grad_norm"], rel=1e-5)


def _moments(trainer) -> list[torch.Tensor]:
    return [v for s in trainer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim()]


def test_optimizer_offload_and_reload_change_no_update(tiny_llama_dir):
    """train.offload_optimizer: AdamW's moments go to host memory between updates and come back beside
    their parameters; the next update is exactly the one a trainer that kept them would make."""
    def fresh():
        train = RLTrainConfig(lr=1e-2, gradient_checkpointing=False, micro_batch_tokens=64)
        return PolicyTrainer(ModelConfig(name="tiny-llama"), train, LoraConfig(), LossConfig(
            importance_sampling=False, seq_error_threshold=None))

    moved, kept = fresh(), fresh()
    rs = [rollout([1, 5, 9], [100, 101, 102]), rollout([1, 5, 9], [200, 201, 202])]
    batch = build_batch(rs, torch.tensor([1.0, -1.0]), torch.ones(2), moved.tokenizer.pad_token_id)
    for trainer in (moved, kept):
        torch.manual_seed(1)  # the same row shuffle for both
        trainer.train_step(batch, 1.0)
    moved.offload_optimizer()
    assert _moments(moved) and all(m.device.type == "cpu" for m in _moments(moved))
    moved.load_optimizer()
    device = next(moved.model.parameters()).device
    assert all(m.device == device for m in _moments(moved))
    for trainer in (moved, kept):
        torch.manual_seed(2)
        trainer.train_step(batch, 1.0)
    for a, b in zip(moved.model.parameters(), kept.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_optimizer_offload_frees_gpu_memory(tiny_llama_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    train = RLTrainConfig(lr=1e-2, gradient_checkpointing=False, micro_batch_tokens=64)
    trainer = PolicyTrainer(ModelConfig(name="tiny-llama"), train, LoraConfig(), LossConfig())
    rs = [rollout([1, 5, 9], [100, 101, 102]), rollout([1, 5, 9], [200, 201, 202])]
    batch = build_batch(rs, torch.tensor([1.0, -1.0]), torch.ones(2), trainer.tokenizer.pad_token_id)
    trainer.train_step(batch, 1.0)
    before = torch.cuda.memory_allocated()
    trainer.offload_optimizer()
    assert torch.cuda.memory_allocated() < before and all(m.device.type == "cpu" for m in _moments(trainer))
    trainer.load_optimizer()
    assert all(m.is_cuda for m in _moments(trainer))


def test_the_streamed_sync_sends_a_head_the_config_calls_tied_but_is_not_once(trainer):
    """The streamed paths (FSDP shm, direct transfer) add the tied head only when it *is* the embedding:
    a config saying ``tie_word_embeddings`` over a separate head (NemotronH in transformers 5.19) sends it once."""
    model = trainer.model
    tied = dict(trainer._gathered_for_sync())
    assert torch.equal(tied["lm_head.weight"], tied["model.embed_tokens.weight"])  # really tied: sent as its own copy
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 1.0)  # untied, the config unchanged
    assert model.config.tie_word_embeddings
    names = [name for name, _ in trainer._gathered_for_sync()]
    assert names.count("lm_head.weight") == 1 and names == [name for name, _, _ in trainer._sync_meta()]
    assert torch.equal(dict(trainer._gathered_for_sync())["lm_head.weight"], model.lm_head.weight)
