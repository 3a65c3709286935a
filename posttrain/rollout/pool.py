"""``RolloutPool``: the controller's handle on N rollout actors (data parallel).

Starts ``rollout-0 .. rollout-{N-1}`` as named Ray actors, spreads each batch of prompts over
them in contiguous shards, pushes weight updates to all of them and checks afterwards that the
engines' logprobs of a fixed sequence match the trainer's. Every call has a deadline, and a
dead engine surfaces as :class:`EngineCrashedError` naming it, never as a hang.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Literal

from posttrain.chat_template import Messages
from posttrain.config import EpisodeConfig, GenerationConfig, ModelConfig, RolloutConfig
from posttrain.orchestration import cluster
from posttrain.rollout.engine import EngineInfo, RolloutEngine
from posttrain.rollout.episodes import Dispatcher, EngineCall, EpisodeJob, EpisodeResult, play_jobs
from posttrain.rollout.types import (EngineCrashedError, EngineTimeoutError, GeneratedTokens, Rollout, RolloutError,
                                     SyncReport, TokenRequest, WeightUpdate)
from posttrain.rollout.weight_sync import ShmPublisher, sequence_logprobs, staged_files


@dataclass(frozen=True)
class LogprobCheck:
    """A fixed sequence and the trainer's logprobs of ``token_ids[start:]``, to compare after a sync."""

    token_ids: list[int]
    start: int
    logprobs: list[float]

    @classmethod
    def from_model(cls, model: Any, token_ids: list[int], start: int) -> LogprobCheck:
        return cls(list(token_ids), start, sequence_logprobs(model, list(token_ids), start))


