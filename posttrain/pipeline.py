"""`posttrain pipeline`: SFT -> (DPO) -> RLVR -> (GenRM training) -> RLHF as one Ray job, with a report.

Each stage runs in ``RUN/<stage>/`` with its own resolved config, metrics, TensorBoard events,
checkpoints and final model (``RUN/<stage>/model``), and starts from the previous stage's
model. ``RUN/pipeline.json`` records finished stages (written atomically after a stage's final
model): re-running the same command skips them and resumes the current stage from its last
checkpoint, so a crash or Ctrl-C costs at most the steps since that checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.atomic import atomic_write_text
from posttrain.config import SFT_STAGE_S, Config, Logger, ModelConfig, write_resolved
from posttrain.errors import ConfigError
from posttrain.metrics import RayGauges, log_once
from posttrain.genrm.config import GenRMTrainConfig, RLHFConfig, trained_prompt_style
from posttrain.preference.config import DPOStageConfig
from posttrain.rlvr.config import RLVRConfig
from posttrain.sft.config import SFTConfig

log = logging.getLogger(__name__)
StageName = Literal["sft", "dpo", "rlvr", "genrm", "rlhf"]
ORDER: tuple[str, ...] = ("sft", "dpo", "rlvr", "genrm", "rlhf")
DEFAULT_STAGES = ("sft", "rlvr", "genrm", "rlhf")  # dpo is optional: stages=[sft,dpo,rlvr,genrm,rlhf]
# where a stage's starting weights come from: the last of these that ran (else its own init_from)
PREVIOUS = {"dpo": ("sft",), "rlvr": ("dpo", "sft"), "rlhf": ("rlvr", "dpo", "sft")}
TRAINERS = ("sft", "dpo")  # stages that train in one Ray actor (<stage>-0), without environments
AUTO = "auto"  # genrm.options.judge.model: the model the pipeline's genrm stage trained


class PipelineTimeoutsConfig(Config):
    """Deadlines of the pipeline's own calls (each RL stage has its own ``timeouts`` section)."""

    sft_stage_s: float = Field(SFT_STAGE_S, gt=0, description=(
        "the whole SFT stage in its Ray actor sft-0; past it the pipeline stops with an error naming "
        "the actor (re-running resumes SFT from its last checkpoint)"))
    dpo_stage_s: float = Field(SFT_STAGE_S, gt=0, description="the whole DPO stage in its Ray actor dpo-0")


class PipelineConfig(Config):
    """The whole post-training recipe; each stage's section is that stage's own config."""

    model: ModelConfig = ModelConfig()
    stages: list[StageName] = Field(default_factory=lambda: list(DEFAULT_STAGES), description=(
        "stages to run, in the order " + " -> ".join(ORDER) + " (dpo is optional)"))
    sft: SFTConfig = SFTConfig()
    dpo: DPOStageConfig = DPOStageConfig()
    rlvr: RLVRConfig = RLVRConfig()
    genrm: GenRMTrainConfig = GenRMTrainConfig()
    rlhf: RLHFConfig = RLHFConfig()
    sft_eval_prompts: int = Field(50, ge=0, description=(
        "held-out prompts per RLVR environment scored greedily before and after SFT (0 = skip)"))
    run_dir: str = Field("runs/pipeline", description="run folder: one subfolder per stage, report/")
    dashboard: bool = Field(True, description="start Ray's dashboard with a local cluster (127.0.0.1 only)")
    metrics_port: int | None = Field(None, ge=1, le=65535, description=(
        "Ray's Prometheus metrics port (None = a free port, logged with the curl line at start)"))
    timeouts: PipelineTimeoutsConfig = PipelineTimeoutsConfig()
    loggers: list[Logger] | None = Field(None, description=(
        "every stage's loggers, e.g. [jsonl, tensorboard, wandb] (None = each stage's own setting)"))

    def model_post_init(self, context: Any) -> None:
        """``loggers`` reaches every stage's own setting (``sft.loggers``, ``<stage>.run.loggers``)."""
        if self.loggers is not None:
            self.sft.loggers = list(self.loggers)
            self.dpo.loggers = list(self.loggers)
            for section in (self.rlvr, self.genrm, self.rlhf):
                section.run.loggers = list(self.loggers)

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if not self.stages:
            raise ValueError("stages must list at least one of " + ", ".join(ORDER))
        if [s for s in ORDER if s in self.stages] != list(self.stages):
            raise ValueError(f"stages must be distinct and in the order {' -> '.join(ORDER)} (got {self.stages})")
        return self


