"""The GenRM, RLHF and pipeline presets load, and their genrm environment options validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.config import load_config
from posttrain.genrm.config import GenRMTrainConfig, RLHFConfig
from posttrain.genrm.environment import GenRMOptions
from posttrain.pipeline import PipelineConfig

CONFIGS = Path(__file__).parents[2] / "configs"
PRESETS = [(RLHFConfig, p) for p in sorted((CONFIGS / "rlhf").glob("*.yaml"))] + \
          [(GenRMTrainConfig, p) for p in sorted((CONFIGS / "genrm").glob("*.yaml"))] + \
          [(PipelineConfig, p) for p in sorted((CONFIGS / "pipeline").glob("*.yaml"))]


def _genrm_options(cfg) -> list[GenRMOptions]:
    stages = [cfg.rlhf] if isinstance(cfg, PipelineConfig) else [cfg]
    return [GenRMOptions.model_validate(e.options) for s in stages for e in s.environments if e.name == "genrm"]


@pytest.mark.parametrize(("kind", "preset"), PRESETS, ids=[f"{p.parent.name}/{p.stem}" for _, p in PRESETS])
def test_presets_load_and_validate(kind, preset):
    cfg = load_config(kind, preset)
    for options in _genrm_options(cfg):
        # a local judge is named (or "auto" in the pipeline); a served one may leave it to the server
        assert options.judge.model or options.judge.backend != "local"


def test_smollm2_rlhf_judges_by_expectation_in_both_orders():
    for kind, name in ((RLHFConfig, "rlhf/smollm2_genrm.yaml"), (PipelineConfig, "pipeline/smollm2.yaml")):
        (options,) = _genrm_options(load_config(kind, CONFIGS / name))
        assert options.judge.scoring == "expected" and options.both_orders
