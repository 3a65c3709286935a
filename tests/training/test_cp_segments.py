"""The fused CPU path of CP attention: segments cover exactly each query's document past, the
log-sum-exp merge equals masked SDPA (values and gradients), and split documents keep the masked path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from posttrain.sft.packing import collate_packed
from posttrain.training import context_parallel as cp
from posttrain.training.cp_segments import SegmentAttention
from posttrain.training.loss import IGNORE_INDEX, causal_lm_nll_sum


def _packed(lengths: list[int]) -> dict[str, torch.Tensor]:
    docs = [(list(range(3, 3 + n)), [1] * n) for n in lengths]
    return collate_packed(docs)


def _allowed_keys(shard: cp.CPShard) -> dict[tuple[int, int], list[int]]:
    """(row, global query) -> the keys its segment's kernel calls let it see."""
    seen = {}
    for seg in shard.segments:
        for j in range(seg.start, seg.stop):
            q = seg.g0 + j - seg.start
            keys = []
            for k0, k1, causal in seg.parts():
                keys += [k for k in range(k0, k1) if not causal or k - k0 <= j - seg.start]
            seen[(seg.row, q)] = keys
    return seen


@pytest.mark.parametrize("size", [1, 2, 3])
def test_segments_see_exactly_their_documents_past(size: int) -> None:
    batch = _packed([5, 9, 10, 7])  # 31 tokens, padded to a multiple of 2 x size
    for rank in range(size):
        _, shard = cp.shard_batch(batch, size, rank)
        seen = _allowed_keys(shard)
        assert sorted(q for _, q in seen) == sorted(shard.index.tolist())  # every local query, once
        starts = [0, 5, 14, 24]
        for (_, q), keys in seen.items():
            if q >= 31:  # the padding tail added for the split: a run of its own
                assert keys == list(range(31, q + 1))
                continue
            first = max(s for s in starts if s <= q)
            assert keys == list(range(first, q + 1)), (rank, q)


def test_padding_between_pieces_of_a_document_keeps_the_masked_path() -> None:
    batch = {"input_ids": torch.arange(3, 11)[None], "labels": torch.arange(3, 11)[None],
             "attention_mask": torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1]])}
    _, shard = cp.shard_batch(batch, 1, 0)
    assert shard.segments is None
    right = dict(batch, attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]]))
    assert cp.shard_batch(right, 1, 0)[1].segments is not None


def _masked_reference(query, key, value, shard):
    """SDPA of the local queries against the whole row under the shard's document-causal mask."""
    length = key.shape[2]
    q_pos = shard.index[:, None]
    mask = (shard.doc[:, shard.index, None] == shard.doc[:, None, :]) & (torch.arange(length)[None] <= q_pos)[None]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None], enable_gqa=True)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_merged_segments_equal_masked_sdpa(dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(0)
    rows = [_packed([23, 40, 17])["position_ids"][0], torch.arange(80)]  # two rows, different layouts
    batch = {"input_ids": torch.zeros(2, 80, dtype=torch.long), "labels": torch.zeros(2, 80, dtype=torch.long),
             "position_ids": torch.stack(rows), "attention_mask": torch.tensor([[1] * 80, [1] * 70 + [0] * 10])}
    for rank in range(2):
        local, shard = cp.shard_batch(batch, 2, rank)
        assert shard.segments is not None
        t = local["input_ids"].shape[1]
        q = torch.randn(2, 4, t, 16, dtype=dtype, requires_grad=True)
        k = torch.randn(2, 2, 80, 16, dtype=dtype, requires_grad=True)
        v = torch.randn(2, 2, 80, 16, dtype=dtype, requires_grad=True)
        grad = torch.randn(2, 4, t, 16, dtype=dtype)
        ours = SegmentAttention.apply(q, k, v, shard.segments, None)
        ref = _masked_reference(q, k, v, shard)  # padding here is one contiguous run: same semantics
        torch.testing.assert_close(ours.float(), ref.float(), rtol=0, atol=tol)
        got = torch.autograd.grad(ours, (q, k, v), grad)
        want = torch.autograd.grad(ref, (q, k, v), grad)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=tol * 4)


def test_split_document_falls_back_and_matches_sdpa(tiny_llama_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = torch.randint(3, 4000, (1, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 12:17] = 0  # padding in the middle of the row: one document in two pieces
    labels = ids.clone()
    labels[0, 12:18] = IGNORE_INDEX  # nothing predicted from a padding position
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    ref, n_ref = causal_lm_nll_sum(model, batch, 16)
    nll, n = cp.cp_nll_sum(model, batch, None, 16)
    assert n == n_ref
    torch.testing.assert_close(nll, ref, rtol=0, atol=1e-5 * n)
