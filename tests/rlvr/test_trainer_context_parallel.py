"""``train.context_parallel=2`` in the RL trainer: 2 workers splitting every row (logprob, old-logprob and
loss passes) make the update of one in-process trainer, replicated and FSDP2-sharded (gloo, no Ray)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from posttrain.rlvr.config import RLTrainConfig
from posttrain.rlvr.trainer import PolicyTrainer
from posttrain.training.config import FsdpConfig

from posttrain.orchestration import cluster
from posttrain.rlvr.trainer_group import TrainerGroup
from test_trainer_group import (ADAM_STEPS_ATOL, ADV, RAY_TEMP_DIR, ROWS, config, in_process, make_batch, max_diff,
                                saved_weights)

# two minibatches (the old-logprob pass runs), sequence means (the count is the minibatch's), a masked row
AGGREGATION, MINIBATCHES = "seq_mean_token_mean", 2


@pytest.fixture(scope="module")
def ray_cluster():
    cluster.init_ray(temp_dir=RAY_TEMP_DIR, num_cpus=4)
    yield
    cluster.shutdown_ray()


def test_context_parallel_must_divide_the_workers() -> None:
    with pytest.raises(ValueError, match=r"train.context_parallel=2 must divide train.workers \(3\)"):
        RLTrainConfig(workers=3, context_parallel=2)


def _cp_config(fsdp: bool, workers: int = 2):
    cfg = config(AGGREGATION, workers=workers, minibatches=MINIBATCHES)
    train = cfg.train.model_copy(update={"context_parallel": 2, "fsdp": FsdpConfig(enabled=fsdp)})
    return cfg.model_copy(update={"train": train})


def _worker(rank: int, address: str, fsdp: bool, world: int, batches: list, out: str) -> None:
    cfg = _cp_config(fsdp, world)
    trainer = PolicyTrainer(cfg.start_model(), cfg.train, cfg.lora, cfg.loss_config(), cfg.run.seed)
    trainer.join_group(address, rank, world, 120.0)
    metrics = [trainer.train_step(b, 1.0) for b in batches]
    weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in trainer.model.state_dict().items()}
    if rank == 0:
        torch.save({"weights": weights, "metrics": metrics}, out)
    trainer.leave_group()


@pytest.mark.slow
@pytest.mark.parametrize("fsdp,world", [(False, 2), (True, 2), (True, 4)])  # 4: dp_shard 2 x cp 2
def test_context_parallel_workers_make_the_update_of_one(tmp_path, tiny_llama_dir, fsdp, world) -> None:
    import torch.multiprocessing as mp

    plain = in_process(config(AGGREGATION, minibatches=MINIBATCHES))
    batches = [make_batch(plain, ROWS, ADV, off_row=2), make_batch(plain, ROWS[:4], ADV[:4])]
    want = [plain.train_step(b, 1.0) for b in batches]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    out = tmp_path / "rank0.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(address, fsdp, world, batches, str(out)), nprocs=world, join=True)
    got = torch.load(out)
    diff = max_diff(got["weights"], plain.model.state_dict())
    print(f"cp=2 RL trainer ({world} workers, fsdp={fsdp}) vs in-process: max weight diff {diff:.2e}; "
          f"{json.dumps([{k: m[k] for k in ('loss/pg', 'tokens/trained')} for m in got['metrics']])}")
    assert diff < ADAM_STEPS_ATOL
    for g, w in zip(got["metrics"], want):
        assert g["tokens/trained"] == w["tokens/trained"]
        assert g["mismatch/masked_sequences"] == w["mismatch/masked_sequences"]
        for key in ("loss/pg", "loss/is_weight_mean", "train/grad_norm", "mismatch/logprob_abs_mean",
                    "mismatch/logprob_abs_max", "mismatch/seq_error_max"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_context_parallel_trainer_group(ray_cluster, tiny_llama_dir, tmp_path) -> None:
    """The same through the Ray workers the RL loop runs (``TrainerGroup``: trainer-0 and trainer-1, one cp pair)."""
    plain = in_process(config(AGGREGATION, minibatches=MINIBATCHES))
    batches = [make_batch(plain, ROWS, ADV, off_row=2), make_batch(plain, ROWS[:4], ADV[:4])]
    want = [plain.train_step(b, 1.0) for b in batches]
    with TrainerGroup(_cp_config(fsdp=False)) as group:
        got = [group.train_step(b, 1.0) for b in batches]
        checkpoint = group.save(str(tmp_path / "cp"), 2, {}, 1)
    diff = max_diff(saved_weights(checkpoint), plain.model.state_dict())
    print(f"cp=2 TrainerGroup vs in-process: max weight diff {diff:.2e}")
    assert diff < ADAM_STEPS_ATOL
    assert [m["tokens/trained"] for m in got] == [w["tokens/trained"] for w in want]
    assert got[0]["loss/pg"] == pytest.approx(want[0]["loss/pg"], rel=1e-4, abs=1e-6)
