"""Placement groups: one per stage, one bundle per actor, reserved before any actor starts.

A stage asks for every role's resources at once (``trainer``: 1 bundle per worker, ``rollout``:
1 per engine, ``sandbox``: 1 per verifier actor). Ray reserves them atomically, so a stage
either gets all it needs or fails at start-up with a message that says what was asked and
what the cluster has -- instead of half the actors starting and the rest waiting forever.
The same code places actors on a laptop (local Ray, strategy PACK) and spreads them over a
cluster's nodes (``SPREAD`` / ``STRICT_SPREAD``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)
Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


def bundle(cpus: float, gpus: float = 0) -> dict[str, float]:
    """One actor's reservation: ``{"CPU": cpus}``, with ``"GPU"`` only when it asks for some."""
    return {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}


@dataclass(frozen=True)
class Slot:
    """Where one actor runs: bundle ``bundle`` of placement group ``pg``."""

    pg: Any
    bundle: int

    def scheduling_strategy(self) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=self.bundle,
                                                placement_group_capture_child_tasks=True)


class StagePlacement:
    """Reserve ``roles`` = {role: [bundle, ...]} (a bundle is e.g. ``{"CPU": 1}``) as one group."""

    def __init__(self, stage: str, roles: dict[str, list[dict[str, float]]], *, strategy: Strategy = "PACK",
                 timeout_s: float = 120.0) -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.stage = stage
        self.index: dict[tuple[str, int], int] = {}
        bundles: list[dict[str, float]] = []
        for role, role_bundles in roles.items():
            for i, bundle in enumerate(role_bundles):
                clean = {k: float(v) for k, v in bundle.items() if v}
                if not clean:
                    raise ValueError(f"{stage}: bundle {role}-{i} reserves nothing ({bundle}); give it a CPU share > 0")
                self.index[(role, i)] = len(bundles)
                bundles.append(clean)
        self.bundles = bundles
        self.pg = placement_group(bundles, strategy=strategy, name=f"posttrain-{stage}")
        ready, _ = ray.wait([self.pg.ready()], timeout=timeout_s)
        if not ready:
            ray.util.remove_placement_group(self.pg)
            raise RuntimeError(_unplaceable(stage, roles, ray.cluster_resources(), timeout_s))
        log.info("%s: placement group reserved %s", stage, _describe(roles))

    def slot(self, role: str, i: int = 0) -> Slot:
        try:
            return Slot(self.pg, self.index[(role, i)])
        except KeyError:
            have = sorted({r for r, _ in self.index})
            raise LookupError(f"{self.stage}: no bundle {role}-{i} reserved (roles: {have})") from None

    def cpus(self, role: str, i: int = 0) -> float:
        return self.bundles[self.slot(role, i).bundle].get("CPU", 0.0)

    def remove(self) -> None:
        import ray
        from ray.util import remove_placement_group

        if ray.is_initialized():
            try:
                remove_placement_group(self.pg)
            except Exception as exc:  # already gone with the cluster
                log.debug("placement group removal: %s", exc)


def _describe(roles: dict[str, list[dict[str, float]]]) -> str:
    return ", ".join(f"{role} {len(b)}x{b[0]}" for role, b in roles.items() if b)


def total(roles: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """What ``roles`` reserve together, by resource (``{"CPU": 3.0, "GPU": 4.0}``)."""
    want: dict[str, float] = {}
    for role_bundles in roles.values():
        for reserved in role_bundles:
            for k, v in reserved.items():
                want[k] = want.get(k, 0.0) + float(v)
    return want


def _unplaceable(stage: str, roles: dict[str, list[dict[str, float]]], have: dict[str, float], timeout: float) -> str:
    want = total(roles)
    return (f"{stage}: the cluster could not reserve {_describe(roles)} within {timeout:g} s "
            f"(asked in total {want}, cluster has {dict(have)}); lower the per-role reservations "
            "(train.num_cpus, rollout.cpus_per_engine, verifier.num_cpus) or add nodes")
