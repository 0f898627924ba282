"""Step 3: RL fine-tuning against a reward with a KL penalty to the frozen reference: PPO (InstructGPT) and the
critic-free estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++).

Each iteration: rollouts from the actor in generation mode (rlhf_ds/rollout/, n samples per prompt) -> experience
(old/reference log-probs, values where a critic exists, rewards from rlhf_ds/rewards/ -> advantages from the estimator
in rlhf_ds/rl/advantages.py) -> `ppo_epochs` passes of clipped-surrogate actor updates (+ optional KL loss and PPO-ptx
LM loss) and, for GAE, clipped value-loss critic updates.
"""
from __future__ import annotations

import json
import logging
import os
import time
from functools import partial

import numpy as np
import torch

from rlhf_ds.config import PPOConfig
from rlhf_ds.data.batching import eval_shard
from rlhf_ds.data.corpus import PtxBatches
from rlhf_ds.data.formats import load_prompts, source_templates
from rlhf_ds.data.readers import DataError
from rlhf_ds.data.features import prompt_features, render_prompt
from rlhf_ds.engine import strategy
from rlhf_ds.engine.ema import ShardedEMA
from rlhf_ds.engine.roles import build_models
from rlhf_ds.models.loading import load_tokenizer, resolve_model_dir, save_causal_lm
from rlhf_ds.models.scalar_head import read_saved_head, save_scalar_head_model
from rlhf_ds.rewards import build_reward
from rlhf_ds.rl import math as rlm
from rlhf_ds.rl.dynamic_sampling import PromptStream
from rlhf_ds.rl.experience import Experience, ExperienceMaker, sequence_logprobs, token_values
from rlhf_ds.rl.update import actor_loss, critic_loss
from rlhf_ds.rollout.backends import build_rollout_engine
from rlhf_ds.rollout.multi_turn import Episodes
from rlhf_ds.steps.common import NonFiniteGuard, builtin_data, fit_budgets, split_eval, start_step
from rlhf_ds.steps.lm_training import lm_loss
from rlhf_ds.tracking.metrics import progress
from rlhf_ds.tracking.rollout_stats import collapse_starts
from rlhf_ds.utils import atomic_write_text, is_rank0, rank, world_size

log = logging.getLogger("rlhf_ds")


def check_prompt_templates(cfg: PPOConfig) -> None:
    """Warn when PPO renders its prompts with other templates than the reward model was trained on (saved with it): the
    RM would score text shaped unlike anything it learned from."""
    if not cfg.reward.model:
        return
    saved = read_saved_head(resolve_model_dir(cfg.reward.model))
    trained = saved[0].get("prompt_templates") if saved else None
    used = source_templates(cfg.data.train, cfg.data.template)
    if trained is not None and not set(used) <= set(trained):
        log.warning("the reward model %s was trained on prompts rendered with templates %s, but PPO renders its "
                    "prompts with %s (None = the prompt as it is); set data.template (or each source's template) to "
                    "the reward model's", cfg.reward.model, trained, used)


def collapse_due(history: list[dict], p) -> list[tuple[str, str, float]]:
    """The rollout-diversity figures whose collapse warning is due at the last step of `history`, as (metric, what it
    counts, threshold)."""
    checks = (("distinct_fraction", "responses", p.collapse_distinct_below),
              ("distinct_2", "word bigrams", p.collapse_distinct2_below))
    return [(key, what, limit) for key, what, limit in checks
            if collapse_starts([h[f"ppo/{key}"] for h in history], limit, p.collapse_patience)]


def no_signal_due(history: list[dict], p) -> bool:
    """Whether the no-task-signal warning is due at the last step of `history`: the task reward had no variance within
    any group (within any rank's rollout, without groups) for `no_signal_patience` steps in a row, starting now."""
    if p.n_samples_per_prompt > 1:
        constant = [h.get("ppo/zero_signal_groups", 0.0) >= 1.0 for h in history]
    else:
        constant = [h.get("ppo/task_reward_std") == 0.0 for h in history]  # rows of older runs: unknown
    return collapse_starts([0.0 if c else 1.0 for c in constant], 0.5, p.no_signal_patience)


