"""What every training step shares: process group, run directory, resume, outputs, and the non-finite-loss guard.

A step runs in two phases. `start_step` joins the process group and finds the checkpoint to resume from (checked
against the config) but writes nothing except logs/. Once data, tokenizer and models are loaded, `StepContext.begin`
writes config.yaml, opens the metrics and restores the checkpoint. So bad input fails before any output is written.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from rlhf_ds import run_lock
from rlhf_ds.checkpoint import CheckpointManager
from rlhf_ds.config import BuiltinTaskConfig, TrainConfig, save_config, to_dict
from rlhf_ds.engine import startup, strategy
from rlhf_ds.tracking.metrics import MetricsLogger, setup_logging
from rlhf_ds.utils import atomic_write_json, barrier, is_rank0, set_seed, world_size

log = logging.getLogger("rlhf_ds")


class NonFiniteLossError(RuntimeError):
    """The run stopped on a NaN/inf loss (or too many of them); checkpoints already written are the last good ones."""


@dataclass
class StepContext:
    cfg: object
    step_name: str
    run_dir: str
    checkpoint: CheckpointManager
    loop_state: "LoopState"  # the loop's figures, saved with each checkpoint
    guard: "NonFiniteGuard"  # the non-finite-loss guard every backward goes through, saved with each checkpoint
    metrics: Optional[MetricsLogger] = None
    resumed: dict = field(default_factory=dict)
    # the config as given (before budgets left null were filled from the data): config.yaml, what a rerun or a resume
    # of it compares against
    given: dict = field(default_factory=dict)

    def begin(self, engines: dict) -> None:
        """Inputs are valid and the trained `engines` (name -> DeepSpeed engine) exist: write config.yaml, open the
        metrics, restore the checkpoint being resumed into them and into the states registered with the checkpoint
        manager; its trainer state (`step`) goes to `resumed` ({} when fresh)."""
        self.checkpoint.engines = engines
        if is_rank0():
            os.makedirs(self.run_dir, exist_ok=True)
            self.checkpoint.prepare_dir()
            save_config(self.given or self.cfg, os.path.join(self.run_dir, "config.yaml"))
            atomic_write_json(os.path.join(self.run_dir, "ds_config.json"), strategy.built_ds_configs)
        barrier()
        if self.checkpoint.resume_path:
            startup.phase(f"restoring {self.checkpoint.resume_path}")
        state = self.checkpoint.load() if self.checkpoint.resume_path else {}
        self.metrics = MetricsLogger(self.run_dir, self.step_name, self.cfg.tracking, to_dict(self.cfg),
                                     history=state.get("metrics"), wandb_id=state.get("wandb_id"))
        self.checkpoint.metrics = self.metrics
        self.resumed = state
        log.info("start-up: %s", startup.summary(startup.done()))
        self.checkpoint.listen_for_stop_signals()  # before this a stop signal ends the rank at once (nothing to save)

    def finish(self, results: dict) -> dict:
        """The step is done: results.json (rank 0), the summary on rank 0's console and in wandb, metrics closed."""
        if is_rank0():
            atomic_write_json(os.path.join(self.run_dir, "results.json"), results)
        self.metrics.summary(results)
        self.metrics.close()
        return results


def start_step(cfg, step_name: str) -> StepContext:
    """Join the process group, take the run directory (one job at a time), seed, log to `<output_dir>/logs`, and pick
    the checkpoint to resume from."""
    train = getattr(cfg, "train", None)
    strategy.setup_distributed(train.collective_timeout_minutes if train else 30.0)
    run_lock.hold_for_job(cfg.output_dir)  # before anything is written there, logs included
    strategy.built_ds_configs.clear()
    strategy.loading_universal = False  # until the checkpoint manager resumes on another world size
    set_seed(train.seed if train else 0)
    setup_logging(cfg.output_dir)
    log.info("%s: world size %d, device %s, run dir %s", step_name, world_size(), strategy.device(), cfg.output_dir)
    given = to_dict(cfg)
    checkpoint = CheckpointManager(cfg, step_name, given)
    startup.phase("reading data")
    ctx = StepContext(cfg, step_name, cfg.output_dir, checkpoint, LoopState(), NonFiniteGuard(train), given=given)
    checkpoint.register("loop", ctx.loop_state)
    checkpoint.register("nonfinite_guard", ctx.guard)
    return ctx


