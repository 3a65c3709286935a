"""The pipeline on tiny-llama: all four stages chained through real Ray actors and vLLM, the
report, re-runs that skip finished stages, and fault tolerance (a killed trainer ends the run
cleanly and the re-run resumes with no lost or duplicated step; a killed sandbox actor is
recovered inside the run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main as cli
from posttrain.config import load_config
from posttrain.orchestration import cluster
from posttrain.rlvr.config import RLVRConfig

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "pipeline" / "tiny_smoke.yaml"


@pytest.fixture(autouse=True)
def _ray_down(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "rlvr"))  # toy_env
    yield
    cluster.shutdown_ray()


def steps_logged(run_dir: Path) -> list[int]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "time/gen_s" in r]


def test_pipeline_smoke_sft_then_rlvr_resumes_by_skipping_done_stages(tmp_path, tiny_llama_dir, capsys):
    """The CI smoke: two stages chained, the report, and a re-run that trains nothing again."""
    run = tmp_path / "run"
    args = ["pipeline", "--config", str(TINY), f"run_dir={run}", "stages=[sft,rlvr]", "sft_eval_prompts=0"]
    assert cli(args) == 0
    state = json.loads((run / "pipeline.json").read_text())["stages"]
    assert list(state) == ["sft", "rlvr"] and (run / "rlvr" / "model" / "config.json").is_file()
    assert yaml.safe_load((run / "rlvr" / "config.yaml").read_text())["init_from"] == str(run / "sft" / "model")
    assert (run / "report" / "index.html").is_file() and "eval/math/accuracy" in capsys.readouterr().out
    rlvr_rows = (run / "rlvr" / "metrics.jsonl").read_text()
    assert cli(args) == 0
    assert json.loads((run / "pipeline.json").read_text())["stages"] == state
    assert (run / "rlvr" / "metrics.jsonl").read_text() == rlvr_rows


@pytest.mark.slow  # 46 s; the DPO stage's own tests and the pipeline smoke stay in the fast set
def test_an_optional_dpo_stage_starts_from_sft_and_hands_its_model_on(tmp_path, tiny_llama_dir, capsys):
    """stages=[sft, dpo]: DPO trains in the actor dpo-0 from the SFT model, with its held-out before/after
    in the report; a following stage would start from the DPO model (plan)."""
    from posttrain.config import load_config
    from posttrain.pipeline import PipelineConfig, plan

    run = tmp_path / "run"
    dpo = ["dpo.data.limit=4", "dpo.data.test_limit=2", "dpo.train.max_steps=1", "dpo.train.batch_size=2",
           "dpo.train.max_length=256", "dpo.train.save_every=1"]
    assert cli(["pipeline", "--config", str(TINY), f"run_dir={run}", "stages=[sft,dpo]", "sft_eval_prompts=0",
                *dpo]) == 0
    state = json.loads((run / "pipeline.json").read_text())["stages"]
    assert list(state) == ["sft", "dpo"] and (run / "dpo" / "model" / "config.json").is_file()
    assert yaml.safe_load((run / "dpo" / "config.yaml").read_text())["init_from"] == str(run / "sft" / "model")
    rows = [json.loads(x) for x in (run / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/dpo/likelihood_accuracy" in r] == [0, 1]
    assert "eval/dpo/likelihood_accuracy" in capsys.readouterr().out  # the report's before/after
    cfg = load_config(PipelineConfig, TINY, [f"run_dir={run}", "stages=[sft,dpo,rlvr]"])
    assert dict(plan(cfg))[f"stage rlvr (run_dir {run / 'rlvr'})"].init_from == str(run / "dpo" / "model")


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_a_rerun_skips_them(tmp_path, tiny_llama_dir, capsys):
    run = tmp_path / "run"
    assert cli(["pipeline", "--config", str(TINY), f"run_dir={run}"]) == 0
    state = json.loads((run / "pipeline.json").read_text())["stages"]
    assert list(state) == ["sft", "rlvr", "genrm", "rlhf"] and all(s["status"] == "done" for s in state.values())
    for stage in state:
        assert (run / stage / "model" / "config.json").is_file() and (run / stage / "config.yaml").is_file()
        assert (run / stage / "metrics.jsonl").is_file()
    # each stage started from the previous one's model; the RLHF judge is the GenRM trained here
    assert yaml.safe_load((run / "rlvr" / "config.yaml").read_text())["init_from"] == str(run / "sft" / "model")
    rlhf = yaml.safe_load((run / "rlhf" / "config.yaml").read_text())
    assert rlhf["init_from"] == str(run / "rlvr" / "model")
    judge = rlhf["environments"][0]["options"]["judge"]
    assert (judge["model"], judge["prompt_style"]) == (str(run / "genrm" / "model"), "compact")  # as trained
    sft_rows = (run / "sft" / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(x) for x in sft_rows if "eval/math/accuracy" in x]
    assert len(evals) == 2  # held-out eval before and after SFT
    rlvr_start = [json.loads(x) for x in (run / "rlvr" / "metrics.jsonl").read_text().splitlines()
                  if json.loads(x)["step"] == 0 and "eval/math/accuracy" in x]
    assert len(rlvr_start) == 1  # RLVR's starting eval is SFT's final one, carried over, not repeated
    assert {k: v for k, v in rlvr_start[0].items() if k.startswith("eval/")} == \
        {k: v for k, v in evals[1].items() if k.startswith("eval/")}
    assert (run / "report" / "index.html").is_file()
    assert "eval/math/accuracy" in capsys.readouterr().out  # the before/after table
    # a re-run finds every stage done: nothing is trained again, the report is rebuilt
    assert cli(["pipeline", "--config", str(TINY), f"run_dir={run}"]) == 0
    assert json.loads((run / "pipeline.json").read_text())["stages"] == state
    assert (run / "sft" / "metrics.jsonl").read_text().splitlines() == sft_rows


def test_auto_judge_is_the_trained_genrm_prompted_as_it_was_trained():
    from posttrain.pipeline import PipelineConfig, stage_config

    cfg = load_config(PipelineConfig, TINY)
    rlhf = stage_config(cfg, "rlhf", {"genrm": "RUN/genrm/model", "rlvr": "RUN/rlvr/model"})
    assert rlhf.environments[0].options["judge"]["model"] == "RUN/genrm/model"
    assert rlhf.environments[0].options["judge"]["prompt_style"] == "compact"
    clash = load_config(PipelineConfig, TINY, ["rlhf.environments=[{name: genrm, options: {judge: "
                                               "{model: auto, prompt_style: rubric}}}]"])
    with pytest.raises(ValueError, match="prompt it learnt"):
        stage_config(clash, "rlhf", {"genrm": "RUN/genrm/model"})
    with pytest.raises(ValueError, match="no genrm stage"):
        stage_config(cfg, "rlhf", {"rlvr": "RUN/rlvr/model"})


def rlvr_config(run_dir: Path, steps: int, envs: str = '[{name: "toy_env:VowelEnv"}]') -> RLVRConfig:
    return load_config(RLVRConfig, ROOT / "configs" / "rlvr" / "tiny_smoke.yaml", [
        f"run_dir={run_dir}", f"run.steps={steps}", "run.prompts_per_step=2", "run.save_every=1",
        f"environments={envs}"])


@pytest.mark.slow
def test_killed_trainer_ends_the_run_cleanly_and_the_rerun_loses_and_repeats_no_step(tmp_path, tiny_llama_dir,
                                                                                     monkeypatch):
    import ray

    from posttrain.rlvr import loop

    real_step = loop.rl_step

    def killing_step(cfg, step, *args):
        if step == 2:  # after steps 1 and 2 are checkpointed, trainer-0 dies as step 3 starts
            ray.kill(ray.get_actor("trainer-0"), no_restart=True)
        return real_step(cfg, step, *args)

    monkeypatch.setattr(loop, "rl_step", killing_step)
    with pytest.raises(cluster.ActorDiedError, match="trainer-0"):
        loop.main(rlvr_config(tmp_path, 4))
    assert steps_logged(tmp_path) == [1, 2]
    assert not [a for a in ray.util.list_named_actors() if a.startswith(("trainer", "rollout"))]  # nothing leaked
    monkeypatch.setattr(loop, "rl_step", real_step)
    loop.main(rlvr_config(tmp_path, 4), resume=True)
    assert steps_logged(tmp_path) == [1, 2, 3, 4]
    assert (tmp_path / "checkpoints" / "step-00000004").is_dir() and (tmp_path / "model" / "config.json").is_file()


@pytest.mark.slow
def test_killed_sandbox_actor_is_recovered_inside_the_run(tmp_path, tiny_llama_dir, monkeypatch):
    import ray

    from posttrain.rlvr import loop

    real_step = loop.rl_step
    killed = []

    def killing_step(cfg, step, *args):
        if step == 1:  # Ray restarts it under the same name; its jobs are re-sent
            ray.kill(ray.get_actor("sandbox-0"), no_restart=False)
            killed.append(step)
        return real_step(cfg, step, *args)

    monkeypatch.setattr(loop, "rl_step", killing_step)
    last = loop.main(rlvr_config(tmp_path, 2, '[{name: code, options: {limit: 8}}]'))
    assert killed == [1] and steps_logged(tmp_path) == [1, 2]
    assert last.get("env/code/errors/infra", 0) == 0  # the dead actor cost no reward


def test_sft_eval_closes_its_environments_and_scores_code_with_the_rlvr_limits(tmp_path, monkeypatch, math_checkers):
    """The held-out eval around SFT opens the RLVR environments: their math checker processes end
    with it, and code is scored with the RLVR stage's sandbox.wall_s (no sandbox actors run here)."""
    import posttrain.rollout.pool as rollout_pool
    from posttrain import pipeline
    from posttrain.environments.code_env import CodeEnv

    class Pool:
        def __init__(self, *args, **kwargs):
            pass

        def generate(self, prompts, gen, n):
            from posttrain.rollout.types import Rollout

            text = "```python\ndef f():\n    return 1\n```\n\\boxed{3}"
            return [[Rollout(p, 0, [1], [2], [0.0], text, "stop", None, text, True, 0)] for p in range(len(prompts))]

        def shutdown(self):
            pass

    limits = []
    real_score = CodeEnv.score

    async def spying_score(self, sample, completion):
        limits.append(self._runner.limits.wall_s)
        return await real_score(self, sample, completion)

    monkeypatch.setattr(rollout_pool, "RolloutPool", Pool)
    monkeypatch.setattr(CodeEnv, "score", spying_score)
    cfg = load_config(pipeline.PipelineConfig, TINY, [
        f"run_dir={tmp_path}", "sft_eval_prompts=2", "rlvr.sandbox.wall_s=4.5",
        "rlvr.environments=[{name: math, options: {size: 4, test_size: 2}}, {name: code, options: {limit: 8}}]"])
    pipeline._log_eval(cfg, str(tmp_path / "sft"), "tiny-llama", step=0)
    rows = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert "eval/math/accuracy" in rows[0] and "eval/code/accuracy" in rows[0]
    assert math_checkers() == []
    assert limits == [4.5, 4.5]