def read_prompts(cfg: PPOConfig, source) -> list:
    examples, report = load_prompts(source, fmt=cfg.data.format, columns=cfg.data.columns,
                                    on_bad_row=cfg.data.on_bad_row, template=cfg.data.template, seed=cfg.train.seed)
    log.info("ppo prompts %s: %s", source, report.summary())
    return examples


def prompt_items(cfg: PPOConfig, tokenizer, examples: list, source) -> list[tuple[list[int], str, dict]]:
    """(token ids, rendered text, the row's other columns) of each prompt kept (`data.prompt_overflow`)."""
    ids, lengths = prompt_features(examples, tokenizer, cfg.data.max_prompt_tokens, cfg.data.prompt_overflow)
    if len(ids) != len(examples):  # featurize one by one only where prompts can be dropped, to keep rows aligned
        examples = [ex for ex in examples
                    if prompt_features([ex], tokenizer, cfg.data.max_prompt_tokens, cfg.data.prompt_overflow)[0]]
    log.info("ppo prompts %s: %s", source, lengths.summary())
    return [(i, render_prompt(tokenizer, ex), ex.columns) for i, ex in zip(ids, examples)]


def train_on_experience(exp: Experience, actor, critic, cfg: PPOConfig, ptx: PtxBatches | None, step: int,
                        guard: NonFiniteGuard) -> dict:
    """`ppo_epochs` passes over the rollout in micro-batches; returns mean losses and PPO diagnostics."""
    p, T = cfg.ppo, (cfg.generation.temperature if cfg.generation.do_sample else 1.0)
    n = exp.sequences.shape[0]
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    count = 0
    dev = strategy.device()
    gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + step * 101 + rank())  # minibatch order per step
    for _ in range(p.ppo_epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, p.micro_batch_size):
            mb = exp.minibatch(order[start : start + p.micro_batch_size])
            seq, attn = mb["sequences"], mb["attention_mask"]
            logp, entropy = sequence_logprobs(actor, seq, attn, exp.prompt_len, T, with_entropy=True,
                                              packing=p.packing, chunk_tokens=cfg.actor.engine.logit_chunk_tokens)
            loss, figures = actor_loss(logp, entropy, mb, p, cfg.response_tokens())
            if ptx is not None:
                nll, tokens = lm_loss(actor, {k: v.to(dev) for k, v in ptx.batch(step, count).items()}, p.packing,
                                      cfg.actor.engine.logit_chunk_tokens)
                ptx_loss = nll / max(tokens, 1)
                loss = loss + p.ptx_coef * ptx_loss
                figures["ptx_loss"] = ptx_loss.item()
            figures["actor_grad_norm"] = _step_and_grad_norm(guard, actor, loss, step, "actor")

            if critic is not None:
                vf_loss, vf_figures = critic_loss(token_values(critic, seq, attn, exp.prompt_len, p.packing), mb, p)
                figures.update(vf_figures)
                figures["critic_grad_norm"] = _step_and_grad_norm(guard, critic, p.vf_coef * vf_loss, step, "critic")
            for k, v in figures.items():
                if v is not None:  # grad norms: at optimizer steps, where DeepSpeed's optimizer computes one
                    sums[k], counts[k] = sums.get(k, 0.0) + v, counts.get(k, 0) + 1
            count += 1
    return {k: v / counts[k] for k, v in sums.items()}


def _step_and_grad_norm(guard: NonFiniteGuard, engine, loss: torch.Tensor, step: int, what: str) -> float | None:
    """Backward (and the optimizer step at an accumulation boundary); the gradient norm of that optimizer step."""
    boundary = engine.is_gradient_accumulation_boundary()
    guard.backward_and_step(engine, loss, step, what)
    return strategy.grad_norm(engine) if boundary else None


