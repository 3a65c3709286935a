"""Context parallelism: the load-balanced split, the global label shift, and CP=2 == CP=1 on tiny-llama.

The 2-rank tests spawn two gloo processes; each runs its shard, the gradients are summed over the
group (by FSDP2 in the sharded cases, one of them through ``training.parallel``'s dp_shard x cp
mesh and ``in_root``), and rank 0 compares loss, gradients and gathered token logprobs with one
process running the whole batch (SDPA).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.sft.packing import collate_packed, collate_padded
from posttrain.training import context_parallel as cp
from posttrain.training import parallel
from posttrain.training.config import FsdpConfig
from posttrain.training.loss import IGNORE_INDEX, causal_lm_nll_sum, in_root, shifted_targets, token_logprobs

TOL = 1e-5


def _docs(lengths: list[int], seed: int) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        ids = torch.randint(3, 4000, (n,), generator=g).tolist()
        prompt = n // 5  # a prompt without loss, then the answer
        docs.append((ids, [0] * prompt + [1] * (n - prompt)))
    return docs


def _batch(case: dict) -> dict[str, torch.Tensor]:
    docs = _docs(case["lengths"], case.get("seed", 0))
    return collate_packed(docs) if case["mode"] == "pack" else collate_padded(docs, pad_id=0)


# --------------------------------------------------------------------------- the split, one process


def test_load_balanced_chunks() -> None:
    # 2N = 4 chunks of 3: rank 0 takes chunks 0 and 3, rank 1 chunks 1 and 2
    assert cp.load_balanced_indices(12, 2, 0).tolist() == [0, 1, 2, 9, 10, 11]
    assert cp.load_balanced_indices(12, 2, 1).tolist() == [3, 4, 5, 6, 7, 8]
    every = torch.cat([cp.load_balanced_indices(48, 4, r) for r in range(4)])
    assert sorted(every.tolist()) == list(range(48))
    with pytest.raises(ValueError, match="multiple of 2 x cp size"):
        cp.load_balanced_indices(10, 2, 0)


def test_document_ids_follow_position_restarts() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    assert cp.document_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    assert cp.document_ids(torch.arange(8)[None], mask).tolist() == [[0] * 6 + [cp.PAD_DOC] * 2]


def test_shards_keep_global_positions_and_globally_shifted_labels() -> None:
    batch = _batch({"mode": "pack", "lengths": [7, 9, 5]})  # 21 tokens -> padded to 24, chunks of 6
    targets = shifted_targets(batch["labels"])[0]
    seen = {}
    for rank in range(2):
        local, shard = cp.shard_batch(batch, 2, rank)
        assert local["input_ids"].shape == (1, 12)
        for j, g in enumerate(shard.index.tolist()):
            seen[g] = local["targets"][0, j].item()
            if g < 21:
                assert local["position_ids"][0, j] == batch["position_ids"][0, g]
                assert local["input_ids"][0, j] == batch["input_ids"][0, g]
    # token 5 (rank 0's last of chunk 0) predicts token 6, which lives on rank 1
    assert seen[5] == targets[5] != IGNORE_INDEX
    assert [seen[g] for g in range(21)] == targets.tolist()
    assert all(seen[g] == IGNORE_INDEX for g in range(21, 24))  # the padded tail carries no loss


def test_take_lines_up_row_values_with_the_local_targets() -> None:
    batch = _batch({"mode": "pack", "lengths": [7, 9, 5]})  # 21 tokens -> 24
    row = torch.arange(21.0)[None] * 10  # e.g. an advantage per token, aligned to the token it scores
    for rank in range(2):
        local, shard = cp.shard_batch(batch, 2, rank)
        plain, shifted = shard.take(row, fill=-1.0), shard.take(row, fill=-1.0, shifted=True)
        for j, g in enumerate(shard.index.tolist()):
            assert plain[0, j] == (row[0, g] if g < 21 else -1)
            assert shifted[0, j] == (row[0, g + 1] if g + 1 < 21 else -1)  # the token local j predicts


@pytest.mark.parametrize("query_block", [2, 4, 100])
def test_query_blocks_see_exactly_their_documents_past(query_block: int) -> None:
    batch = _batch({"mode": "pack", "lengths": [5, 9, 10]})  # 24 tokens, chunks of 6
    for rank in range(2):
        _, shard = cp.shard_batch(batch, 2, rank, query_block=query_block)
        covered = []
        for start, stop, k0, k1 in shard.blocks:
            mask = shard.mask(start, stop, k0, k1)[0, 0]  # [q, k1 - k0]
            for i, q in enumerate(shard.index[start:stop].tolist()):
                covered.append(q)
                doc = 0 if q < 5 else 1 if q < 14 else 2
                first = (0, 5, 14)[doc]
                assert k0 <= first and k1 == shard.index[stop - 1] + 1  # every allowed key is in range
                allowed = [k0 + j for j in range(k1 - k0) if mask[i, j]]
                assert allowed == list(range(first, q + 1)), (rank, q)
        assert covered == shard.index.tolist()


def test_cp_size_one_equals_sdpa(tiny_llama_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    batch = _batch({"mode": "pack", "lengths": [40, 57, 30]})
    ref, n_ref = causal_lm_nll_sum(model, batch, 64)
    ref.backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    nll, n = cp.cp_nll_sum(model, batch, None, 64)
    nll.backward()
    assert n == n_ref and model.config._attn_implementation == cp.CP_ATTENTION
    # per token: the sum (~1100) is only resolved to ~1.2e-4 in fp32 (one ulp), and summation order may move it
    torch.testing.assert_close(nll / n, ref / n_ref, rtol=0, atol=TOL)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[k], rtol=0, atol=TOL, msg=k)


def test_left_padded_rows_match_sdpa(tiny_llama_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    right = _batch({"mode": "pad", "lengths": [30, 45, 12], "seed": 6})
    lengths = right["attention_mask"].sum(1)
    batch = {k: torch.stack([row.roll(int(right["input_ids"].shape[1] - n)) for row, n in zip(v, lengths)])
             for k, v in right.items()}  # the same rows, padding moved to the left
    ref, n_ref = causal_lm_nll_sum(model, batch, 64)
    nll, n = cp.cp_nll_sum(model, batch, None, 64)
    assert n == n_ref
    torch.testing.assert_close(nll, ref, rtol=0, atol=TOL * n)


def test_plain_passes_after_enabling_cp_are_sdpa(tiny_llama_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    batch = _batch({"mode": "pack", "lengths": [20, 31]})
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    want = model(**inputs).logits
    cp.enable_context_parallel(model)  # evaluation and generation on the same model stay exact
    torch.testing.assert_close(model(**inputs).logits, want, rtol=0, atol=0)


def test_nemotron_h_runs_and_other_recurrent_layers_are_refused(tiny_llama_dir, tiny_nemotron_dir) -> None:
    from transformers import AutoModelForCausalLM

    from posttrain.training import mamba_packing

    batch = _batch({"mode": "pack", "lengths": [40, 60]})
    model = AutoModelForCausalLM.from_pretrained(tiny_nemotron_dir, dtype=torch.float32)
    nll, n = cp.cp_nll_sum(model, batch, None, 64)  # Mamba2 mixers: CP forward from mamba_packing
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_nemotron_dir, dtype=torch.float32)
    mamba_packing.enable_exact_packing(ref_model)
    ref, n_ref = causal_lm_nll_sum(ref_model, batch, 64)
    assert n == n_ref
    torch.testing.assert_close(nll, ref, rtol=0, atol=TOL * n)

    class RwkvBlock(torch.nn.Module):  # a recurrent layer CP has no state passing for
        pass

    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    llama.model.layers[0].add_module("rnn", RwkvBlock())
    with pytest.raises(ConfigError, match=r"RwkvBlock layers carry a state.*context_parallel=1"):
        cp.cp_nll_sum(llama, batch, None)


# --------------------------------------------------------------------------- 2 gloo ranks


def _shard_blocks(model, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
        layer.set_gradient_divide_factor(1.0)  # the loss is already divided by the global count
        layer.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM


def _logprobs(model, batch, group):
    return cp.cp_token_logprobs(model, batch, group, chunk_size=256)


def _worker(rank: int, world: int, init_file: str, model_dir: str, cases: list[dict], out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))  # a cp group that is not the default one
    results = []
    for case in cases:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if case.get("checkpointing"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if case.get("fsdp"):  # the cp ranks also shard the blocks (FSDP2), as the dp_shard x cp mesh does
            _shard_blocks(model, world)
        cp_group = group
        if case.get("parallel"):  # training.parallel's mesh (dp_shard 1 x cp 2) and FSDP2 on blocks + root
            par = parallel.Parallel(rank=rank, world=world, cp=world, mesh=parallel.build_mesh(world, cp=world))
            model = parallel.shard_model(model, par, FsdpConfig(enabled=True))
            cp_group = par.cp_group()
        model.train()
        batch = _batch(case)
        nll, count = in_root(model, cp.cp_nll_sum, model, batch, cp_group, 256, 0, case.get("query_block"))
        (nll / count).backward()
        loss = nll.detach().reshape(1)
        dist.all_reduce(loss, group=cp_group)
        grads = {}
        for k, p in model.named_parameters():
            assert p.grad is not None, (case["name"], k)
            if hasattr(p.grad, "full_tensor"):  # sharded: FSDP already summed it over the ranks
                grads[k] = p.grad.full_tensor()
            else:
                grads[k] = p.grad
                dist.all_reduce(grads[k], group=cp_group)
        with torch.no_grad():  # the RL passes: local logprobs, gathered back into row order
            logprobs, keep, shard = in_root(model, _logprobs, model, batch, cp_group)
            full = cp.gather_sequence(logprobs, shard, batch["input_ids"].shape[1])  # [B, T]
            full_keep = cp.gather_sequence(keep, shard, batch["input_ids"].shape[1])
            assert torch.equal(shard.take(full), logprobs)
        if rank == 0:
            ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            ref_nll, ref_count = causal_lm_nll_sum(ref_model, batch, 256)
            (ref_nll / ref_count).backward()
            targets = shifted_targets(batch["labels"])
            ref_keep = targets != IGNORE_INDEX
            with torch.no_grad():
                hidden = ref_model.model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"),
                                         attention_mask=batch.get("attention_mask"), use_cache=False).last_hidden_state
                ref_lp = token_logprobs(hidden[ref_keep], ref_model.lm_head.weight, targets[ref_keep])
            results.append({
                "name": case["name"], "count": count, "ref_count": ref_count,
                "loss": float(loss) / count, "ref_loss": float(ref_nll) / ref_count,
                "max_grad_diff": max(float((grads[k] - p.grad).abs().max()) for k, p in ref_model.named_parameters()),
                "same_keep": bool(torch.equal(full_keep, ref_keep)),
                "max_logprob_diff": float((full[ref_keep] - ref_lp).abs().max()),
                "max_grad": max(float(p.grad.abs().max()) for p in ref_model.parameters()),
            })
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _run_two_ranks(tmp_path: Path, model_dir: Path, cases: list[dict]) -> list[dict]:
    import torch.multiprocessing as mp

    out = tmp_path / "results.json"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(model_dir), cases, str(out)), nprocs=2, join=True)
    return json.loads(out.read_text())


def _assert_equal_to_cp1(results: list[dict]) -> None:
    for r in results:
        assert r["count"] == r["ref_count"], r
        assert abs(r["loss"] - r["ref_loss"]) <= TOL, r
        assert r["max_grad_diff"] <= TOL, r
        assert r["same_keep"] and r["max_logprob_diff"] <= TOL, r
        print(f"{r['name']}: loss {r['loss']:.6f} (|diff| {abs(r['loss'] - r['ref_loss']):.2e}), "
              f"max grad diff {r['max_grad_diff']:.2e} (max |grad| {r['max_grad']:.2e}), "
              f"max logprob diff {r['max_logprob_diff']:.2e}")


def test_cp2_equals_cp1_on_packed_documents_across_ranks(tmp_path, tiny_llama_dir) -> None:
    cases = [
        # 1021 tokens -> padded to 1024, chunks of 256 at 256/512/768: every document crosses a
        # chunk seam and rank 0 holds [0, 256) + [768, 1024), rank 1 [256, 768)
        {"name": "packed-1K", "mode": "pack", "lengths": [300, 411, 310], "query_block": 100},
        {"name": "padded-rows", "mode": "pad", "lengths": [150, 97, 201], "seed": 1},
        {"name": "packed-checkpointing", "mode": "pack", "lengths": [130, 190], "seed": 2, "checkpointing": True},
        {"name": "packed-fsdp", "mode": "pack", "lengths": [200, 157], "seed": 4, "fsdp": True},
        {"name": "packed-parallel-fsdp", "mode": "pack", "lengths": [180, 201], "seed": 5, "parallel": True},
    ]
    _assert_equal_to_cp1(_run_two_ranks(tmp_path, tiny_llama_dir, cases))


@pytest.mark.slow
def test_cp2_equals_cp1_at_8k_tokens(tmp_path, tiny_llama_dir) -> None:
    cases = [{"name": "packed-8K", "mode": "pack", "lengths": [3000, 2500, 2692], "seed": 3}]
    _assert_equal_to_cp1(_run_two_ranks(tmp_path, tiny_llama_dir, cases))