def stage_config(cfg: PipelineConfig, name: str, models: dict[str, str]) -> Any:
    """Stage ``name``'s config: the pipeline's model, run folder and the previous stage's weights."""
    run_dir = str(Path(cfg.run_dir) / name)
    if name == "sft":
        return cfg.sft.model_copy(update={"model": cfg.model, "run_dir": run_dir})
    if name == "genrm":  # the judge is trained from the base model, not from the policy
        return cfg.genrm.model_copy(update={"model": cfg.model, "run_dir": run_dir})
    section = getattr(cfg, name)
    init_from = next((models[p] for p in PREVIOUS[name] if p in models), section.init_from)
    update: dict[str, Any] = {"model": cfg.model, "run_dir": run_dir, "init_from": init_from}
    if name == "rlhf":
        style = trained_prompt_style(cfg.genrm.environments)
        update["environments"] = [_with_judge(e, models, style) for e in section.environments]
    return section.model_copy(update=update)


def plan(cfg: PipelineConfig) -> list[tuple[str, Any]]:
    """Each stage's resolved config as the pipeline will run it (``--dry-run``): earlier stages' models
    at the folders they will be written to."""
    models: dict[str, str] = {}
    out = []
    for name in cfg.stages:
        out.append((f"stage {name} (run_dir {Path(cfg.run_dir) / name})", stage_config(cfg, name, models)))
        models[name] = str(Path(cfg.run_dir) / name / "model")
    return out


def _with_judge(env: Any, models: dict[str, str], style: str) -> Any:
    """A genrm environment whose judge is 'auto' -> the trained GenRM, prompted in the style it learnt."""
    judge = dict(env.options.get("judge") or {})
    served = judge.get("backend", "local") != "local"  # a served judge's model None = whatever it serves
    if env.name != "genrm" or served or judge.get("model") not in (None, AUTO):
        return env
    if "genrm" not in models:
        raise ConfigError("rlhf: the genrm environment's judge.model is 'auto' but no genrm stage has run; add "
                          "'genrm' to stages or set rlhf.environments[...].options.judge.model")
    if judge.setdefault("prompt_style", style) != style:
        raise ConfigError(f"rlhf: judge.prompt_style={judge['prompt_style']!r} but the genrm stage trains the judge "
                          f"on prompt_style={style!r}; a GenRM must judge with the prompt it learnt (drop the key)")
    return env.model_copy(update={"options": {**env.options, "judge": {**judge, "model": models["genrm"]}}})


def main(cfg: PipelineConfig) -> dict[str, Any]:
    """Run (or finish) the pipeline in ``cfg.run_dir``; returns the report summary."""
    from posttrain.orchestration import cluster
    from posttrain.report import build_report, format_summary
    from posttrain.report_data import summary

    run = Path(cfg.run_dir)
    write_resolved(cfg, run)
    state = _read_state(run)
    cluster.init_ray(dashboard=cfg.dashboard, metrics_export_port=cfg.metrics_port, num_cpus=_local_cpus(cfg),
                     run_dir=run)
    models = {name: info["model"] for name, info in state["stages"].items() if info.get("status") == "done"}
    with closing(RayGauges("pipeline")) as progress:  # ray_posttrain_pipeline_stages_done{stage="pipeline"}
        for index, name in enumerate(cfg.stages):
            progress.set({"pipeline/stages_done": index, "pipeline/stages_total": len(cfg.stages)})
            if name in models:
                log.info("stage %s: done already (%s), skipped", name, models[name])
                continue
            log.info("stage %d/%d: %s", index + 1, len(cfg.stages), name)
            start = time.monotonic()
            models[name] = run_stage(name, stage_config(cfg, name, models), cfg)
            state["stages"][name] = {"status": "done", "model": models[name], "seconds": time.monotonic() - start}
            atomic_write_text(run / "pipeline.json", json.dumps(state, indent=1))
        progress.set({"pipeline/stages_done": len(cfg.stages), "pipeline/stages_total": len(cfg.stages)})
    page = build_report(run)
    data = summary(run)
    print(format_summary(data))
    print(f"report: {page}")
    return data


def _local_cpus(cfg: PipelineConfig) -> int:
    """CPUs of a local cluster: enough for the hungriest RL stage's placement group."""
    from posttrain.environments.registry import opened
    from posttrain.rlvr.actors import local_cpus, stage_roles

    need, style = 1, trained_prompt_style(cfg.genrm.environments)
    for name in cfg.stages:
        if name not in TRAINERS:
            section = getattr(cfg, name)
            with opened([_with_judge(e, {"genrm": "planned"}, style) for e in section.environments]) as envs:
                need = max(need, local_cpus(stage_roles(section, envs)))
    return need


