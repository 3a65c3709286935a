"""Exact packing through Mamba2: a packed row computes what its documents compute one by one."""

from __future__ import annotations

import pytest
import torch

from posttrain.training import mamba_packing as mp
from posttrain.training.loss import causal_lm_nll_sum

LENGTHS = [50, 130, 200]  # the tiny model's SSD chunk is 128: documents start and end inside and across chunks


def _docs(lengths=LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (n,), generator=g) for n in lengths]


def _packed(docs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.cat(docs)[None], "position_ids": torch.cat([torch.arange(len(d)) for d in docs])[None]}


def _labels(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[0] = -100  # a document's first token is never a target (as in sft.packing.collate_packed)
    return labels


@pytest.fixture(scope="module")
def nemotron(tiny_nemotron_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_nemotron_dir, dtype=torch.float32).eval()


def _fresh(tiny_nemotron_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_nemotron_dir, dtype=torch.float32).eval()


def _make_stateful(model) -> None:
    """Slow decay and larger B, C, x: at random init the SSM state is ~1e-8 of the output, which
    would let a missing state carry pass a 1e-5 check; here it moves outputs by ~1e-3."""
    with torch.no_grad():
        for mixer in (m for m in model.modules() if mp.supports(m)):
            mixer.A_log.fill_(-4.6)  # A = -0.01
            mixer.dt_bias.fill_(0.5)  # dt ~ 0.97
            mixer.in_proj.weight.mul_(8)


# --------------------------------------------------------------------------- documents


def test_seq_idx_from_positions_and_cu_seqlens() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 7, 8, 9, 10]])
    assert mp.seq_idx_from_position_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]]
    assert mp.seq_idx_from_position_ids(pos).dtype == torch.int32
    assert mp.seq_idx_from_cu_seqlens(torch.tensor([0, 3, 5, 6])).tolist() == [[0, 0, 0, 1, 1, 2]]
    with pytest.raises(ValueError, match="covers 6 tokens but the row has 7"):
        mp.seq_idx_from_cu_seqlens(torch.tensor([0, 3, 5, 6]), total=7)


# --------------------------------------------------------------------------- the ops


def _scan_inputs(t: int, seed: int = 0, b: int = 1, h: int = 4, p: int = 3, g: int = 2, n: int = 5):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return dict(x=r(b, t, h, p), dt=r(b, t, h), A=-torch.rand(h, generator=gen, dtype=torch.float64) * 2,
                B=r(b, t, g, n), C=r(b, t, g, n), D=r(h), dt_bias=r(h))


def _split(v: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    return list(v.split(lengths, dim=1))


def test_conv_resets_at_document_starts() -> None:
    lengths = [3, 9, 1, 6]
    x = torch.randn(2, 7, sum(lengths), dtype=torch.float64)
    w, bias = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].expand(2, -1)
    packed = mp.causal_conv1d(x, w, bias, "silu", seq_idx=seq)
    alone = torch.cat([mp.causal_conv1d(xi, w, bias, "silu") for xi in x.split(lengths, dim=-1)], dim=-1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-12)
    ref = torch.nn.functional.conv1d(x, w[:, None], bias, padding=3, groups=7)[..., : x.shape[-1]]
    ref = torch.nn.functional.silu(ref)
    torch.testing.assert_close(mp.causal_conv1d(x, w, bias, "silu", seq_idx=torch.zeros_like(seq)), ref)


