"""`rlhf-ds pipeline`: step 0 (pretrain, when no base model is given), 1 (SFT), 2 (reward model), 3 (PPO) and the final
evaluation in one run directory, each step reading the previous step's output. `algorithm=dpo` replaces steps 2-3 by
offline DPO on the same preference pairs; `algorithm=both` runs both branches from the same SFT model and the
evaluation scores SFT, PPO and DPO side by side:

    <run>/pretrain  <run>/sft  <run>/rm  <run>/ppo  <run>/dpo  <run>/eval   one folder per step (config.yaml, ...)
    <run>/configs/<step>.yaml                                      the exact config each step was started with
    <run>/config.yaml  <run>/pipeline.json                         resolved pipeline config; status and time per step
    <run>/summary.json <run>/metrics.jsonl <run>/plots/ <run>/report.html

Each training step is a subprocess under the deepspeed launcher (`num_gpus` local ranks; pretraining on
`pretrain_num_gpus`), so every step starts with a fresh process group and its memory is returned when it ends. The
evaluation runs in one plain process.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from rlhf_ds import run_lock
from rlhf_ds.engine.launcher import threads_per_process
from rlhf_ds.config import (ALGORITHM_STEPS, PIPELINE_STEPS, STEP_CONFIGS, ConfigError, PipelineConfig, save_config,
                            step_list)
from rlhf_ds.engine.launcher import PREEMPTED_EXIT_CODE, LaunchResult, supervise
from rlhf_ds.utils import atomic_write_json

log = logging.getLogger("rlhf_ds")

# pipeline key naming an existing model that replaces a step's output (and skips the step)
GIVEN_KEYS = {"pretrain": "base_model", "sft": "sft_model", "rm": "reward_model"}


class PipelineError(RuntimeError):
    pass


class PipelinePreempted(PipelineError):
    """A step exited with PREEMPTED_EXIT_CODE: its checkpoint is saved and the pipeline can be run again."""


@dataclass
class StepPlan:
    name: str
    action: str  # "run" | "skip" | "given" | "done" (resume_completed_steps)
    reason: str
    output_dir: str
    cfg: object  # the step's resolved config
    inputs: dict = field(default_factory=dict)  # role -> model path this step reads
    ranks: int = 1

    def describe(self) -> dict:
        return {"step": self.name, "action": self.action, "reason": self.reason, "output_dir": self.output_dir,
                "inputs": self.inputs, "ranks": self.ranks if self.action == "run" else 0}


def _default(step: str):
    return STEP_CONFIGS[step]()


def _explicit(value, default_value) -> bool:
    """A section value the user set (it differs from the step config's own default)."""
    return value != default_value


def _has_model(path: str) -> bool:
    """A model folder, or a step run folder with one in model/ (as models.loading.resolve_model_dir; no torch import)."""
    return any(os.path.isfile(os.path.join(path, *sub, "config.json")) for sub in ((), ("model",)))


def plan(cfg: PipelineConfig) -> list[StepPlan]:
    """Decide which steps run and wire each step's inputs to the previous steps' outputs (no side effects)."""
    cfg = copy.deepcopy(cfg)
    run_dir = os.path.abspath(cfg.output_dir)
    dirs = {s: os.path.join(run_dir, s) for s in PIPELINE_STEPS}
    skip = set(step_list(cfg.skip) or [])
    only = step_list(cfg.only)
    given = {s: getattr(cfg, key) for s, key in GIVEN_KEYS.items() if getattr(cfg, key)}
    if only:
        clash = [s for s in only if s in given]
        if clash:
            raise ConfigError(f"only names '{clash[0]}' but {GIVEN_KEYS[clash[0]]} is given (its model replaces the step)")
    steps = ALGORITHM_STEPS[cfg.algorithm]
    selected = set(only) if only else set(steps) - skip

    # the model each step hands on: a given one, else its own output folder
    provides = {s: os.path.abspath(given[s]) if s in given else dirs[s] for s in ("pretrain", "sft", "rm", "ppo", "dpo")}
    group = cfg.tracking.wandb_group or os.path.basename(run_dir)
    base_name = cfg.tracking.wandb_run_name or group

    plans: list[StepPlan] = []
    for name in steps:
        step_cfg = getattr(cfg, name)
        default = _default(name)
        step_cfg.output_dir = dirs[name]
        step_cfg.task = copy.deepcopy(cfg.task)
        step_cfg.plugins = list(dict.fromkeys([*cfg.plugins, *step_cfg.plugins]))  # each step process imports them
        step_cfg.tracking = dataclasses.replace(cfg.tracking, wandb_group=group, wandb_run_name=f"{base_name}-{name}",
                                                wandb_tags=list(cfg.tracking.wandb_tags))
        inputs: dict = {}
        if name == "sft":
            if not _explicit(step_cfg.model, default.model):
                step_cfg.model = provides["pretrain"]
            inputs["model"] = step_cfg.model
        elif name == "rm":
            if not _explicit(step_cfg.model, default.model):
                step_cfg.model = provides["sft"]
            inputs["model"] = step_cfg.model
        elif name == "ppo":
            if not _explicit(step_cfg.actor.model, default.actor.model):
                step_cfg.actor.model = provides["sft"]
            if not _explicit(step_cfg.reward.model, default.reward.model):
                step_cfg.reward.model = provides["rm"]
            inputs.update(actor=step_cfg.actor.model, reward=step_cfg.reward.model)
            for role in ("critic", "reference"):
                if getattr(step_cfg, role).model:
                    inputs[role] = getattr(step_cfg, role).model
        elif name == "dpo":  # the offline branch starts from the same SFT model as PPO
            if not _explicit(step_cfg.model, default.model):
                step_cfg.model = provides["sft"]
            inputs["model"] = step_cfg.model
            if step_cfg.reference.model:
                inputs["reference"] = step_cfg.reference.model
        elif name == "eval":
            for key, src in (("sft_model", "sft"), ("ppo_model", "ppo"), ("dpo_model", "dpo"), ("reward_model", "rm")):
                if not _explicit(getattr(step_cfg, key), getattr(default, key)):
                    # the policies (and reward model) of this run's branches, side by side
                    setattr(step_cfg, key, provides[src] if src in steps or src in given else None)
                if getattr(step_cfg, key):
                    inputs[key.replace("_model", "")] = getattr(step_cfg, key)
            # answer as PPO trained: same prompt budget and response length, unless set for eval
            if not _explicit(step_cfg.max_prompt_tokens, default.max_prompt_tokens):  # null: both from the model
                step_cfg.max_prompt_tokens = cfg.ppo.data.max_prompt_tokens
            if not _explicit(step_cfg.generation.max_new_tokens, default.generation.max_new_tokens):
                step_cfg.generation.max_new_tokens = cfg.ppo.generation.max_new_tokens

        if name in given:
            action, reason = "given", f"{GIVEN_KEYS[name]}={given[name]}"
        elif name not in selected:
            action, reason = "skip", ("not in only" if only else "in skip")
        elif cfg.resume_completed_steps and os.path.isfile(os.path.join(dirs[name], "results.json")):
            action, reason = "done", "results.json exists (resume_completed_steps)"
        else:
            action, reason = "run", ""
        ranks = 1 if name == "eval" else cfg.pretrain_num_gpus if name == "pretrain" else cfg.num_gpus
        plans.append(StepPlan(name, action, reason, dirs[name], step_cfg, inputs, ranks))
    return plans


def check_inputs(plans: list[StepPlan]) -> None:
    """Every input of a step that runs is produced earlier in this run or already exists on disk."""
    produced: set[str] = set()
    for p in plans:
        if p.action == "run":
            for role, path in p.inputs.items():
                if os.path.abspath(path) not in produced and not _has_model(path):
                    what = "its model" if role == "model" else f"the {role} model"
                    raise ConfigError(f"step '{p.name}' needs {what} '{path}', which does not exist and no "
                                      "earlier step of this run makes it (run that step, or give an existing model)")
            produced.add(p.output_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_command(name: str, config_path: str, ranks: int, port: Optional[int]) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "rlhf_ds.cli", name, "--config", config_path]
    from rlhf_ds.engine.launcher import deepspeed_command

    return deepspeed_command([name, "--config", config_path], ranks, port or _free_port())


def _run_step(p: StepPlan, run_dir: str, master_port: Optional[int]) -> tuple[LaunchResult, float]:
    """Start one step as a subprocess (under the deepspeed launcher for several ranks); (how it ended, seconds)."""
    os.makedirs(p.output_dir, exist_ok=True)
    for stale in ("results.json", "metrics.jsonl"):  # a step that fails early must not leave an old run's figures
        path = os.path.join(p.output_dir, stale)
        if os.path.exists(path):
            os.remove(path)
    config_path = os.path.join(run_dir, "configs", f"{p.name}.yaml")
    save_config(p.cfg, config_path)
    cmd = _step_command(p.name, config_path, p.ranks, master_port)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads_per_process(p.ranks)))
    log.info("pipeline: %s on %d rank(s): %s", p.name, p.ranks, " ".join(cmd))
    t0 = time.time()
    result = supervise(cmd, env, p.ranks, launcher=p.ranks > 1)
    return result, time.time() - t0


