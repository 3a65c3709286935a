"""Data-parallel trainer workers on tiny-llama: W workers make one worker's update, checkpoints move between sizes;
the same with FSDP2-sharded workers (the weights gathered for the logprob check, weight sync and export)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import ModelConfig
from posttrain.orchestration import cluster
from posttrain.rlvr.batch import TrainBatch, build_batch
from posttrain.rlvr.config import AlgorithmConfig, RLTrainConfig, RLVRConfig
from posttrain.rlvr.distributed import shard_rows
from posttrain.rlvr.trainer import PolicyTrainer
from posttrain.rlvr.trainer_group import TrainerGroup
from posttrain.rollout.types import Rollout
from posttrain.rollout.weight_sync import weight_files
from posttrain.training.config import FsdpConfig

RAY_TEMP_DIR = "/tmp/ray-rlvr-trainer-group"
# (prompt, completion): 4 + 2 + 6 + 3 + 1 = 16 completion tokens, rows of different lengths
ROWS = [([1, 5, 9], [100, 101, 102, 103]), ([2, 3], [40, 41]), ([7, 8, 9, 10], [300, 301, 302, 303, 304, 305]),
        ([4], [50, 51, 52]), ([6, 6, 6], [60])]
ADV = [1.0, -1.0, 0.5, -0.5, 2.0]
ADAM_STEPS_ATOL = 3e-5


@pytest.fixture(scope="module")
def ray_cluster():
    cluster.init_ray(temp_dir=RAY_TEMP_DIR, num_cpus=4)
    yield
    cluster.shutdown_ray()


def config(aggregation: str, workers: int = 1, minibatches: int = 1, micro_batch_tokens: int = 16) -> RLVRConfig:
    train = RLTrainConfig(lr=1e-3, gradient_checkpointing=False, micro_batch_tokens=micro_batch_tokens,
                          minibatches=minibatches, workers=workers, num_cpus=1, threads=1)
    return RLVRConfig(model=ModelConfig(name="tiny-llama"), train=train,
                      algorithm=AlgorithmConfig(aggregation=aggregation))


def in_process(cfg: RLVRConfig) -> PolicyTrainer:
    return PolicyTrainer(cfg.start_model(), cfg.train, cfg.lora, cfg.loss_config(), cfg.run.seed)


def make_batch(trainer: PolicyTrainer, rows: list, adv: list[float], off_row: int | None = None) -> TrainBatch:
    """Rollout logprobs = the initial policy's +-0.05 (importance weights != 1); ``off_row`` is off by
    +3 per token, so exp(3) > seq_error_threshold=2 masks it."""
    rollouts = [Rollout(prompt_index=0, sample_index=0, prompt_ids=p, token_ids=t, logprobs=[0.0] * len(t), text="",
                        finish_reason="stop", reasoning=None, answer="", reasoning_closed=True, reasoning_tokens=0)
                for p, t in rows]
    batch = build_batch(rollouts, torch.tensor(adv), torch.ones(len(rows)), trainer.tokenizer.pad_token_id)
    jitter = 0.05 * (-1.0) ** torch.arange(batch.mask.shape[1])
    batch.rollout_logprobs = (trainer.logprobs(batch, 1.0) + jitter) * batch.mask
    if off_row is not None:
        batch.rollout_logprobs[off_row] += 3.0 * batch.mask[off_row]
    return batch


def saved_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    return load_file(Path(checkpoint) / "model" / "model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_shards_balance_tokens_and_may_be_empty():
    # longest first onto the lightest shard: 5 -> s0, 4 -> s1, 3 -> s1 (7), 2 -> s0 (7), 1 -> tie -> s0 (8)
    assert shard_rows([0, 1, 2, 3, 4], [5, 1, 4, 2, 3], 2) == [[0, 1, 3], [2, 4]]
    assert shard_rows([3, 1], [9, 2, 9, 7], 3) == [[3], [1], []]
    assert shard_rows([4, 0, 2], [1] * 5, 1) == [[4, 0, 2]]  # one worker: the minibatch as drawn


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batches_make_the_update_of_one_pass(tiny_llama_dir, aggregation):
    """Sequence means used to be taken per micro-batch and summed; now the count is the minibatch's."""
    one_pass, micro = in_process(config(aggregation, micro_batch_tokens=4096)), in_process(config(aggregation))
    initial = {k: v.clone() for k, v in micro.model.state_dict().items()}
    batch = make_batch(micro, ROWS, ADV, off_row=2)
    m1, m2 = one_pass.train_step(batch, 1.0), micro.train_step(batch, 1.0)
    a, b = one_pass.model.state_dict(), micro.model.state_dict()
    assert max_diff(a, b) < 1e-6 < max_diff(a, initial)
    assert m1["tokens/trained"] == m2["tokens/trained"] == 10  # 16 tokens less the masked row's 6
    assert m1["mismatch/masked_sequences"] == m2["mismatch/masked_sequences"] == 1