@torch.no_grad()
def evaluate_prompts(maker: ExperienceMaker, items: list[tuple[list[int], str, dict]], cfg: PPOConfig) -> dict:
    """Rollout figures on held-out prompts, as ppo/eval_<figure>: one response per prompt; every rank answers the same
    number of them (the scoring forwards are collective under ZeRO-3), in rollout-sized chunks, with a fixed seed."""
    per_rank = len(items) // world_size()
    mine = [items[i] for i in eval_shard(len(items), world_size(), rank())[:per_rank]]
    torch.manual_seed(cfg.train.seed * 100003 + rank())
    sums: dict[str, float] = {}
    for start in range(0, per_rank, cfg.ppo.rollout_batch_size):
        chunk = mine[start : start + cfg.ppo.rollout_batch_size]
        stats = maker.make(*(list(x) for x in zip(*chunk)), train=False).stats
        for key, value in stats.items():
            if key in EVAL_FIGURES or key.startswith("env_"):  # env_: the same keys on every rank (info_keys)
                sums[key] = sums.get(key, 0.0) + value * len(chunk) / per_rank
    keys = sorted(sums)
    mean = strategy.all_reduce_mean(torch.tensor([sums[k] for k in keys], dtype=torch.float64)).tolist()
    return {f"ppo/eval_{k}": v for k, v in zip(keys, mean)}


EVAL_FIGURES = ("task_reward", "reward", "kl", "gold_reward", "response_length", "eos_rate", "distinct_fraction", "distinct_2")


def save_models(cfg: PPOConfig, actor, critic, tokenizer, ema, out_dir: str) -> None:
    save_causal_lm(strategy.unwrap(actor), tokenizer, os.path.join(out_dir, "model"))
    if critic is not None:
        save_scalar_head_model(strategy.unwrap(critic), tokenizer, os.path.join(out_dir, "critic"))
    if ema is not None:
        with ema.swapped_in():
            save_causal_lm(strategy.unwrap(actor), tokenizer, os.path.join(out_dir, "ema"))


class RunClock:
    """Seconds of the run, across resumes: a resumed run's clock counts the steps before it too."""

    def __init__(self):
        self.start = time.time()

    def seconds(self) -> float:
        return time.time() - self.start

    def state_dict(self) -> dict:
        return {"seconds": self.seconds()}

    def load_state_dict(self, state: dict) -> None:
        self.start = time.time() - state["seconds"]


