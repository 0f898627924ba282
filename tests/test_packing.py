"""Padding-free packing and token-budget micro-batches (`train.packing`, `ppo.packing`,
`train.max_tokens_per_micro_batch`).

* In one process, for GPT-2, LLaMA and OPT architectures in fp32: every forward of the package (PPO log-probs,
  critic values, reward scores, LM loss and its gradient, DPO sequence log-probs) gives the same per-sequence numbers
  packed and padded (left, right and both-side padding), and the same as each sequence alone.
* Through the real CLI on 2 CPU ranks (this file is also the rank script, see `rank_main`): SFT and RM train to the
  same per-step losses packed and padded; ZeRO-3 on 2 ranks equals ZeRO-0 on 1 rank with packing on; and a step cut
  into micro-batches by a token budget has the gradient of the same step cut by sample count (the full gradient of
  step 1 is read with DeepSpeed's `safe_get_full_grad` just before the optimizer runs).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, RUN_SEPARATOR, cli_env, free_port, read_metrics, split_runs

ARCHS = ("gpt2", "llama", "opt")


def tiny_model(arch: str, head: str = "lm"):
    import torch
    from transformers import (AutoModel, AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig)

    torch.manual_seed(0)
    cfg = {
        "gpt2": lambda: GPT2Config(vocab_size=120, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                   bos_token_id=1, eos_token_id=2),
        "llama": lambda: LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0),
        "opt": lambda: OPTConfig(vocab_size=120, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=0),
    }[arch]()
    cls = AutoModelForCausalLM if head == "lm" else AutoModel
    return cls.from_config(cfg).eval()


def ragged_batch(width: int = 14):
    """4 rows: left-padded, right-padded, padded on both sides, full; prompt part = the first 6 columns."""
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (4, width), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, 10:] = 0
    mask[2, :2] = 0
    mask[2, 11:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_logprobs_and_lm_loss_equal_padded_and_alone(arch):
    import torch

    from rlhf_ds.data.features import IGNORE_INDEX
    from rlhf_ds.rl.experience import sequence_logprobs
    from rlhf_ds.steps.lm_training import lm_loss

    model = tiny_model(arch)
    ids, mask = ragged_batch()
    P = 6
    padded = sequence_logprobs(model, ids, mask, P, 0.7, packing=False)
    packed = sequence_logprobs(model, ids, mask, P, 0.7, packing=True)
    resp = mask[:, P:].bool()
    assert (padded[resp] - packed[resp]).abs().max().item() < 1e-5
    for i in range(4):  # each row alone, unpadded: the numbers a sequence has by itself
        keep = mask[i].bool()
        alone_ids = ids[i, keep][None]
        n_prompt = int(mask[i, :P].sum())
        alone = sequence_logprobs(model, alone_ids, torch.ones_like(alone_ids), n_prompt, 0.7)[0]
        assert (packed[i][resp[i]] - alone).abs().max().item() < 1e-5
    # the LM loss and its gradient: labels on real tokens after the prompt
    labels = ids.masked_fill(~mask.bool(), IGNORE_INDEX)
    labels[:, :P] = IGNORE_INDEX
    grads = {}
    for packing in (False, True):
        model.zero_grad()
        nll, n = lm_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, packing)
        (nll / n).backward()
        grads[packing] = (nll.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-6)
    assert (grads[True][1] - grads[False][1]).abs().max().item() < 1e-5
    assert grads[False][1].abs().max().item() > 1e-3  # a real gradient


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_values_scores_and_pair_logps_equal_padded(arch):
    import torch

    from rlhf_ds.models.scalar_head import ScalarHeadModel
    from rlhf_ds.rl.experience import token_values
    from rlhf_ds.steps.dpo import pair_logps

    torch.manual_seed(3)
    backbone = tiny_model(arch, head="backbone")
    scorer = ScalarHeadModel(backbone, torch.nn.Linear(32, 1)).eval()
    ids, mask = ragged_batch()
    resp = mask[:, 6:].bool()
    values = {p: token_values(scorer, ids, mask, 6, packing=p) for p in (False, True)}
    assert (values[True][resp] - values[False][resp]).abs().max().item() < 1e-5
    scores = {p: scorer.raw_scores(ids, mask, packing=p) for p in (False, True)}
    assert (scores[True] - scores[False]).abs().max().item() < 1e-5
    assert scores[False].std().item() > 1e-4  # rows really differ

    lm = tiny_model(arch)
    # a preference batch: rows 0-1 chosen, 2-3 rejected, right-padded as collate_preferences pads them
    pref_ids, pref_mask = ids.clone(), torch.ones_like(mask)
    pref_mask[0, 12:] = 0
    pref_mask[2, 9:] = 0
    batch = {"input_ids": pref_ids, "attention_mask": pref_mask, "prompt_lens": torch.tensor([5, 4])}
    (lp0, n0), (lp1, n1) = (pair_logps(lm, batch, packing=p) for p in (False, True))
    assert torch.equal(n0, n1)
    assert (lp0 - lp1).abs().max().item() < 1e-5


def test_token_budget_groups():
    from rlhf_ds.data.batching import token_budget_groups

    lengths = {7: 30, 3: 50, 9: 25, 1: 90, 4: 10, 5: 60}
    # in order: 7+3 = 80 <= 100; +9 = 105 > 100 -> new; 9 alone (+1 = 115); 1 alone over budget 100? 90 fits alone;
    # 1+4 = 100 <= 100; 5 alone
    assert token_budget_groups([7, 3, 9, 1, 4, 5], lengths, 100) == [[7, 3], [9], [1, 4], [5]]
    assert token_budget_groups([1, 5], lengths, 50) == [[1], [5]]  # longer than the budget: a micro-batch of its own
    assert token_budget_groups([4, 9, 7], lengths, 1000) == [[4, 9, 7]]


# ---------------------------------------------------------------------------------------------------------------------
# Real runs: this file as the rank script
# ---------------------------------------------------------------------------------------------------------------------
STEPS = 3
SMALL = ["data.max_seq_len=48", "data.max_prompt_tokens=24", "train.micro_batch_size=4", "train.log_every=1",
         "train.eval_batch_size=50", f"train.max_steps={STEPS}", "train.eval_every=0"]


def rank_main(argv: list[str]) -> int:
    """Each `::`-separated CLI command in turn; the full gradient of optimizer step 1 of each is saved (rank 0) as
    `<output_dir>.grad.pt`, read at the accumulation boundary after backward, before the optimizer."""
    import torch
    from deepspeed.utils import safe_get_full_grad

    from rlhf_ds import cli
    from rlhf_ds.engine import strategy
    from rlhf_ds.utils import rank

    original = strategy.backward_and_step
    for args in split_runs(argv):
        out_dir = next(a.split("=", 1)[1] for a in args if a.startswith("output_dir="))
        seen = {"saved": False}

        def observed(engine, loss, finite):
            if seen["saved"] or not engine.is_gradient_accumulation_boundary():
                return original(engine, loss, finite)
            engine.backward(loss)
            grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters() if p.requires_grad}
            if rank() == 0:
                torch.save({n: g.detach().cpu().clone() for n, g in grads.items()}, f"{out_dir}.grad.pt")
            seen["saved"] = True
            engine.step()

        strategy.backward_and_step = observed
        code = cli.main(args)
        strategy.backward_and_step = original
        if code:
            return code
    return 0


def launch(runs: dict[str, list[str]], ranks: int) -> None:
    argv = []
    for out_dir, args in runs.items():
        argv += ([RUN_SEPARATOR] if argv else []) + [*args, f"output_dir={out_dir}", "checkpoint.every_minutes=0"]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--no_local_rank",
           "--master_port", str(free_port()), os.path.abspath(__file__), *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(threads=1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("packing")
    sft = ["sft", f"model={tiny_base}", *SMALL, "train.grad_accum=2"]
    rm = ["rm", f"model={tiny_base}", *SMALL]
    two = {
        "sft_padded": [*sft, "engine.zero_stage=3"],
        "sft_packed": [*sft, "engine.zero_stage=3", "train.packing=true", "engine.logit_chunk_tokens=16"],
        # the same steps cut by tokens (the examples here are 20-48 tokens long): 1-4 per micro-batch, per rank
        "sft_budget_packed": [*sft, "engine.zero_stage=3", "train.packing=true", "train.max_tokens_per_micro_batch=90"],
        "sft_budget_padded": [*sft, "engine.zero_stage=3", "train.max_tokens_per_micro_batch=130"],
        "rm_padded": [*rm, "engine.zero_stage=3"],
        "rm_packed": [*rm, "engine.zero_stage=3", "train.packing=true"],
        # pairs of 40-90 tokens (chosen + rejected) under a budget of 150: one to three pairs per micro-batch
        "rm_budget_packed": [*rm, "engine.zero_stage=3", "train.packing=true", "train.max_tokens_per_micro_batch=150"],
        # the same global batch of 8 pairs as 2 accumulated micro-batches of 2 per rank
        "rm_accum": [*rm, "engine.zero_stage=3", "train.micro_batch_size=2", "train.grad_accum=2"],
    }
    one = {"sft_packed_zero0": ["sft", f"model={tiny_base}", *SMALL, "train.grad_accum=4", "engine.zero_stage=0",
                                "train.packing=true", "engine.logit_chunk_tokens=0"]}
    out = {name: str(root / name) for name in (*two, *one)}
    launch({out[k]: v for k, v in two.items()}, ranks=2)
    launch({out[k]: v for k, v in one.items()}, ranks=1)
    return out


def step_figures(run_dir: str, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in read_metrics(run_dir) if key in row}


@pytest.mark.parametrize("step,key", [("sft", "sft/loss"), ("rm", "rm/loss")])
def test_packed_training_losses_equal_padded(runs, step, key):
    padded, packed = step_figures(runs[f"{step}_padded"], key), step_figures(runs[f"{step}_packed"], key)
    assert sorted(padded) == sorted(packed) == list(range(1, STEPS + 1))
    for s in padded:
        assert packed[s] == pytest.approx(padded[s], rel=1e-5, abs=0), (s, packed, padded)
    assert len({round(v, 5) for v in padded.values()}) == STEPS  # training moves the loss


@pytest.mark.parametrize("regrouped", ["rm_budget_packed", "rm_accum"])
def test_regrouped_rm_trains_as_the_fixed_batch_run(runs, regrouped):
    """The reward model's loss is a pair-weighted mean over the step: the same pairs cut into other micro-batches (by a
    token budget, or accumulated) give the same trajectory. (Its forward once went to the module instead of the
    engine, which left ZeRO-3 overwriting, not adding, the gradients of a step's earlier micro-batches: these runs
    caught it, at step 2.)"""
    fixed, other = step_figures(runs["rm_padded"], "rm/loss"), step_figures(runs[regrouped], "rm/loss")
    for s in range(1, STEPS + 1):
        assert other[s] == pytest.approx(fixed[s], rel=1e-5, abs=0), (s, other, fixed)
    if regrouped == "rm_budget_packed":  # not the fixed run's one micro-batch of 4 pairs
        assert step_figures(runs[regrouped], "rm/micro_batches")[1] >= 2


def test_packed_zero3_two_ranks_equals_zero0_one_rank(runs):
    z3, z0 = step_figures(runs["sft_packed"], "sft/loss"), step_figures(runs["sft_packed_zero0"], "sft/loss")
    for s in range(1, STEPS + 1):
        assert z3[s] == pytest.approx(z0[s], rel=1e-5, abs=0), (s, z3, z0)


@pytest.mark.parametrize("budgeted", ["sft_budget_packed", "sft_budget_padded"])
def test_token_budget_step_has_the_gradient_of_the_fixed_batch_step(runs, budgeted):
    import torch

    fixed = torch.load(f"{runs['sft_padded']}.grad.pt", weights_only=True)
    got = torch.load(f"{runs[budgeted]}.grad.pt", weights_only=True)
    assert fixed.keys() == got.keys() and len(fixed) > 10
    worst = max((fixed[n] - got[n]).abs().max().item() for n in fixed)
    assert worst < 1e-6, worst
    assert max(g.abs().max().item() for g in fixed.values()) > 1e-3  # a real gradient
    # the budget really regrouped the step: not the 2 micro-batches of 4 of the fixed run
    assert step_figures(runs[budgeted], "sft/micro_batches")[1] >= 3
    # same step-1 loss (the loss is normalised over the step's tokens, however they were grouped)
    assert step_figures(runs[budgeted], "sft/loss")[1] == pytest.approx(
        step_figures(runs["sft_padded"], "sft/loss")[1], rel=1e-6)


def test_packed_ppo_scores_its_first_rollout_as_the_padded_run(ppo_reference, tmp_path_factory, tmp_path):
    """PPO with packed scoring and training forwards (4 ZeRO-3 engines, 2 ranks) against the padded reference run: the
    same first rollout (generation is not packed) gets the same rewards, values, returns and KL; both steps train."""
    from conftest import ppo_metrics_by_step, ppo_resume_args, run_cli
    from dist_hybrid_models import tiny_models

    models = tiny_models(tmp_path_factory)  # the reference's models, already built
    out = str(tmp_path / "ppo_packed")
    run_cli(ppo_resume_args(models, out, "ppo.packing=true", "ppo.steps=2"), ranks=2, timeout=400)
    packed, padded = ppo_metrics_by_step(out), ppo_metrics_by_step(ppo_reference)
    assert sorted(packed) == [1, 2]
    # step 1's losses too: its forwards all run before the second optimizer update, at the peak learning rate both ways
    for key in ("ppo/reward", "ppo/value_mean", "ppo/return_mean", "ppo/gold_reward", "ppo/response_length",
                "ppo/policy_loss", "ppo/value_loss", "ppo/ptx_loss", "ppo/entropy"):
        assert packed[1][key] == pytest.approx(padded[1][key], rel=1e-5, abs=1e-6), key
    assert packed[1]["ppo/kl"] == padded[1]["ppo/kl"] == 0.0


if __name__ == "__main__":
    sys.exit(rank_main(sys.argv[1:]))
