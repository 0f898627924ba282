"""Full-state checkpoints, resume, and stopping on a signal (preemption).

A checkpoint holds everything a step needs to continue as if it had never stopped: every trained DeepSpeed engine
(module, ZeRO shards of every rank, optimizer, LR scheduler), each rank's RNG states and rank-local state (EMA shards),
and the loop's state (step counters, data position, KL controller, results so far) with the metric history.

Layout under `checkpoint.dir` (default `<output_dir>/checkpoints`), which every rank must see (a shared filesystem
across nodes, as DeepSpeed's own checkpoints assume):

    step_00000040/           one checkpoint; it gets this name only once complete
        actor/ critic/ ...   DeepSpeed `save_checkpoint` of each trained engine
        rank_00000.pt        per rank: RNG states (python, numpy, torch, accelerator) and rank-local state
        trainer_state.json   the loop's state (step, data position, KL controller, ...)
        metrics.jsonl        the metric rows logged up to this step
        config.yaml          the config it was written with
        COMPLETE             written last: the manifest (every file and its size)
    latest                   the name of the newest complete checkpoint
    .tmp-step_00000044/      a save in progress, or one that was interrupted: never read, removed at the next start
    .tmp-XXXXXXXX            the same for a `latest` being replaced (a plain file)

A resumed run takes `latest`, else the newest `step_*`, and checks it against its manifest: a checkpoint with no
COMPLETE marker or a missing or short file is skipped with a message, and the next older one is tried.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import random
import re
import shutil
import time
from typing import Optional

import numpy as np
import torch
import yaml

from rlhf_ds.engine import launcher, strategy
from rlhf_ds.utils import atomic_write_json, atomic_write_text, barrier, is_rank0, rank, world_size

log = logging.getLogger("rlhf_ds")

COMPLETE = "COMPLETE"
LATEST = "latest"
_NAME = re.compile(r"^step_(\d{8})$")

# Config keys (dotted, fnmatch patterns) whose change breaks an exact continuation: other models, another data stream
# or batch shape, another optimizer-state layout. Anything else may change on resume (it is logged).
FIXED_ON_RESUME = (
    "model", "arch.*", "*.model", "loss_on_prompt", "data.*", "task.*", "train.seed", "train.micro_batch_size",
    "train.grad_accum", "*engine.zero_stage", "*engine.precision", "*engine.optimizer", "*engine.offload_optimizer",
    "*engine.lora.*", "ppo.rollout_batch_size", "ppo.micro_batch_size", "ppo.grad_accum", "ppo.ptx_coef",
    "ppo.ptx_data", "ppo.ema_decay", "ppo.dynamic_sampling", "dpo.loss", "dpo.length_normalize", "dpo.precompute_reference",
)
_NOT_COMPARED = ("output_dir", "checkpoint.*", "tracking.*")
# the config section and keys that shape each step's batch (the supervised steps: `train`): on another world size the
# global batch (micro_batch_size x ranks x grad_accum, examples per optimizer step) and PPO's rollout
# (rollout_batch_size x ranks prompts) are kept by re-deriving them
BATCH_KEYS = {"ppo": ("ppo", ("rollout_batch_size", "micro_batch_size", "grad_accum"))}
TRAIN_BATCH_KEYS = ("train", ("micro_batch_size", "grad_accum"))
UNIVERSAL = ".universal"  # step_N.universal: the DeepSpeed universal copy of step_N, beside it


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed from (incomplete, another world size, an incompatible config)."""


class CheckpointError(RuntimeError):
    """A save that failed; the previous complete checkpoint is untouched."""


class Preempted(Exception):
    """Raised after the checkpoint was saved because SIGTERM/SIGUSR1 asked the job to stop."""

    def __init__(self, signal_name: str, step: int, path: str):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {path}")
        self.signal_name, self.step, self.path = signal_name, step, path