class LoopState(dict):
    """A step's loop figures (counters, history, results): a dict that saves and restores itself with the checkpoint
    manager (`ctx.checkpoint.register`), so a resumed run continues from them."""

    def state_dict(self) -> dict:
        return dict(self)

    def load_state_dict(self, state: dict) -> None:
        self.update(state)


class NonFiniteGuard:
    """Watches every loss before backward. On a NaN/inf loss on any rank (all ranks agree), `train.on_nonfinite_loss`
    decides: "stop" raises NonFiniteLossError; "skip" lets backward run on every rank (ZeRO collectives stay matched)
    but drops that optimizer step, at most `train.max_nonfinite_steps` times in a run."""

    def __init__(self, train: TrainConfig):
        self.policy, self.limit, self.skipped = train.on_nonfinite_loss, train.max_nonfinite_steps, 0
        self._window_finite: dict[int, bool] = {}  # per engine: all losses of the current accumulation window finite

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = state["skipped"]

    def backward_and_step(self, engine, loss: torch.Tensor, step: int, what: str) -> None:
        finite = strategy.finite_on_all_ranks(loss)
        if not finite and self.policy == "stop":
            raise NonFiniteLossError(f"step {step}: the {what} loss is {loss.item()} on at least one rank; stopping "
                                     "(train.on_nonfinite_loss=stop); the last complete checkpoint is kept")
        window_finite = self._window_finite.get(id(engine), True) and finite
        boundary = engine.is_gradient_accumulation_boundary()
        strategy.backward_and_step(engine, loss, window_finite)
        self._window_finite[id(engine)] = window_finite or boundary
        if boundary and not window_finite:
            self.skipped += 1
            log.warning("step %d: non-finite %s loss; optimizer step skipped on every rank (%d of at most %d)",
                        step, what, self.skipped, self.limit)
            if not strategy.weights_finite(engine):
                raise NonFiniteLossError(f"step {step}: the {what} weights are no longer finite after a skipped step; "
                                         "stopping; the last complete checkpoint is kept")
            if self.skipped > self.limit:
                raise NonFiniteLossError(f"{self.skipped} optimizer steps had non-finite losses, more than "
                                         f"train.max_nonfinite_steps={self.limit}; stopping; the last complete "
                                         "checkpoint is kept")


def builtin_data(task: BuiltinTaskConfig, run_dir: str) -> dict[str, str]:
    """The built-in task's files, written once by rank 0 under `<run_dir>/data` (deterministic by seed)."""
    from rlhf_ds.data.builtin_task import BuiltinTask

    out = os.path.join(run_dir, "data")
    if is_rank0():
        BuiltinTask(task.seed).write(out)
    barrier()
    return BuiltinTask.file_paths(out)