def test_conv_continues_from_initial_state() -> None:
    x, w = torch.randn(1, 5, 20, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    whole = mp.causal_conv1d(x, w, None, None)
    second = mp.causal_conv1d(x[..., 12:], w, None, None, initial_states=x[..., 9:12])
    torch.testing.assert_close(second, whole[..., 12:])


@pytest.mark.parametrize("chunk", [4, 8, 64])
def test_scan_resets_at_document_starts(chunk: int) -> None:
    lengths = [5, 13, 1, 20, 8]  # starts mid-chunk, spans several chunks, one-token documents
    kw = _scan_inputs(sum(lengths))
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    common = dict(chunk_size=chunk, dt_softplus=True)
    packed, final = mp.chunk_scan(**kw, seq_idx=seq, return_final_states=True, **common)
    pieces = zip(*(_split(kw[k], lengths) for k in ("x", "dt", "B", "C")))
    alone = [mp.chunk_scan(x, dt, kw["A"], B, C, D=kw["D"], dt_bias=kw["dt_bias"], return_final_states=True, **common)
             for x, dt, B, C in pieces]
    torch.testing.assert_close(packed, torch.cat([y for y, _ in alone], dim=1), rtol=0, atol=1e-10)
    torch.testing.assert_close(final, alone[-1][1], rtol=0, atol=1e-10)  # the last document's state


def test_scan_continues_from_initial_state() -> None:
    """Context parallelism's building block: the second half started from the first half's state."""
    kw = _scan_inputs(40)
    common = dict(chunk_size=8, dt_softplus=True, return_final_states=True)
    whole, whole_final = mp.chunk_scan(**kw, **common)
    first = {k: v[:, :17] if v.dim() > 1 else v for k, v in kw.items()}
    second = {k: v[:, 17:] if v.dim() > 1 else v for k, v in kw.items()}
    y1, s1 = mp.chunk_scan(**first, **common)
    y2, s2 = mp.chunk_scan(**second, initial_states=s1, **common)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), whole)
    torch.testing.assert_close(s2, whole_final)


# --------------------------------------------------------------------------- the model


def test_packed_logits_equal_one_by_one(tiny_nemotron_dir) -> None:
    model, docs = _fresh(tiny_nemotron_dir), _docs()
    with torch.no_grad():
        alone = [model(input_ids=d[None], use_cache=False).logits[0] for d in docs]
        leaky = model(**_packed(docs), use_cache=False).logits[0]
        assert not mp.exact_packing_enabled(model)
        assert mp.enable_exact_packing(model) == 2 and mp.exact_packing_enabled(model)
        assert mp.enable_exact_packing(model.model) == 2  # idempotent, also through another wrapper
        assert list(model.model._forward_pre_hooks.values()).count(mp._add_seq_idx) == 1
        packed = model(**_packed(docs)).logits[0]  # use_cache left at its default: turned off for packed rows
    # before: transformers' mixer carries state from one document into the next
    assert (leaky[LENGTHS[0]:] - torch.cat(alone[1:])).abs().max() > 1e-2
    torch.testing.assert_close(packed, torch.cat(alone), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="use_cache=False"):
        model(**_packed(docs), use_cache=True)


@pytest.mark.parametrize("stateful", [False, True])
def test_packed_loss_and_gradients_equal_one_by_one(tiny_nemotron_dir, stateful: bool) -> None:
    """The training loss (token mean, as ``sft.train`` takes it) and every gradient, in training mode."""
    model, docs = _fresh(tiny_nemotron_dir), _docs(seed=1)
    if stateful:
        _make_stateful(model)
    mp.enable_exact_packing(model)
    model.train()  # the training path (dropout is 0 in this config)
    n_ref = sum(len(d) - 1 for d in docs)
    ref_nll = sum(causal_lm_nll_sum(model, {"input_ids": d[None], "labels": _labels(d)[None]})[0] for d in docs)
    ref_loss = ref_nll / n_ref
    ref_loss.backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    batch = _packed(docs) | {"labels": torch.cat([_labels(d) for d in docs])[None]}
    nll, n = causal_lm_nll_sum(model, batch)
    (nll / n).backward()
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert n == n_ref
    torch.testing.assert_close(nll / n, ref_loss, rtol=0, atol=1e-5)
    assert got.keys() == ref.keys() and any("A_log" in k for k in got) and any("conv1d" in k for k in got)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5, msg=k)


def test_one_document_rows_keep_transformers_path(nemotron) -> None:
    mp.enable_exact_packing(nemotron)
    d = _docs()[2]
    with torch.no_grad():
        plain = nemotron(input_ids=d[None], use_cache=False).logits
        ours = nemotron(input_ids=d[None], use_cache=False, seq_idx=torch.zeros(1, len(d), dtype=torch.int32)).logits
        cached = nemotron(input_ids=d[None], position_ids=torch.arange(len(d))[None]).logits  # generation prefill
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(cached, plain, rtol=0, atol=1e-5)