class RolloutPool:
    """N engines behind one synchronous API: ``generate``, ``score``, ``sync_weights``, ``shutdown``."""

    def __init__(self, model: ModelConfig, cfg: RolloutConfig, *, name_prefix: str = "rollout",
                 placement: Any = None) -> None:
        """``placement``: a StagePlacement with a bundle per engine under the role ``name_prefix``."""
        cluster.init_ray()
        self.cfg, self.model = cfg, model
        self._tokenizer: Any = None
        self.names = [f"{name_prefix}-{r}" for r in range(cfg.num_engines)]
        self.actors: list[Any] = []
        self.publisher = ShmPublisher(cfg.sync_dir)
        self._live_lora: WeightUpdate | None = None
        self.policy_version = 0  # of the last update every engine applied (0: the weights they started with)
        try:
            for rank, name in enumerate(self.names):  # one at a time: vLLM start-up is CPU heavy
                slot = placement.slot(name_prefix, rank) if placement is not None else None
                actor = cluster.start_actor(RolloutEngine, name, model, cfg, rank, name, start=False,
                                            num_cpus=cfg.cpus_per_engine, num_gpus=cfg.gpus_per_engine,
                                            placement=slot,
                                            env={"OMP_NUM_THREADS": str(cfg.engine_threads())})
                self.actors.append(actor)
                self._gather([actor.start.remote()], [name], cfg.start_timeout_s, "start-up")
            self.infos: list[EngineInfo] = self._call("info", timeout=60)
        except BaseException:
            self.shutdown()
            raise

    # ----------------------------------------------------------------- generation

    def generate(self, prompts: list[Messages], gen: GenerationConfig, n: int | None = None) -> list[list[Rollout]]:
        """``n`` (default ``rollout.samples_per_prompt``) rollouts per prompt, in prompt order."""
        n = n or self.cfg.samples_per_prompt
        return self._sharded(len(prompts), lambda a, lo, hi: a.generate.remote(prompts[lo:hi], gen, n, lo))

    def extend(self, partials: list[Rollout], gen: GenerationConfig, max_tokens: list[int],
               indices: list[int]) -> list[Rollout]:
        """Cut completions continued under the engines' current weights (``RolloutEngine.extend``), in order;
        any engine can continue any of them."""
        return self._sharded(len(partials), lambda a, lo, hi: a.extend.remote(
            partials[lo:hi], gen, max_tokens[lo:hi], indices[lo:hi]))

    def _sharded(self, n_items: int, call: Callable[[Any, int, int], Any]) -> list[Any]:
        """``call(actor, lo, hi)`` on each engine's contiguous share of ``n_items``; the results in order."""
        refs, names = [], []
        for actor, name, (lo, hi) in zip(self.actors, self.names, _shards(n_items, len(self.actors))):
            if hi > lo:
                refs.append(call(actor, lo, hi))
                names.append(name)
        parts = self._gather(refs, names, self.cfg.call_timeout_s, "generate")
        return [item for part in parts for item in part]

    def play(self, jobs: list[EpisodeJob], gen: GenerationConfig, n: int, limits: EpisodeConfig) -> list[list[list[EpisodeResult]]]:
        """Multi-turn episodes, ``n`` per sample of every job, ``[job][sample][episode]``; an engine takes
        the next ready turns whenever it is free (see :class:`~posttrain.rollout.episodes.Dispatcher`)."""
        return asyncio.run(play_jobs(jobs, n, self.dispatcher(gen), self.tokenizer, gen, limits, self.cfg.max_model_len))

    def dispatcher(self, gen: GenerationConfig) -> Dispatcher:
        """An async ``generate(request)`` over all engines, for one event loop."""
        return Dispatcher([self._engine_call(a, name, gen) for a, name in zip(self.actors, self.names)])

    @property
    def tokenizer(self) -> Any:
        """The engines' tokenizer, here in the controller (episodes tokenise their observations here)."""
        if self._tokenizer is None:
            from posttrain import models

            self._tokenizer = models.tokenizer_for(self.model.model_copy(update={"name": models.resolve(self.model.name)}))
        return self._tokenizer

    def _engine_call(self, actor: Any, name: str, gen: GenerationConfig) -> EngineCall:
        async def call(requests: list[TokenRequest]) -> list[GeneratedTokens]:
            return await self._awaited(actor.generate_ids.remote(requests, gen), name, "generate")

        return call

    async def _awaited(self, ref: Any, name: str, what: str) -> Any:
        """A Ray call's result awaited on the event loop (no ``ray.get`` in async code), errors as in ``_gather``."""
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), self.cfg.call_timeout_s)
        except asyncio.TimeoutError:
            raise EngineTimeoutError(f"rollout engine {name}: {what} gave no answer within {self.cfg.call_timeout_s:g} s "
                                     "(rollout.call_timeout_s)") from None
        except RayActorError as exc:
            raise EngineCrashedError(f"rollout engine {name} died during {what}; the pool cannot continue, "
                                     "start a new one") from exc
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, Exception) else exc.as_instanceof_cause()) from None

    def score(self, sequences: list[list[int]], starts: list[int], engine: int = 0) -> list[list[float]]:
        """Teacher-forced logprobs from one engine (all engines hold the same weights)."""
        ref = self.actors[engine].score.remote(sequences, starts)
        return self._gather([ref], [self.names[engine]], self.cfg.call_timeout_s, "score")[0]

    # ----------------------------------------------------------------- weight sync

    def sync_weights(self, state: dict[str, Any], kind: Literal["full", "lora"] = "full", *,
                     lora_config: dict[str, Any] | None = None, check: LogprobCheck | None = None) -> SyncReport:
        """Push ``state`` (full weights, or a PEFT LoRA state with its config) into every engine.

        Engines reset their prefix cache; with ``check``, every engine scores the fixed sequence
        and the report carries the max |engine - trainer| logprob difference.
        """
        if not state:
            raise ValueError("sync_weights got an empty state dict; pass full_state_dict(model) "
                             "or get_peft_model_state_dict(peft_model)")
        start = time.perf_counter()
        update = self.publisher.publish(state, kind, lora_config)
        return self.push(update, check, started=start, fetch=lambda: _put(staged_files(update)))

    def push(self, update: WeightUpdate, check: LogprobCheck | None = None, *,
             started: float | None = None, fetch: Callable[[], Any] | None = None) -> SyncReport:
        """Apply an update someone already staged (e.g. the trainer wrote it to /dev/shm itself,
        so the weights never travel through this process); the staged folder is then released.

        ``fetch()`` returns the update's files (or a Ray ObjectRef of them) for engines on other
        nodes than the one that staged it: Ray moves the bytes node to node, once per node.
        """
        start = started if started is not None else time.perf_counter()
        if update.transport == "shm":
            try:
                seconds = self.apply(update, fetch)
            finally:
                if update.kind == "full":
                    self.publisher.release(update)
        else:  # broadcast into the engines already (rollout.transfer): what is left is the bookkeeping and the check
            seconds = []
        # A LoRA folder stays while it is the live adapter (vLLM may reload it lazily); the one it
        # replaces, or any adapter after a full update, is no longer referenced by the engines.
        if self._live_lora is not None:
            self.publisher.release(self._live_lora)
        self._live_lora = update if update.kind == "lora" else None
        self.policy_version = update.policy_version
        report = SyncReport(version=update.version, kind=update.kind, seconds=time.perf_counter() - start,
                            num_bytes=update.num_bytes, per_engine_seconds=dict(zip(self.names, seconds)))
        if check is not None:
            report.max_abs_logprob_diff = self.logprob_diff(check)
        return report

    def apply(self, update: WeightUpdate, fetch: Callable[[], Any] | None = None) -> list[float]:
        """Apply an already staged update on all engines at once; seconds per engine."""
        remote = [bool(update.node_id and info.node_id and info.node_id != update.node_id) for info in self.infos]
        if any(remote) and fetch is None:
            far = [n for n, r in zip(self.names, remote) if r]
            raise RolloutError(f"{', '.join(far)} run on another node than the staged weights ({update.path}); "
                               "pass fetch= so the bytes can travel through Ray")
        files = fetch() if any(remote) else None
        refs = [a.apply_weights.remote(update, files if far else None) for a, far in zip(self.actors, remote)]
        return self._gather(refs, self.names, self.cfg.call_timeout_s, "weight sync")

    def logprob_diff(self, check: LogprobCheck) -> float:
        """Max |engine - trainer| logprob over the check sequence and all engines."""
        refs = [a.score.remote([check.token_ids], [check.start]) for a in self.actors]
        results = self._gather(refs, self.names, self.cfg.call_timeout_s, "logprob check")
        return max(max(abs(a - b) for a, b in zip(r[0], check.logprobs)) for r in results)

    def sleep(self, level: int = 1) -> float:
        """Every engine frees its device memory (``rollout.enable_sleep_mode``); the slowest engine's seconds."""
        return max(self._call("sleep", level, timeout=self.cfg.call_timeout_s))

    def wake(self) -> float:
        return max(self._call("wake", timeout=self.cfg.call_timeout_s))

    # ----------------------------------------------------------------- life cycle

    def shutdown(self) -> None:
        """Stop every engine (vLLM engine cores first, so no /dev/shm segment leaks), then the actors."""
        import ray

        refs = [a.shutdown.remote() for a in self.actors]
        for ref in refs:
            try:
                ray.get(ref, timeout=60)
            except Exception:  # a dead engine has nothing left to free
                pass
        for actor in self.actors:
            cluster.kill_actor(actor)
        self.actors = []
        self.publisher.close()

    def __enter__(self) -> RolloutPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _call(self, method: str, *args: Any, timeout: float) -> list[Any]:
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        return self._gather(refs, self.names, timeout, method)

    def _gather(self, refs: list[Any], names: list[str], timeout: float, what: str) -> list[Any]:
        try:
            return cluster.gather(refs, names, timeout, what)
        except cluster.ActorDiedError as exc:
            raise EngineCrashedError(f"rollout engine {exc}; the pool cannot continue, start a new one") from exc
        except cluster.ActorTimeoutError as exc:
            raise EngineTimeoutError(f"rollout engine {exc} (rollout.call_timeout_s)") from exc


def _shards(n_items: int, n_parts: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges, sizes differing by at most one (prompt order is kept)."""
    base, extra = divmod(n_items, n_parts)
    bounds, lo = [], 0
    for part in range(n_parts):
        hi = lo + base + (1 if part < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _put(files: dict[str, bytes]) -> Any:
    """One copy in Ray's object store; every remote engine's call resolves the same ref."""
    import ray

    return ray.put(files)