@pytest.mark.slow
def test_two_workers_make_the_update_of_one(ray_cluster, tiny_llama_dir, tmp_path):
    """token_mean, two shuffled minibatches per step, micro-batches: 2 workers = 1 worker = in-process."""
    plain = in_process(config("token_mean", minibatches=2))
    initial = {k: v.clone() for k, v in plain.model.state_dict().items()}
    batches = [make_batch(plain, ROWS, ADV, off_row=2), make_batch(plain, ROWS[:4], ADV[:4])]
    want = [plain.train_step(b, 1.0) for b in batches]
    expected = plain.model.state_dict()
    assert max_diff(initial, expected) > 1e-4  # the weights did move
    for workers in (2, 1):
        with TrainerGroup(config("token_mean", workers=workers, minibatches=2)) as group:
            assert group.names == [f"trainer-{r}" for r in range(workers)]
            got = [group.train_step(b, 1.0) for b in batches]
            checkpoint = group.save(str(tmp_path / f"w{workers}"), 2, {}, 1)
        assert max_diff(saved_weights(checkpoint), expected) < 1e-5, f"{workers} workers"
        assert [m["tokens/trained"] for m in got] == [10, 15]  # step 1: row 2 masked (6 tokens); step 2: all 15
        assert got[0]["mismatch/masked_sequences"] == 1
        for key in ("loss/pg", "loss/is_weight_mean", "train/grad_norm", "mismatch/logprob_abs_mean",
                    "mismatch/logprob_abs_max", "mismatch/seq_error_max"):
            assert got[0][key] == pytest.approx(want[0][key], rel=1e-4, abs=1e-6), key


def test_sequence_mean_tiny_batch_and_resume_on_one_worker(ray_cluster, tiny_llama_dir, tmp_path):
    """seq_mean_token_mean on 2 workers, then a 1-row batch (worker 1 gets no rows); the checkpoint
    resumes into a fresh 1-worker group, whose next step matches the uninterrupted trainer."""
    plain = in_process(config("seq_mean_token_mean"))
    full, tiny = make_batch(plain, ROWS, ADV, off_row=2), make_batch(plain, ROWS[:1], [1.0])
    for batch in (full, tiny):
        plain.train_step(batch, 1.0)
    after_two = {k: v.clone() for k, v in plain.model.state_dict().items()}
    with TrainerGroup(config("seq_mean_token_mean", workers=2)) as group:
        metrics = [group.train_step(b, 1.0) for b in (full, tiny)]
        checkpoint = group.save(str(tmp_path / "two"), 2, {"sampler": {"position": 7}}, 1)
    assert [m["tokens/trained"] for m in metrics] == [10, 4]
    # Adam steps at lr 1e-3: Adam divides by the gradient's own size, so a float32 reduction-order
    # difference in a near-cancelling gradient entry becomes a visible weight difference (1.02e-5 measured
    # on some CPUs). 3e-5 is 3% of one step; a wrong scale or a dropped worker shard moves weights by ~1e-3.
    assert max_diff(saved_weights(checkpoint), after_two) < ADAM_STEPS_ATOL

    with TrainerGroup(config("seq_mean_token_mean", workers=1)) as fresh:
        state = fresh.resume(str(tmp_path / "two"))
        reloaded = fresh.save(str(tmp_path / "reloaded"), 2, {}, 1)
        fresh.train_step(full, 1.0)
        third = fresh.save(str(tmp_path / "reloaded"), 3, {}, 2)
    plain.train_step(full, 1.0)
    assert state["step"] == 2 and state["sampler"] == {"position": 7}
    assert max_diff(saved_weights(reloaded), saved_weights(checkpoint)) == 0
    assert max_diff(saved_weights(third), plain.model.state_dict()) < ADAM_STEPS_ATOL  # optimizer state came along


# --------------------------------------------------------------------------- FSDP2-sharded workers