def preference_data(cfg, tokenizer, step_name: str) -> tuple[list[dict], list[dict], bool]:
    """The (training, held-out) preference features of a pairwise step (reward model, DPO) from `data.train` /
    `data.eval`, or the built-in task's pairs, and whether they are the built-in ones. Held-out pairs are split off
    the training pairs when no eval set is given (`data.eval_split`), and what is left must fill one global batch:
    refused here, before any model loads."""
    from rlhf_ds.data.features import preference_features
    from rlhf_ds.data.formats import load_preferences

    data, seed = cfg.data, cfg.train.seed
    train_src, eval_src = data.train, data.eval
    if train_src is None:
        files = builtin_data(cfg.task, cfg.output_dir)
        train_src, eval_src = files["pref_train"], files["pref_eval"]

    def read(source):
        examples, report = load_preferences(source, fmt=data.format, columns=data.columns, on_bad_row=data.on_bad_row,
                                            template=data.template, seed=seed)
        return source, examples, report

    def featurize(source, examples, report):
        feats, lengths = preference_features(examples, tokenizer, data.max_prompt_tokens, data.max_seq_len,
                                             data.prompt_overflow)
        log.info("%s data %s: %s; %s", step_name, source, report.summary(), lengths.summary())
        return feats

    sets = [read(train_src), *([read(eval_src)] if eval_src else [])]
    log.info("%s: %s", step_name, fit_budgets(cfg, tokenizer, [ex for _, examples, _ in sets for ex in examples],
                                              cfg.model, unit="pairs"))
    train_feats = featurize(*sets[0])
    eval_feats = featurize(*sets[1]) if eval_src else None
    return (*split_eval(train_feats, eval_feats, data.eval_split, seed, "pairs", global_batch(cfg.train)),
            data.train is None)


def global_batch(train: TrainConfig) -> tuple[int, str]:
    """The examples of one optimizer step over all ranks, and what makes it up (for messages)."""
    ranks = world_size()
    return (train.micro_batch_size * ranks * train.grad_accum,
            f"train.micro_batch_size {train.micro_batch_size} x {ranks} rank{'' if ranks == 1 else 's'} x "
            f"train.grad_accum {train.grad_accum}")


def eval_count(n_train: int, split: int | float, unit: str = "examples", batch: tuple[int, str] = (1, "")) -> int:
    """How many of `n_train` examples `data.eval_split` holds out: a count, or a fraction (at least one). What is left
    must fill one global `batch` (size, what makes it up): else a DataError naming data.eval_split, the examples there
    are and the largest value that works (or the batch keys, when even all of them are too few)."""
    from rlhf_ds.data.readers import DataError

    n_eval = split if isinstance(split, int) else max(1, int(n_train * split)) if split else 0
    size, made_of = batch
    if n_train < size or n_train < 1:
        if not made_of:
            raise DataError(f"the training data has {n_train} {unit}: nothing to train on")
        raise DataError(f"the training data has {n_train} {unit}, fewer than one global batch ({made_of}) of {size}: "
                        "lower train.micro_batch_size or train.grad_accum, or give more data")
    if n_eval and n_train - n_eval < size:
        most = n_train - size
        needs = f"one global batch ({made_of}) needs {size} of them" if made_of else f"training needs at least {size}"
        if most < 1:
            fix = "set data.eval_split=0 (nothing held out)"
        else:
            fraction = _largest_fraction(n_train, most)
            fix = f"set data.eval_split to at most {most} (a count)" + (f" or {fraction:g} (a fraction)"
                                                                         if fraction else "")
        raise DataError(f"data.eval_split={split} holds out {n_eval} {unit}, but the training data has {n_train} "
                        f"{unit} and {needs}: {fix}, or give the held-out set as data.eval")
    return n_eval


def _largest_fraction(n: int, most: int) -> float | None:
    """A fraction (3 decimals) that holds out at most `most` of `n` examples, as eval_count counts it; None if none."""
    fraction = math.floor(most / n * 1000) / 1000
    while fraction > 0 and max(1, int(n * fraction)) > most:
        fraction = round(fraction - 0.001, 3)
    return fraction if fraction > 0 else None


POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