def _load_state(run_dir: str) -> dict:
    path = os.path.join(run_dir, "pipeline.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return {"steps": {}}


def run(cfg: PipelineConfig, dry_run: bool = False) -> dict:
    """Run the planned steps in order; returns the summary (or the plan with `dry_run`)."""
    plans = plan(cfg)
    check_inputs(plans)
    run_dir = os.path.abspath(cfg.output_dir)
    if dry_run:
        return {"run_dir": run_dir, "steps": [p.describe() for p in plans]}
    from rlhf_ds.engine.launcher import under_launcher

    if under_launcher():
        raise PipelineError("run `rlhf-ds pipeline` from a plain shell: it starts the deepspeed launcher for each step")
    run_lock.hold(run_dir)  # one pipeline per run directory: before anything is written there
    _setup_console_logging()
    resolved = copy.deepcopy(cfg)
    for p in plans:
        setattr(resolved, p.name, p.cfg)
    resolved.output_dir = run_dir
    save_config(resolved, os.path.join(run_dir, "config.yaml"))

    state = _load_state(run_dir)
    state.update(run_dir=run_dir, group=plans[0].cfg.tracking.wandb_group, algorithm=cfg.algorithm)
    steps = state.setdefault("steps", {})
    for p in plans:
        if p.action in ("given", "skip"):
            if p.action == "given" or p.name not in steps:
                steps[p.name] = {"status": p.action, "reason": p.reason}
        elif p.action == "done":
            steps[p.name] = {**steps.get(p.name, {}), "status": "done"}
    atomic_write_json(os.path.join(run_dir, "pipeline.json"), state)

    t_all = time.time()
    failed = None
    for p in plans:
        if p.action != "run":
            log.info("pipeline: %s %s (%s)", p.name, {"given": "replaced by a given model", "skip": "skipped",
                                                      "done": "already done"}[p.action], p.reason)
            continue
        steps[p.name] = {"status": "running", "started": time.time(), "ranks": p.ranks}
        atomic_write_json(os.path.join(run_dir, "pipeline.json"), state)
        result, seconds = _run_step(p, run_dir, cfg.master_port)
        ok = result.status == 0 and os.path.isfile(os.path.join(p.output_dir, "results.json"))
        status = "done" if ok else "preempted" if result.status == PREEMPTED_EXIT_CODE else "failed"
        steps[p.name].update(status=status, exit_code=result.status, seconds=seconds)
        if result.problem:
            steps[p.name]["problem"] = result.problem
        atomic_write_json(os.path.join(run_dir, "pipeline.json"), state)
        if not ok:
            failed = p
            break
        log.info("pipeline: %s done in %.1fs", p.name, seconds)
    state["seconds"] = time.time() - t_all
    atomic_write_json(os.path.join(run_dir, "pipeline.json"), state)

    summary = {}
    if cfg.report:
        from rlhf_ds.tracking.report import write_report

        try:
            summary = write_report(run_dir)
        except Exception as e:  # a broken plot must not hide the outcome of the steps
            if failed is None:
                raise
            log.warning("pipeline: report failed too: %s", e)
    if failed is not None and steps[failed.name]["status"] == "preempted":
        raise PipelinePreempted(f"step '{failed.name}' stopped by a signal after saving a checkpoint; run the same "
                                "command with resume_completed_steps=true to continue where it stopped")
    if failed is not None:
        why = steps[failed.name].get("problem")
        raise PipelineError(f"step '{failed.name}' failed (exit {steps[failed.name]['exit_code']}"
                            f"{': ' + why if why else ''}); see {os.path.join(failed.output_dir, 'logs')}")
    log.info("pipeline: finished in %.1fs; %s", state["seconds"],
             f"report: {os.path.join(run_dir, 'report.html')}" if cfg.report else "no report")
    return summary


def _setup_console_logging() -> None:
    root = logging.getLogger("rlhf_ds")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s [pipeline] %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