def fsdp_config(workers: int, fsdp: bool = True) -> RLVRConfig:
    train = RLTrainConfig(lr=1e-3, gradient_checkpointing=False, micro_batch_tokens=16, minibatches=2,
                          workers=workers, num_cpus=1, threads=1, fsdp=FsdpConfig(enabled=fsdp))
    return RLVRConfig(model=ModelConfig(name="tiny-llama"), train=train,
                      algorithm=AlgorithmConfig(aggregation="token_mean"))


def folder_weights(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        out.update(load_file(path))
    return out


@pytest.mark.slow
def test_sharded_workers_make_the_update_of_one(ray_cluster, tiny_llama_dir, tmp_path):
    plain = in_process(fsdp_config(1, fsdp=False))
    # step 2's batch has one row: with two minibatches one worker has no rows at all and must
    # still join every gather (idle passes)
    batches = [make_batch(plain, ROWS, ADV, off_row=2), make_batch(plain, ROWS[:1], [1.0])]
    want = [plain.train_step(b, 1.0) for b in batches]
    expected = {k: v.clone() for k, v in plain.model.state_dict().items()}
    ids = [1, 5, 9, 100, 101, 102, 103]
    want_ref = plain.reference_logprobs(ids, 3)
    with TrainerGroup(fsdp_config(2)) as group:
        got = [group.train_step(b, 1.0) for b in batches]
        group.save(str(tmp_path / "two"), 2, {"sampler": {"position": 7}}, 1)
        ref = group.reference_logprobs(ids, 3)
        update = group.publish_weights(str(tmp_path))
        synced = folder_weights(update.path)
        exported = folder_weights(group.export(str(tmp_path / "export")))
    # same bound and reason as test_trainer_group's ADAM_STEPS_ATOL (Adam over float32 sum orders)
    assert max_diff(exported, expected) < ADAM_STEPS_ATOL
    assert "lm_head.weight" not in exported and "lm_head.weight" in synced  # tied head: sent to engines
    assert max_diff(synced, expected) < ADAM_STEPS_ATOL
    assert ref == pytest.approx(want_ref, abs=1e-4)
    assert [m["tokens/trained"] for m in got] == [m["tokens/trained"] for m in want] == [10, 4]
    for key in ("loss/pg", "train/grad_norm", "mismatch/logprob_abs_mean"):
        assert got[0][key] == pytest.approx(want[0][key], rel=1e-4, abs=1e-6), key

    with TrainerGroup(fsdp_config(1)) as fresh:  # sharded checkpoint from 2 workers, resumed by 1
        state = fresh.resume(str(tmp_path / "two"))
        fresh.train_step(batches[0], 1.0)
        third = folder_weights(fresh.export(str(tmp_path / "export1")))
    plain.train_step(batches[0], 1.0)
    assert state["step"] == 2 and state["sampler"] == {"position": 7}
    assert max_diff(third, plain.model.state_dict()) < ADAM_STEPS_ATOL  # optimizer state came along


@pytest.mark.slow
def test_sharded_lora_workers_make_the_update_of_one(ray_cluster, tiny_llama_dir, tmp_path):
    """LoRA under FSDP: the adapter trains sharded, the update sent to the engines is the adapter
    (gathered) and the export merges it layer by layer, as one plain LoRA worker does."""
    from posttrain.training.config import LoraConfig

    def lora_config(workers: int, fsdp: bool) -> RLVRConfig:
        return fsdp_config(workers, fsdp).model_copy(update={"lora": LoraConfig(enabled=True, r=4)})

    plain = in_process(lora_config(1, fsdp=False))
    batch = make_batch(plain, ROWS, ADV, off_row=2)
    plain.train_step(batch, 1.0)
    merged = folder_weights(plain.export(str(tmp_path / "plain")))
    adapter = folder_weights(plain.publish_weights(str(tmp_path)).path)
    with TrainerGroup(lora_config(2, fsdp=True)) as group:
        group.train_step(batch, 1.0)
        update = group.publish_weights(str(tmp_path))
        synced = folder_weights(update.path)
        exported = folder_weights(group.export(str(tmp_path / "sharded")))
    assert update.kind == "lora" and synced.keys() == adapter.keys()
    assert max_diff(synced, adapter) < ADAM_STEPS_ATOL
    assert exported.keys() == merged.keys() and max_diff(exported, merged) < ADAM_STEPS_ATOL