def model_positions(model_path: str) -> tuple[Optional[int], str]:
    """(the token positions a model folder's config.json allows, the key that says so); (None, "") when it does not
    say (rotary families without a limit)."""
    import json

    from rlhf_ds.models.loading import resolve_model_dir

    try:
        with open(os.path.join(resolve_model_dir(model_path), "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None, ""  # the loader names what is wrong with the folder
    for section in (config, config.get("text_config") or {}):
        for key in POSITION_KEYS:
            if isinstance(section.get(key), int) and section[key] > 0:
                return section[key], key
    return None, ""


def fit_budgets(cfg, tokenizer, examples: list, model_path: str, new_tokens: Optional[int] = None,
                unit: str = "examples") -> str:
    """Set the token budgets left null (`data.max_prompt_tokens`, `data.max_seq_len`) from the measured lengths of
    `examples` (all the step will read) within the positions of the model at `model_path`; `new_tokens`: the tokens a
    PPO response may add after its prompt. Refuses, before any model loads (exit 2), a budget beyond the model's
    positions and budgets that would cut more than `data.max_cut_share` of the examples, naming the key to raise and
    the longest example's row. Returns a line saying what the budgets are and where they came from."""
    from rlhf_ds.config import ConfigError
    from rlhf_ds.data.features import measured_lengths
    from rlhf_ds.data.readers import DataError

    data = cfg.data
    positions, key = model_positions(model_path)
    prompts, whole = measured_lengths(tokenizer, examples)
    room = 1 if new_tokens is None else new_tokens  # tokens a sequence needs after its prompt
    said = []
    if data.max_prompt_tokens is None:
        limits = [n for n in (positions and positions - room, data.max_seq_len and data.max_seq_len - 1) if n]
        data.max_prompt_tokens = max(2, min([max(prompts), *limits]))
        said.append(f"max_prompt_tokens {data.max_prompt_tokens} (the longest prompt: {max(prompts)})")
    if data.max_seq_len is None:
        longest = data.max_prompt_tokens + new_tokens if whole is None else max(whole)
        data.max_seq_len = max(data.max_prompt_tokens + 1, min(longest, positions or longest))
        said.append(f"max_seq_len {data.max_seq_len} (the longest " +
                    ("prompt budget + generation.max_new_tokens" if whole is None else f"example: {longest}") + ")")
    need, what = ((data.max_prompt_tokens + new_tokens, "data.max_prompt_tokens + generation.max_new_tokens")
                  if new_tokens is not None else (data.max_seq_len, "data.max_seq_len"))
    if positions is not None and need > positions:
        raise ConfigError(f"{what} ({need}) exceeds the {positions} positions of the model {model_path} "
                          f"(config.json {key}): lower it")
    checks = [("data.max_prompt_tokens", "prompts", prompts, data.max_prompt_tokens)]
    if whole is not None:
        checks.append(("data.max_seq_len", "sequences (prompt + response + EOS)", whole, data.max_seq_len))
    for name, kind, lengths, budget in checks:
        over = [i for i, n in enumerate(lengths) if n > budget]
        if over and len(over) > data.max_cut_share * len(lengths):
            i = max(over, key=lengths.__getitem__)
            within = f" (the model has {positions} positions)" if positions else ""
            raise DataError(
                f"{len(over)} of {len(lengths)} {unit} ({len(over) / len(lengths):.1%}) have {kind} longer than "
                f"{name}={budget} tokens and would be cut (data.max_cut_share allows {data.max_cut_share:.1%}); the "
                f"longest has {lengths[i]} tokens, at {examples[i].origin or 'an unnamed row'}: raise {name} to "
                f"{lengths[i]}{within}, or raise data.max_cut_share to cut them")
    return (f"token budgets from the data: {', '.join(said)}" if said else
            f"token budgets: max_prompt_tokens {data.max_prompt_tokens}, max_seq_len {data.max_seq_len}")


def split_eval(train: list, eval_: list | None, split: int | float, seed: int, unit: str = "examples",
               batch: tuple[int, str] = (1, "")) -> tuple[list, list]:
    """Use the given eval set, or hold out a seeded `split` of the training examples (`data.eval_split`: a fraction
    below 1, or a count). The training examples left must fill one global `batch` (`global_batch`); call it before
    any model loads, so that too little data is refused in seconds (eval_count)."""
    if eval_ is not None or split == 0:
        eval_count(len(train), 0, unit, batch)
        return train, eval_ or []
    import numpy as np

    n_eval = eval_count(len(train), split, unit, batch)
    order = np.random.default_rng(seed).permutation(len(train))
    return [train[i] for i in order[n_eval:]], [train[i] for i in order[:n_eval]]