class StopSignal:
    """SIGTERM and SIGUSR1 (Slurm's preemption and time-limit warnings) only set a flag: the loop finishes its step,
    all ranks agree to stop, save a checkpoint and exit with status 75 (`engine.launcher.PREEMPTED_EXIT_CODE`). A stop
    signal that comes because a peer rank died ends the rank at once instead (`engine.launcher`)."""

    SIGNALS = launcher.STOP_SIGNALS

    def __init__(self):
        self.received: Optional[str] = None
        launcher.handle_stop_in_loop(self._handle)

    def _handle(self, signal_name: str) -> None:
        self.received = signal_name


# ---- RNG states: plain types and tensors, so the rank file loads with weights_only=True -------------------------
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if not strategy.on_cpu():
        from deepspeed.accelerator import get_accelerator

        state["accelerator"] = get_accelerator().get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "accelerator" in state and not strategy.on_cpu():
        from deepspeed.accelerator import get_accelerator

        get_accelerator().set_rng_state(state["accelerator"])


# ---- config comparison -------------------------------------------------------------------------------------------
def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(changes that break a resume, other changes), each as 'key: old -> new'."""
    a, b = _flatten(old), _flatten(new)
    breaking, other = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key) or any(fnmatch.fnmatchcase(key, p) for p in _NOT_COMPARED):
            continue
        line = f"{key}: {a.get(key, '(absent)')!r} -> {b.get(key, '(absent)')!r}"
        (breaking if any(fnmatch.fnmatchcase(key, p) for p in FIXED_ON_RESUME) else other).append(line)
    return breaking, other


# ---- the batch on another world size -------------------------------------------------------------------------------
def keep_batch(section: str, before: dict, old_world: int, given: dict, world: int) -> dict:
    """The batch keys that keep, on `world` ranks, the batch `before` trained with on `old_world`: the global batch
    (micro_batch_size x ranks x grad_accum) with micro_batch_size as `given` and grad_accum re-derived, and, where the
    section has one (PPO), the prompts of a rollout (rollout_batch_size x ranks). Keys `given` that already keep it
    stay. ValueError naming the sizes and the keys to set when no whole values keep it."""
    kept = {}
    if "rollout_batch_size" in before:
        prompts = before["rollout_batch_size"] * old_world
        per_rank, left = divmod(prompts, world)
        if left:
            raise ValueError(f"its rollouts of {prompts} prompts ({section}.rollout_batch_size "
                             f"{before['rollout_batch_size']} x {old_world} ranks) cannot be split over {world} ranks")
        kept["rollout_batch_size"] = per_rank
    batch = before["micro_batch_size"] * before["grad_accum"] * old_world
    micro, accum = given["micro_batch_size"], given["grad_accum"]
    if micro * accum * world != batch:
        accum, left = divmod(batch, micro * world)
        if left or accum < 1:
            raise ValueError(
                f"its global batch of {batch} examples ({section}.micro_batch_size {before['micro_batch_size']} x "
                f"{old_world} ranks x {section}.grad_accum {before['grad_accum']}) cannot be kept with "
                f"{section}.micro_batch_size {micro} and a whole {section}.grad_accum; set {section}.micro_batch_size "
                f"(and {section}.grad_accum) so that micro_batch_size x {world} x grad_accum = {batch}")
    return {**kept, "micro_batch_size": micro, "grad_accum": accum}


# the trained engines' optimizer keys (the reference and the reward model are not in a checkpoint)
TRAINED_ENGINES = ("engine", "actor.engine", "critic.engine")


def universal_unsupported(config: dict) -> list[str]:
    """The optimizer keys of a checkpoint's config whose ZeRO shards (stages 1-3) DeepSpeed's universal format cannot
    carry: 8-bit optimizer states (its converter reads Adam's fp32 exp_avg and exp_avg_sq only)."""
    flat = _flatten(config)
    return [f"{e}.optimizer" for e in TRAINED_ENGINES
            if flat.get(f"{e}.optimizer") == "adamw_8bit" and flat.get(f"{e}.zero_stage", 0) >= 1]


def describe_batch(section: str, batch: dict, world: int) -> str:
    """e.g. 'global batch 8 kept as train.micro_batch_size 4 x 1 ranks x train.grad_accum 2'."""
    out = (f"global batch {batch['micro_batch_size'] * world * batch['grad_accum']} kept as {section}.micro_batch_size "
           f"{batch['micro_batch_size']} x {world} ranks x {section}.grad_accum {batch['grad_accum']}")
    if "rollout_batch_size" in batch:
        out = (f"rollouts of {batch['rollout_batch_size'] * world} prompts kept as {section}.rollout_batch_size "
               f"{batch['rollout_batch_size']} x {world} ranks, {out}")
    return out


# ---- finding a checkpoint ------------------------------------------------------------------------------------------
def checkpoint_problem(path: str) -> Optional[str]:
    """Why `path` is not a complete checkpoint (None when it is): no marker, unreadable manifest, missing/short files."""
    if not os.path.isdir(path):
        return "not found"
    marker = os.path.join(path, COMPLETE)
    if not os.path.isfile(marker):
        return "incomplete: no COMPLETE marker (its save was interrupted)"
    try:
        with open(marker, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable COMPLETE manifest ({e})"
    for rel, size in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"missing file {rel}"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, the manifest says {size}"
    return None


def _step_dirs(root: str) -> list[str]:
    """Complete-looking checkpoint folder names, newest first."""
    if not os.path.isdir(root):
        return []
    return sorted((d for d in os.listdir(root) if _NAME.match(d)), reverse=True)


def read_manifest(path: str) -> dict:
    with open(os.path.join(path, COMPLETE), encoding="utf-8") as f:
        return json.load(f)


class CheckpointManager:
    """Saves full-state checkpoints when due and restores the newest good one. Every rank calls every method."""

    def __init__(self, cfg, step_name: str, config: dict):
        self.cfg = cfg.checkpoint
        self.root = os.path.abspath(cfg.checkpoint.dir or os.path.join(cfg.output_dir, "checkpoints"))
        self.step_name = step_name
        self.config = config
        self.engines: dict = {}
        self.states: dict[str, tuple[object, bool]] = {}  # name -> (object with state_dict/load_state_dict, per rank)
        self.metrics = None  # set by StepContext.begin: the rows saved with each checkpoint
        self.stop: Optional[StopSignal] = None  # listen_for_stop_signals: once the step's start-up is over
        self._last_save = time.monotonic()
        self.broken: list[str] = []  # checkpoints found unusable (rank 0)
        self.elastic: Optional[dict] = None  # resuming on another world size: {"from", "to", "grad_accum", ...}
        self.batch_section, self.batch_keys = BATCH_KEYS.get(step_name, TRAIN_BATCH_KEYS)
        self.batch_cfg = getattr(cfg, self.batch_section, None)  # the batch actually trained (saved with checkpoints)
        self.seed = getattr(getattr(cfg, "train", None), "seed", 0)
        decision = self._choose() if is_rank0() else None
        decision = strategy.broadcast_object(decision)
        if decision["error"]:
            raise ResumeError(decision["error"])
        self.resume_path: Optional[str] = decision["path"]
        self.latest: Optional[str] = decision["path"]
        if decision.get("elastic"):
            self._start_elastic(cfg, decision["elastic"])

    # ---- which checkpoint (rank 0 decides, every rank follows) ----------------------------------------------------
    def _choose(self) -> dict:
        try:
            return {"path": self._find(), "error": None, "elastic": self.elastic}
        except ResumeError as e:
            return {"path": None, "error": str(e)}

    def _find(self) -> Optional[str]:
        mode = self.cfg.resume
        if mode == "never":
            return None
        if mode != "auto":
            path = os.path.abspath(mode)
            inner = _step_dirs(path) or _step_dirs(os.path.join(path, "checkpoints"))
            if inner and not os.path.isfile(os.path.join(path, COMPLETE)):
                raise ResumeError(f"checkpoint.resume={mode} holds checkpoints ({', '.join(inner[:3])}, ...): name one "
                                  "step_NNNNNNNN folder, or use checkpoint.resume=auto for the newest")
            problem = checkpoint_problem(path)
            if problem:
                raise ResumeError(f"checkpoint.resume={mode}: {problem}")
            self._check_compatible(path)
            return path
        names = _step_dirs(self.root)
        latest_file = os.path.join(self.root, LATEST)
        if os.path.isfile(latest_file):
            with open(latest_file, encoding="utf-8") as f:
                pointed = f.read().strip()
            if pointed in names:
                names.remove(pointed)
                names.insert(0, pointed)
        for name in names:
            path = os.path.join(self.root, name)
            problem = checkpoint_problem(path)
            if problem is None:
                self._check_compatible(path)
                log.info("resuming from checkpoint %s", path)
                return path
            log.warning("checkpoint %s skipped: %s; trying an older one", path, problem)
            self.broken.append(path)
        if names:
            log.warning("no complete checkpoint in %s: starting afresh", self.root)
        return None

    def _check_compatible(self, path: str) -> None:
        manifest = read_manifest(path)
        if manifest.get("step_name") != self.step_name:
            raise ResumeError(f"{path} is a checkpoint of step '{manifest.get('step_name')}', not '{self.step_name}'")
        with open(os.path.join(path, "config.yaml"), encoding="utf-8") as f:
            old = yaml.safe_load(f)
        self.elastic = None
        if manifest.get("world_size") != world_size():
            unsupported = universal_unsupported(old)
            if unsupported:
                raise ResumeError(f"{path} was written by {manifest['world_size']} ranks and this run has "
                                  f"{world_size()}: {', '.join(unsupported)}=adamw_8bit keeps 8-bit optimizer states "
                                  "in its ZeRO shards, which DeepSpeed's universal checkpoint format cannot carry (its "
                                  "converter reads fp32 Adam states only); resume with "
                                  f"{manifest['world_size']} ranks")
            self.elastic = self._elastic_batch(path, old, manifest["world_size"])
        else:
            self.elastic = self._batch_kept(path, old)
        breaking, other = config_changes(old, self.config)
        if self.elastic:  # the batch keys may change with the world size, as long as the batch is kept
            breaking = [b for b in breaking
                        if not b.startswith(tuple(f"{self.batch_section}.{k}:" for k in self.batch_keys))]
        if breaking:
            raise ResumeError(
                f"the config differs from the one checkpoint {path} was written with, in ways that break resuming:\n  "
                + "\n  ".join(breaking)
                + "\nrestore these settings, or start afresh with checkpoint.resume=never (or another output_dir)")
        if other:
            log.warning("resuming with config changes:\n  %s", "\n  ".join(other))

    def _trained_batch(self, path: str, old: dict) -> dict:
        """The batch keys the checkpoint's run trained with (re-derived ones included; a checkpoint of an earlier
        version recorded none, or for PPO the `train` section's: then its config's)."""
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            batch = json.load(f).get("batch") or {}
        if set(batch) != set(self.batch_keys):
            batch = old.get(self.batch_section, {})
        return {k: batch[k] for k in self.batch_keys}

    def _batch_kept(self, path: str, old: dict) -> Optional[dict]:
        """The same world size, the config's batch keys unchanged, but the checkpoint's run trained with re-derived
        ones (it was resumed on this world size from another): continue with those."""
        trained, given = self._trained_batch(path, old), self.config.get(self.batch_section, {})
        section = old.get(self.batch_section, {})
        if (all(trained[k] == given.get(k) for k in self.batch_keys)
                or any(section.get(k) != given.get(k) for k in self.batch_keys)):
            return None
        return {"from": world_size(), "to": world_size(), **trained}

    def _elastic_batch(self, path: str, old: dict, old_world: int) -> dict:
        """How a checkpoint of `old_world` ranks continues on this world size with the same batch (`keep_batch`);
        ResumeError naming the sizes and the keys to set when it cannot."""
        try:
            kept = keep_batch(self.batch_section, self._trained_batch(path, old), old_world,
                              self.config.get(self.batch_section, {}), world_size())
        except ValueError as e:
            raise ResumeError(f"{path} was written by {old_world} ranks and this run has {world_size()}: {e}, or "
                              f"resume with {old_world} ranks") from None
        return {"from": old_world, "to": world_size(), **kept}

    def _start_elastic(self, cfg, plan: dict) -> None:
        """Every rank, before any engine is built: the re-derived batch keys, and engines that load the universal
        format."""
        self.elastic = plan
        for k in self.batch_keys:
            setattr(self.batch_cfg, k, plan[k])
        shape = describe_batch(self.batch_section, plan, plan["to"])
        if plan["from"] == plan["to"]:
            log.info("resuming %s with the batch it trained with: %s", self.resume_path, shape)
            return
        strategy.loading_universal = True
        log.info("resuming %s (written by %d ranks) on %d ranks: %s; ZeRO shards through DeepSpeed's universal "
                 "checkpoint format", self.resume_path, plan["from"], plan["to"], shape)

    def _universal_copy(self, path: str) -> str:
        """`path` + ".universal": every engine of stage 1-3 converted once (rank 0, under a temp name, published by a
        rename with its own COMPLETE manifest; reused by later resumes). The original is only read."""
        final = path + UNIVERSAL
        if is_rank0() and checkpoint_problem(final) is not None:
            t0 = time.time()
            tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(final)}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)
            os.makedirs(tmp)
            try:
                for tag, engine in self.engines.items():
                    if strategy.zero_stage(engine) >= 1:
                        strategy.to_universal(path, tag, tmp)
                files = {}
                for folder, _, names in os.walk(tmp):
                    for n in names:
                        full = os.path.join(folder, n)
                        _fsync(full)
                        files[os.path.relpath(full, tmp)] = os.path.getsize(full)
                atomic_write_json(os.path.join(tmp, COMPLETE), {"source": os.path.basename(path), "files": files,
                                                                "time": time.time()})
                os.replace(tmp, final)
                _fsync_dir(os.path.dirname(final))
            except Exception as e:
                raise CheckpointError(f"converting {path} to DeepSpeed's universal format failed: {e} "
                                      f"({_free_space(self.root)}); the checkpoint itself is unchanged") from e
            size = sum(files.values())
            log.info("converted %s to %s in %.1f s (%.1f MB)", path, final, time.time() - t0, size / 1e6)
        barrier()
        return final

    # ---- start --------------------------------------------------------------------------------------------------------
    def prepare_dir(self) -> None:
        """Rank 0: remove interrupted saves and unusable checkpoints; with resume=never also old checkpoints (they would
        mix with the new run)."""
        if not is_rank0() or not os.path.isdir(self.root):
            return
        for path in self.broken:
            log.warning("removing the unusable checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)
        for d in os.listdir(self.root):
            if d.startswith(".tmp-"):
                remove_interrupted_write(os.path.join(self.root, d))
        if self.cfg.resume == "never" and _step_dirs(self.root):
            log.warning("checkpoint.resume=never: removing the old checkpoints in %s", self.root)
            for d in _step_dirs(self.root):
                shutil.rmtree(os.path.join(self.root, d), ignore_errors=True)
                shutil.rmtree(os.path.join(self.root, d + UNIVERSAL), ignore_errors=True)
            if os.path.exists(os.path.join(self.root, LATEST)):
                os.unlink(os.path.join(self.root, LATEST))

    def register(self, name: str, obj, per_rank: bool = False) -> None:
        """Save `obj` (anything with `state_dict()` / `load_state_dict(state)`: loop counters, KL controller, EMA, the
        non-finite guard) with every checkpoint and restore it in `load`. Its state goes to trainer_state.json (JSON,
        the same on every rank) or, with `per_rank`, to this rank's file (tensors allowed: EMA shards); a per-rank
        state resumes on another world size only if `obj` has `load_resharded(states of every old rank, in order)`."""
        if name in self.states:
            raise ValueError(f"checkpoint state {name!r} registered twice")
        self.states[name] = (obj, per_rank)

    def load(self) -> dict:
        """Restore the chosen checkpoint into `self.engines`, the registered states and this rank's RNGs; returns the
        saved trainer state (`step`, ...) with `metrics` (the metric rows)."""
        path = self.resume_path
        if self.elastic and self.elastic["from"] != self.elastic["to"]:
            return self._load_elastic(path)
        for tag, engine in self.engines.items():
            strategy.load_engine(engine, path, tag)
        local = torch.load(os.path.join(path, f"rank_{rank():05d}.pt"), map_location="cpu", weights_only=True)
        set_rng_state(local["rng"])
        return self._load_states(path, local)

    def _load_elastic(self, path: str) -> dict:
        """Another world size: ZeRO shards through the universal copy (stage 0 engines hold everything whole and load
        as they are); per-rank states re-sharded from every old rank's file (`load_resharded`); each rank's RNGs seeded
        afresh from (train.seed, step, rank): the training data order does not depend on them, sampling and dropout
        after the resume do (docs/reliability.md)."""
        per_rank = [name for name, (obj, is_per_rank) in self.states.items() if is_per_rank]
        cannot = [name for name in per_rank if not hasattr(self.states[name][0], "load_resharded")]
        if cannot:
            raise ResumeError(f"{path}: per-rank state {cannot} cannot be re-sharded for another world size")
        universal = self._universal_copy(path)
        for tag, engine in self.engines.items():
            strategy.load_engine(engine, universal if strategy.zero_stage(engine) >= 1 else path, tag)
        if per_rank:
            old = [torch.load(os.path.join(path, f"rank_{r:05d}.pt"), map_location="cpu", weights_only=True)["state"]
                   for r in range(self.elastic["from"])]
            for name in per_rank:
                self.states[name][0].load_resharded([states[name] for states in old])
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            step = json.load(f)["step"]
        seed = int(np.random.default_rng([self.seed, step, rank(), 7717]).integers(2**31))
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        return self._load_states(path, {}, skip=per_rank)

    def _load_states(self, path: str, local: dict, skip: tuple | list = ()) -> dict:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
        with open(os.path.join(path, "metrics.jsonl"), encoding="utf-8") as f:
            state["metrics"] = [json.loads(line) for line in f if line.strip()]
        for name, (obj, per_rank) in self.states.items():
            if name in skip:
                continue
            saved = (local.get("state", {}) if per_rank else state.get("states", {})).get(name)
            if saved is None:
                raise ResumeError(f"checkpoint {path} has no saved {name!r}: it was written by another version of "
                                  "this step; start a new run (checkpoint.resume=never)")
            obj.load_state_dict(saved)
        log.info("restored checkpoint %s (step %d)", path, state["step"])
        return state

    # ---- saving ---------------------------------------------------------------------------------------------------------
    def listen_for_stop_signals(self) -> None:
        """From now on SIGTERM/SIGUSR1 stop the run at the end of a step, with a checkpoint (`after_step`)."""
        self.stop = StopSignal()

    def after_step(self, step: int) -> None:
        """Call on every rank after each training step. Saves when due (every N steps, every M minutes, or when any rank
        got a stop signal; ranks agree through one small all-reduce), then raises Preempted if a signal asked to stop."""
        elapsed = time.monotonic() - self._last_save
        flags = torch.tensor([float(self.stop.received is not None),
                              float(bool(self.cfg.every_minutes) and elapsed >= 60 * self.cfg.every_minutes)])
        stop, time_due = strategy.all_reduce_max(flags).tolist()
        step_due = bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0
        if stop or time_due or step_due:
            self.save(step)
        if stop:
            raise Preempted(self.stop.received or "a signal on another rank", step, self.latest)

    def save(self, step: int) -> str:
        """Write checkpoint `step_<step>` under a temp name, then publish it with one rename and update `latest`."""
        t0 = time.time()
        loop_state = {n: obj.state_dict() for n, (obj, per_rank) in self.states.items() if not per_rank}
        rank_state = {n: obj.state_dict() for n, (obj, per_rank) in self.states.items() if per_rank}
        name = f"step_{step:08d}"
        tmp, final = os.path.join(self.root, f".tmp-{name}"), os.path.join(self.root, name)
        if is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        try:
            for tag, engine in self.engines.items():
                strategy.save_engine(engine, tmp, tag)
            _save_fsynced({"rng": rng_state(), "state": rank_state}, os.path.join(tmp, f"rank_{rank():05d}.pt"))
        except Exception as e:  # disk full arrives as OSError or as torch's RuntimeError from its file writer
            raise CheckpointError(
                f"saving checkpoint {final} failed on rank {rank()}: {e} ({_free_space(self.root)}). The last "
                f"complete checkpoint "
                f"({self.latest or 'none'}) is kept; the partial save is removed at the next start") from e
        barrier()
        if is_rank0():
            try:
                self._publish(tmp, final, step, loop_state)
            except Exception as e:
                raise CheckpointError(f"publishing checkpoint {final} failed: {e} ({_free_space(self.root)}). The last "
                                      "complete checkpoint "
                                      f"({self.latest or 'none'}) is kept") from e
        barrier()
        self.latest = final
        self._last_save = time.monotonic()
        log.info("checkpoint %s saved in %.1f s", final, time.time() - t0)
        return final

    def _publish(self, tmp: str, final: str, step: int, loop_state: dict) -> None:
        rows = self.metrics.history if self.metrics is not None else []
        wandb_id = self.metrics.wandb_id if self.metrics is not None else None
        batch = ({k: getattr(self.batch_cfg, k) for k in self.batch_keys}
                 if all(hasattr(self.batch_cfg, k) for k in self.batch_keys) else None)
        atomic_write_json(os.path.join(tmp, "trainer_state.json"), {"step": step, "step_name": self.step_name,
                                                                     "world_size": world_size(), "wandb_id": wandb_id,
                                                                     "batch": batch, "states": loop_state})
        atomic_write_text(os.path.join(tmp, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(os.path.join(tmp, "config.yaml"), yaml.safe_dump(self.config, sort_keys=False))
        files = {}
        for folder, _, names in os.walk(tmp):
            for n in names:
                full = os.path.join(folder, n)
                _fsync(full)  # DeepSpeed's files too: the marker must never land before the data it vouches for
                files[os.path.relpath(full, tmp)] = os.path.getsize(full)
        atomic_write_json(os.path.join(tmp, COMPLETE), {"step": step, "step_name": self.step_name,
                                                        "world_size": world_size(), "time": time.time(), "files": files})
        if os.path.exists(final):  # the same step saved again (a resumed run stopped at once)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        atomic_write_text(os.path.join(self.root, LATEST), os.path.basename(final) + "\n")
        for old in _step_dirs(self.root)[self.cfg.keep_last:]:
            shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
            shutil.rmtree(os.path.join(self.root, old + UNIVERSAL), ignore_errors=True)


def remove_interrupted_write(path: str) -> None:
    """Remove what a save cut short left: a `.tmp-step_*` folder, or the `.tmp-*` file of a `latest` being replaced."""
    is_folder = os.path.isdir(path) and not os.path.islink(path)
    log.warning("removing the interrupted checkpoint save %s" if is_folder else
                "removing the temp file of an interrupted write %s", path)
    try:
        if is_folder:
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except OSError as e:  # it is never read: a leftover costs disk space only
        log.warning("could not remove %s: %s", path, e)


def _free_space(path: str) -> str:
    """How full the checkpoint filesystem is: torch's writer reports a full disk only as 'unexpected pos'."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return "free space unknown"
    note = ": the disk is full" if usage.free < 0.01 * usage.total or usage.free < 1 << 20 else ""
    return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB on {path}{note}"


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        _fsync(path)
    except OSError:  # some filesystems do not fsync directories
        pass


def _save_fsynced(obj, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