def run(cfg: PPOConfig) -> dict:
    ctx = start_step(cfg, "ppo")
    p = cfg.ppo
    tokenizer = load_tokenizer(cfg.actor.model, cfg.trust_remote_code)
    reward_tokenizer = load_tokenizer(cfg.reward.model, cfg.trust_remote_code) if cfg.reward.model else tokenizer
    gold = None
    prompt_src, ptx_src = cfg.data.train, p.ptx_data
    if prompt_src is None or (p.ptx_coef > 0 and ptx_src is None):
        files = builtin_data(cfg.task, cfg.output_dir)
        prompt_src = prompt_src or files["ppo_prompts"]
        ptx_src = ptx_src or files["pretrain"]
        if cfg.data.train is None:
            from rlhf_ds.data.builtin_task import BuiltinTask

            gold = BuiltinTask(cfg.task.seed).gold_reward
    examples = read_prompts(cfg, prompt_src)
    given = read_prompts(cfg, cfg.data.eval) if cfg.data.eval else None
    log.info("ppo: %s", fit_budgets(cfg, tokenizer, examples + (given or []), cfg.actor.model,
                                    cfg.response_tokens(), "prompts"))
    items = prompt_items(cfg, tokenizer, examples, prompt_src)
    check_prompt_templates(cfg)
    # held-out prompts (data.eval, or data.eval_split of the training prompts): never trained on, evaluated every
    # ppo.eval_every steps and at the end
    given = prompt_items(cfg, tokenizer, given, cfg.data.eval) if given else None
    items, eval_items = split_eval(items, given, cfg.data.eval_split, cfg.train.seed)
    if eval_items and len(eval_items) < world_size():
        raise DataError(f"{len(eval_items)} held-out prompts cannot give each of {world_size()} ranks one")
    per_step = p.rollout_batch_size * world_size()
    if len(items) < per_step:
        raise DataError(f"{len(items)} prompts cannot fill one rollout of {per_step} ({p.rollout_batch_size} per rank)")

    actor, critic, reference, reward_engine = build_models(cfg, tokenizer, reward_tokenizer)
    engine = build_rollout_engine(cfg, actor, tokenizer)
    reward = build_reward(cfg, reward_engine, tokenizer, reward_tokenizer)
    kl_ctl = rlm.make_kl_controller(p.kl_controller, p.kl_coef, p.kl_target, p.kl_horizon)
    maker = ExperienceMaker(engine, actor, reference, critic, reward, tokenizer, p, cfg.generation, kl_ctl, gold,
                            (cfg.actor.engine.logit_chunk_tokens, cfg.reference.engine.logit_chunk_tokens),
                            Episodes.from_config(cfg))
    log.info("ppo: reference log-probs from %s; old log-probs from %s",
             "the actor's LoRA base (adapters off)" if reference is None else "a frozen copy",
             "the update's own forward (on-policy: one epoch, one optimizer step, no KL in the reward)"
             if maker.on_policy() else "a forward pass after each rollout")
    log.info("ppo: reward %s; score shaping: %s%s", "+".join(reward.names()), maker.shaping.describe(),
             f"; dynamic sampling: up to {p.dynamic_sampling_max_rounds} extra rounds of {p.rollout_batch_size} "
             "prompts per rank" if p.dynamic_sampling else "")
    ptx = PtxBatches(cfg, tokenizer, ptx_src) if p.ptx_coef > 0 else None
    ema = ShardedEMA(strategy.unwrap(actor), p.ema_decay) if p.ema_decay > 0 else None

    clock, guard = RunClock(), ctx.guard
    ctx.checkpoint.register("kl_controller", kl_ctl)
    ctx.checkpoint.register("clock", clock)
    if ema is not None:
        ctx.checkpoint.register("ema", ema, per_rank=True)
    stream = PromptStream(items, cfg.train.seed, rank()) if p.dynamic_sampling else None
    if stream is not None:  # this rank's extra prompts for dynamic sampling, its cursor saved with each checkpoint
        ctx.checkpoint.register("extra_prompts", stream, per_rank=True)
    ctx.begin({"actor": actor, **({"critic": critic} if critic is not None else {})})
    history = ctx.loop_state.setdefault("history", [])  # after begin: a resumed run's rows are restored there
    if eval_items and is_rank0():
        atomic_write_text(os.path.join(cfg.output_dir, "eval_prompts.jsonl"),
                          "".join(json.dumps({"prompt": text}) + "\n" for _, text, _ in eval_items))
    done = ctx.resumed.get("step", 0)
    if eval_items and done == 0:  # the starting policy on the held-out prompts, the baseline of every later eval
        ctx.loop_state["eval_start"] = evaluate_prompts(maker, eval_items, cfg)
        ctx.metrics.log(ctx.loop_state["eval_start"], step=0)
    bar = progress(p.steps, "ppo", initial=done)
    for step in range(done + 1, p.steps + 1):
        # the prompts of this step: a seeded permutation per pass over the data, this rank's slice of it
        per_epoch = len(items) // per_step
        epoch, pos = divmod(step - 1, per_epoch)
        order = np.random.default_rng([cfg.train.seed, epoch]).permutation(len(items))
        mine = [items[i] for i in order[pos * per_step + rank() * p.rollout_batch_size:][: p.rollout_batch_size]]
        torch.manual_seed(cfg.train.seed * 100003 + step * 101 + rank())  # sampling stream per rank and step

        exp = maker.make(*(list(x) for x in zip(*mine)), group_offset=rank() * p.rollout_batch_size,
                         more_prompts=None if stream is None else partial(stream.take, p.rollout_batch_size))
        t0 = time.time()
        train_stats = train_on_experience(exp, actor, critic, cfg, ptx, step, guard)
        t_train = time.time() - t0
        if ema is not None:
            ema.update()

        local = {**exp.stats, **train_stats, "time_training": t_train}
        keys = sorted(local)
        mean = strategy.all_reduce_mean(torch.tensor([local[k] for k in keys], dtype=torch.float64)).tolist()
        s = dict(zip(keys, mean))
        kl_ctl.update(s["kl"], per_step * p.n_samples_per_prompt)
        metrics = {f"ppo/{k}": v for k, v in s.items() if not k.startswith("time_") and k != "gen_tokens"}
        metrics.update({f"timing/{k[5:]}": v for k, v in s.items() if k.startswith("time_")})
        metrics["ppo/beta"] = kl_ctl.beta
        metrics["perf/generation_tokens_per_s"] = s["gen_tokens"] * world_size() / max(s["time_generation"], 1e-9)
        trained_tokens = exp.attention_mask.sum().item() * p.ppo_epochs
        metrics["perf/training_tokens_per_s"] = trained_tokens * world_size() / max(t_train, 1e-9)
        if eval_items and (step == p.steps or (p.eval_every and step % p.eval_every == 0)):
            metrics.update(evaluate_prompts(maker, eval_items, cfg))
        history.append(metrics)
        if no_signal_due(history, p):
            log.warning("step %d: the task reward (the reward sources before penalties and KL) has not varied %s in "
                        "the last %d steps: the update comes only from the penalties and the KL (ppo/"
                        "penalty_only_groups); the task may be too hard for this policy: check its pass rate with "
                        "`rlhf-ds eval reward_function=...`, try ppo.dynamic_sampling=true or more samples per prompt",
                        step, "within any group" if p.n_samples_per_prompt > 1 else "within any rollout",
                        p.no_signal_patience)
        for key, what, limit in collapse_due(history, p):
            log.warning("step %d: the rollouts are collapsing: only %.0f%% of the %s were distinct in each of the last "
                        "%d steps (below %g); the reward model may be over-rewarding one answer or one pattern (see "
                        "ppo/distinct_fraction, ppo/distinct_2, ppo/reward_length_corr and `rlhf-ds rm-report`)", step,
                        100 * metrics[f"ppo/{key}"], what, p.collapse_patience, limit)
        if step % cfg.train.log_every == 0 or step == p.steps:
            ctx.metrics.log(metrics, step=step)
        bar.update(1)
        bar.set_postfix(reward=f"{s['reward']:.3f}", kl=f"{s['kl']:.3f}")
        ctx.checkpoint.after_step(step)
    bar.close()

    engines = {"actor": actor, "critic": critic, "reference": reference, "reward": reward_engine}
    engines = {name: e for name, e in engines.items() if e is not None}
    held = strategy.all_reduce_max(torch.tensor([float(strategy.held_bytes(e)) for e in engines.values()])).tolist()
    save_models(cfg, actor, critic, tokenizer, ema, cfg.output_dir)
    window = history[-max(1, len(history) // 10):]
    # summary figures over the last 10% of steps
    results = {name: float(np.mean([h[f"ppo/{key}"] for h in window])) for name, key in
               (("reward_mean", "reward"), ("task_reward", "task_reward"), ("kl", "kl"), ("beta", "beta"), ("response_length", "response_length"),
                ("eos_rate", "eos_rate"), ("distinct_fraction", "distinct_fraction"), ("distinct_2", "distinct_2"),
                ("reward_length_corr", "reward_length_corr"))}
    if p.dynamic_sampling:  # over the whole run: prompts sampled per step, and the steps short of signal
        results.update(ds_prompts_sampled=float(np.sum([h["ppo/ds_prompts_sampled"] for h in history])) * world_size(),
                       ds_steps_filled=sum(h["ppo/ds_filled_groups"] > 0 for h in history))
    results.update(collapse_distinct_below=p.collapse_distinct_below, collapse_distinct2_below=p.collapse_distinct2_below,
                   collapse_warning_steps=[i + 1 for i in range(len(history)) if collapse_due(history[: i + 1], p)])
    if eval_items:  # held-out prompts: the starting policy and the trained one
        results.update({f"{k[4:]}_start": v for k, v in ctx.loop_state["eval_start"].items()})
        results.update({k[4:]: v for k, v in history[-1].items() if k.startswith("ppo/eval_")})
    if gold is not None:
        results["gold_reward_first"] = history[0]["ppo/gold_reward"]
        results["gold_reward_last"] = float(np.mean([h["ppo/gold_reward"] for h in window]))
    results.update(steps=p.steps, seconds=clock.seconds(), nonfinite_steps=guard.skipped,
                   advantage_estimator=p.advantage_estimator, n_samples_per_prompt=p.n_samples_per_prompt,
                   # what the engines hold at the end, on the rank holding most (parameters, optimizer states, buffers)
                   state_bytes_per_rank={name: int(b) for name, b in zip(engines, held)},
                   **{f"{k}_seconds": float(np.sum([h[f"timing/{k}"] for h in history]))
                      for k in ("generation", "scoring", "training")})
    return ctx.finish(results)