def run_stage(name: str, stage_cfg: Any, cfg: PipelineConfig) -> str:
    """Run one stage to its end (resuming from its checkpoints); returns its final model folder."""
    from posttrain.training.checkpoint import latest_checkpoint

    if name == "sft":
        return _run_sft(stage_cfg, cfg)
    if name == "dpo":
        return _in_actor("dpo", stage_cfg, cfg.timeouts.dpo_stage_s)
    resume = latest_checkpoint(stage_cfg.run_dir) is not None
    if name == "genrm":
        from posttrain.genrm.train import train

        train(stage_cfg, resume=resume)
    else:
        from posttrain.rlvr.loop import main as rl_main

        rl_main(stage_cfg, resume=resume, stage=name)
    return str(Path(stage_cfg.run_dir) / "model")


def _run_sft(sft: SFTConfig, cfg: PipelineConfig) -> str:
    """SFT in the Ray actor ``sft-0`` (visible on the dashboard), held-out eval before and after."""
    from posttrain.report_data import last_step, logged_at

    folder = Path(sft.run_dir) / "model"
    if cfg.sft_eval_prompts and not logged_at(sft.run_dir, 0):
        _log_eval(cfg, sft.run_dir, cfg.model.name, step=0)
    _in_actor("sft", sft, cfg.timeouts.sft_stage_s)
    if cfg.sft_eval_prompts:
        result = _log_eval(cfg, sft.run_dir, str(folder), step=last_step(sft.run_dir))
        if _rlvr_repeats_it(cfg):  # RLVR's starting eval is this one: same model, prompts and settings
            log_once(str(Path(cfg.run_dir) / "rlvr"), "rlvr", 0, result, cfg.rlvr.run.loggers)
    return str(folder)


def _rlvr_repeats_it(cfg: PipelineConfig) -> bool:
    """Whether the RLVR stage would evaluate the SFT model exactly as the SFT eval just did (and has not yet)."""
    from posttrain.report_data import run_rows

    run = cfg.rlvr.run
    return ("rlvr" in cfg.stages and "dpo" not in cfg.stages and bool(run.eval_every) and run.eval_prompts == cfg.sft_eval_prompts
            and not run_rows(Path(cfg.run_dir) / "rlvr"))


def _in_actor(name: str, stage_cfg: Any, timeout_s: float) -> str:
    """Train stage ``name`` (sft, dpo) in the Ray actor ``<name>-0`` (on the dashboard, its memory gone
    with it), resuming from its checkpoints; returns its final model folder."""
    from posttrain.orchestration import cluster

    actor = cluster.start_actor(_TrainerWorker, f"{name}-0", num_cpus=1, num_gpus=stage_cfg.train.num_gpus)
    try:
        return cluster.gather([actor.train.remote(name, stage_cfg)], [f"{name}-0"], timeout_s, name.upper())[0]
    finally:
        cluster.kill_actor(actor)


class _TrainerWorker:
    def train(self, name: str, stage_cfg: Any) -> str:
        import logging as _logging

        _logging.basicConfig(level=_logging.INFO)
        stage_cfg = stage_cfg.model_copy(update={"progress": False})
        if name == "sft":
            from posttrain.sft.train import train as sft_train

            return str(sft_train(stage_cfg, resume=True) / "model")
        from posttrain.preference.dpo import train as dpo_train

        return str(dpo_train(stage_cfg, resume=True))


def _log_eval(cfg: PipelineConfig, run_dir: str, model: str, step: int) -> dict[str, float]:
    """Greedy held-out accuracy of ``model`` on the RLVR environments, evaluated as the RLVR stage does
    (:meth:`EvalConfig.of_stage`: its generation, sandbox limits and scoring) and logged into the stage's metrics."""
    from posttrain.held_out import EvalConfig, run_eval

    stage = cfg.rlvr.model_copy(update={"model": cfg.model})
    result = run_eval(EvalConfig.of_stage(stage, model, cfg.sft_eval_prompts))
    log_once(run_dir, "sft", step, result, cfg.sft.loggers)
    log.info("sft eval (step %d): %s", step, result)
    return result


def _read_state(run: Path) -> dict[str, Any]:
    path = run / "pipeline.json"
    if not path.is_file():
        return {"stages": {}}
    state = json.loads(path.read_text())
    for name, info in state.get("stages", {}).items():  # a model folder deleted by hand: run the stage again
        if info.get("status") == "done" and not (Path(info["model"]) / "config.json").is_file():
            info["status"] = "rerun"
    return state
