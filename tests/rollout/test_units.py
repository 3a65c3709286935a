"""Fast checks without engines: budget adapter, sharding, config, pre-flight errors, LoRA merge."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.config import ConfigError, RolloutConfig, validate
from posttrain.rollout.budget import BudgetSpec, IncrementalBudget, replay_budget
from posttrain.rollout.pool import _shards
from posttrain.rollout.types import BackendUnsupportedError, ModelDoesNotFitError


def _run_budget(tokenizer, budget: int, steps: int, word: str = " word") -> tuple[list[int], IncrementalBudget]:
    """Greedy 'model' that always prefers ``word``; the budget must cut it off."""
    spec = BudgetSpec.build(tokenizer, budget)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
    proc = IncrementalBudget(spec, decode)
    favourite = tokenizer.encode(word, add_special_tokens=False)[0]
    out: list[int] = []
    for _ in range(steps):
        logits = torch.zeros(len(tokenizer))
        logits[favourite] = 5.0
        out.append(int(proc(out, logits).argmax()))  # vLLM passes the live output list
    return out, proc


def test_incremental_budget_forces_close_then_frees(tokenizer):
    out, proc = _run_budget(tokenizer, budget=8, steps=40)
    text = tokenizer.decode(out)
    _, closed, answer = text.partition("</think>")
    assert closed and answer.strip(), text
    assert proc.tracker.reasoning_tokens <= 8 + proc.tracker.spec.grace
    assert replay_budget(proc.tracker.spec, lambda ids: tokenizer.decode(ids), out)[0] == \
        proc.tracker.reasoning_tokens


def test_replay_finds_exactly_the_forced_closing_tag(tokenizer):
    out, proc = _run_budget(tokenizer, budget=8, steps=40)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    n, forced = replay_budget(proc.tracker.spec, decode, out)
    spec = proc.tracker.spec
    assert n == proc.tracker.reasoning_tokens and forced == list(range(n, n + len(forced)))
    assert tuple(out[k] for k in forced) in (spec.close_after_newline, spec.close_mid_line)
    natural = tokenizer.encode(" a b</think>\nok", add_special_tokens=False)  # closed by the model itself
    assert replay_budget(spec, decode, natural)[1] == []


def test_budget_zero_closes_at_once(tokenizer):
    out, proc = _run_budget(tokenizer, budget=0, steps=10)
    assert tokenizer.decode(out).startswith("</think>")
    assert proc.tracker.reasoning_tokens == 0


def test_shards_cover_in_order():
    assert _shards(5, 2) == [(0, 3), (3, 5)]
    assert _shards(1, 3) == [(0, 1), (1, 1), (1, 1)]
    assert _shards(0, 2) == [(0, 0), (0, 0)]


def test_rollout_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="num_engines"):
        validate(RolloutConfig, {"num_engines": 0})
    with pytest.raises(ConfigError, match="did you mean 'kv_cache_gib'"):
        validate(RolloutConfig, {"kv_cache_gb": 1})


def test_preflight_rejects_what_vllm_cpu_cannot_run(tmp_path, tiny_llama_dir, tiny_nemotron_dir):
    import json

    from posttrain.rollout.backend_vllm import check_supported

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "head_dim": 16}))
    with pytest.raises(BackendUnsupportedError, match="head_dim=16"):
        check_supported(str(tmp_path))
    check_supported(str(tiny_llama_dir))  # the built-in runs on vLLM-CPU
    with pytest.raises(BackendUnsupportedError, match="MoE"):
        check_supported(str(tiny_nemotron_dir))


def test_model_that_does_not_fit_is_refused(tiny_llama_dir):
    from posttrain.rollout.engine import check_fits

    with pytest.raises(ModelDoesNotFitError, match="kv_cache_gib=100000"):
        check_fits(str(tiny_llama_dir), RolloutConfig(kv_cache_gib=100000))


def test_lora_merge_is_w_plus_scaled_ba(tmp_path):
    from safetensors.torch import save_file

    from posttrain.rollout.lora import merged_state

    w, a, b = torch.randn(6, 4), torch.randn(2, 4), torch.randn(6, 2)
    prefix = "base_model.model.model.layers.0.q_proj"
    save_file({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 8}))
    merged = merged_state({"model.layers.0.q_proj.weight": w}, str(tmp_path))
    torch.testing.assert_close(merged["model.layers.0.q_proj.weight"], w + 4.0 * b @ a)


def test_request_seeds_follow_the_prompt_not_the_shard():
    from posttrain.rollout.types import request_seed

    seeds = {request_seed(0, p, i) for p in range(50) for i in range(16)}
    assert len(seeds) == 50 * 16
    assert request_seed(1, 0, 0) != request_seed(0, 0, 0)


@pytest.mark.parametrize(("fixture", "refused"), [("tiny_llama_dir", False), ("tiny_nemotron_dir", True)])
def test_hf_update_without_head_is_refused_unless_the_head_is_the_embedding(request, fixture, refused):
    """tiny-llama's head is its embedding, so an update may leave it out; NemotronH's config says
    tied but transformers keeps a separate head: an update without it would keep a stale head."""
    from posttrain.config import ModelConfig
    from posttrain.rollout.backend_hf import HFBackend
    from posttrain.rollout.types import RolloutError

    backend = HFBackend(request.getfixturevalue(fixture), ModelConfig(name="unused"), RolloutConfig())
    state = {k: v.clone() for k, v in backend.model.state_dict().items() if k != "lm_head.weight"}
    if refused:
        with pytest.raises(RolloutError, match="lm_head.weight"):
            backend._load(state)
    else:
        backend._load(state)
        assert backend.model.get_output_embeddings().weight is backend.model.get_input_embeddings().weight


def test_vllm_cast_warnings_are_dropped_only_for_the_asked_dtype():
    import logging

    import torch

    from posttrain.rollout.backend_vllm import _IntendedCast

    def record(msg, *args):
        return logging.LogRecord("vllm.model_executor.models.utils", logging.WARNING, __file__, 1, msg, args, None)

    cast = "Attempted to load weight %s with dtype %s into parameter with dtype %s"
    f = _IntendedCast("bfloat16")
    assert not f.filter(record(cast, "layers.0.mlp.up_proj.weight", torch.float32, torch.bfloat16))
    assert f.filter(record(cast, "layers.0.mlp.up_proj.weight", torch.float32, torch.float16))  # not asked: kept
    assert f.filter(record("Loading model weights took %.2f GiB", 0.5))