class _Recorder:
    """Stand-ins for causal_conv1d / mamba_ssm that record ``seq_idx`` and run the torch ops."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, torch.Tensor]] = []

    def conv(self, x, weight, bias=None, seq_idx=None, initial_states=None, activation=None):
        self.calls.append(("causal_conv1d_fn", seq_idx))
        return mp.causal_conv1d(x, weight, bias, activation, seq_idx=seq_idx, initial_states=initial_states)

    def scan(self, x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
             cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False):
        self.calls.append(("mamba_chunk_scan_combined", seq_idx))
        return mp.chunk_scan(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit, seq_idx=seq_idx,
                             initial_states=initial_states, return_final_states=return_final_states)

    def split(self, zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None,
              seq_idx=None, dt_limit=(0.0, float("inf")), return_final_states=False, activation="silu",
              rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
              ngroups=1, norm_before_gate=True):
        self.calls.append(("mamba_split_conv1d_scan_combined", seq_idx))
        assert norm_before_gate is False and headdim and ngroups and outproj_weight is None
        return torch.zeros(*zxbcdt.shape[:2], D.shape[0] * headdim)  # [B, T, heads x head_dim], before out_proj


def test_fused_kernels_receive_seq_idx(nemotron, monkeypatch) -> None:
    rec = _Recorder()
    kernels = mp.FusedKernels(rec.conv, rec.scan, rec.split)
    monkeypatch.setattr(mp, "fused_kernels", lambda device: kernels)
    mp.enable_exact_packing(nemotron)
    docs = _docs()
    expected = torch.repeat_interleave(torch.arange(3, dtype=torch.int32), torch.tensor(LENGTHS))[None]
    with torch.no_grad():
        packed = nemotron(**_packed(docs)).logits[0]
        alone = torch.cat([nemotron(input_ids=d[None], use_cache=False).logits[0] for d in docs])
    assert [name for name, _ in rec.calls] == ["causal_conv1d_fn", "mamba_chunk_scan_combined"] * 2
    for _, seq_idx in rec.calls:
        assert seq_idx.dtype == torch.int32 and seq_idx.is_contiguous() and torch.equal(seq_idx, expected)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    rec.calls.clear()
    nemotron.train()
    try:
        with torch.no_grad():
            nemotron(**_packed(docs))
    finally:
        nemotron.eval()
    assert [name for name, _ in rec.calls] == ["mamba_split_conv1d_scan_combined"] * 2
    assert all(torch.equal(s, expected) for _, s in rec.calls)


def test_fused_kernels_need_cuda() -> None:
    assert mp.fused_kernels(torch.device("cpu")) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("training", [False, True])
def test_fused_kernels_pack_exactly_on_cuda(tiny_nemotron_dir, monkeypatch, training: bool) -> None:
    """The real mamba_ssm / causal_conv1d kernels with seq_idx: packed == one by one, == the torch ops."""
    kernels = mp.fused_kernels(torch.device("cuda"))
    if kernels is None:
        pytest.skip("mamba_ssm and causal_conv1d are not installed")
    model = _fresh(tiny_nemotron_dir).cuda().train(training)
    _make_stateful(model)
    mp.enable_exact_packing(model)
    docs = [d.cuda() for d in _docs()]
    with torch.no_grad():
        packed = model(**{k: v.cuda() for k, v in _packed(docs).items()}).logits[0]
        alone = torch.cat([model(input_ids=d[None], use_cache=False).logits[0] for d in docs])
        monkeypatch.setattr(mp, "fused_kernels", lambda device: None)  # the pure-torch ops on the same device
        reference = model(**{k: v.cuda() for k, v in _packed(docs).items()}).logits[0]
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-3)  # kernels: tf32/fp32 reductions in their own order
    torch.testing.assert_close(packed, reference, rtol=0, atol=1e-3)
