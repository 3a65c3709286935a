"""In-flight weight updates (``run.segment_tokens``): a sync that waits while the producer generates
lands at the next segment boundary, the cut completions continue under the new weights, and every
token's version is on record (``Rollout.version_changes``); other threads' calls are not cut."""

from __future__ import annotations

import threading
import time

import pytest

from posttrain.config import GenerationConfig, load_config
from posttrain.rlvr import actors
from posttrain.rlvr.config import RLVRConfig
from posttrain.rollout.types import Rollout

STOP_AT = {0: 6}  # prompt 0's completions stop after 6 tokens; the others run to max_new_tokens


def _made(p: int, i: int, tokens: list[int]) -> Rollout:
    """A completion that ran into its call's max_tokens ("length") unless its prompt stops it earlier."""
    stop = STOP_AT.get(p)
    tokens, reason = (tokens[:stop], "stop") if stop is not None and len(tokens) >= stop else (tokens, "length")
    return Rollout(p, i, [1, 2], tokens, [-0.5] * len(tokens), "", reason, None, "", True, 0)


class FakePool:
    """Each generated token is the policy version that sampled it; calls are logged in order."""

    def __init__(self, calls: list[str]) -> None:
        self.policy_version, self.calls = 0, calls
        self.entered, self.release = threading.Event(), threading.Event()
        self.release.set()

    def generate(self, prompts, gen, n):
        self.calls.append(f"generate {gen.max_new_tokens}")
        self.entered.set()
        self.release.wait(30)
        return [[_made(p, i, [self.policy_version] * gen.max_new_tokens) for i in range(n)]
                for p in range(len(prompts))]

    def extend(self, partials, gen, max_tokens, indices):
        self.calls.append(f"extend {len(partials)}")
        assert len(set(indices)) == len(indices)
        out = []
        for r, m in zip(partials, max_tokens):
            new = _made(r.prompt_index, r.sample_index, r.token_ids + [self.policy_version] * m)
            new.policy_version, new.version_changes = r.policy_version, list(r.version_changes)
            out.append(new)
        return out

    def shutdown(self) -> None:
        pass


@pytest.fixture
def engines(monkeypatch):
    calls: list[str] = []
    pool = FakePool(calls)
    monkeypatch.setattr(actors, "RolloutPool", lambda *a, **k: pool)

    def sync(pool_, trainer, sync_dir, probe=None):
        calls.append("sync")
        pool_.policy_version += 1

    monkeypatch.setattr(actors, "_sync", sync)
    cfg = load_config(RLVRConfig, overrides=["run.max_staleness=1", "run.segment_tokens=4"])
    return actors.Engines(cfg.model, cfg, trainer=None)


def test_a_waiting_sync_lands_between_segments_and_the_rest_is_sampled_by_the_new_weights(engines):
    pool, gen = engines.pool, GenerationConfig(max_new_tokens=12)
    pool.release.clear()
    out: list = []

    def produce() -> None:
        with engines.segmented(4):
            out.append(engines.generate(["a", "b"], gen, 2))

    producer = threading.Thread(target=produce)
    producer.start()
    assert pool.entered.wait(30)  # the first segment is being generated: a sync now has to wait
    syncing = threading.Thread(target=engines.sync)
    syncing.start()
    deadline = time.monotonic() + 30
    while engines._syncs_waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    pool.release.set()
    producer.join(30), syncing.join(30)
    groups = out[0]
    assert pool.calls == ["generate 4", "sync", "extend 4", "extend 2"]  # prompt 0 stopped at 6 tokens
    stopped, full = groups[0][0], groups[1][1]
    assert (stopped.token_ids, stopped.finish_reason) == ([0, 0, 0, 0, 1, 1], "stop")
    assert full.token_ids == [0] * 4 + [1] * 8 and full.finish_reason == "length"
    for r in (r for g in groups for r in g):  # the oldest version, and where the newer one took over
        assert (r.policy_version, r.version_changes) == (0, [(4, 1)])
        assert [(r.prompt_index, r.sample_index) for r in groups[r.prompt_index]] == [(r.prompt_index, 0), (r.prompt_index, 1)]


def test_without_a_sync_nothing_spans_and_calls_off_the_producer_thread_are_whole(engines):
    gen = GenerationConfig(max_new_tokens=10)
    with engines.segmented(4):
        groups = engines.generate(["a", "b"], gen, 1)
    assert engines.pool.calls == ["generate 4", "extend 2", "extend 1"]  # "b": 4 + 4 + 2 tokens
    assert groups[1][0].token_ids == [0] * 10 and groups[1][0].version_changes == []
    engines.pool.calls.clear()
    engines.generate(["b"], gen, 1)  # e.g. a held-out eval on the controller's thread
    assert engines.pool.calls == ["generate 10"]

