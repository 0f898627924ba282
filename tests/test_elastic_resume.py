"""Resume on another world size (issue #25): a supervised step's checkpoint written by 2 ranks under ZeRO-3 continues
on 1 rank, and that run's checkpoint on 2 ranks again, with the global batch kept (train.grad_accum re-derived), the ZeRO shards
converted once to DeepSpeed's universal format beside the checkpoint (the original untouched), the same examples per
step (their id sums are logged) and the uninterrupted run's losses and weights to 1e-5; a micro-batch size that
cannot keep the global batch is refused (exit 2) with the sizes and the keys to set.

PPO (GAE with a critic, EMA shards, PPO-ptx, an adaptive KL controller) 2 -> 1 ranks and GRPO 1 -> 2: the rollout of
the first resumed step is the uninterrupted run's (replayed by tests/replay_ext.py, whichever rank draws which prompt),
and its scoring -- old and reference log-probs, KL, rewards -- equals the uninterrupted run's to 1e-5.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from conftest import REPO, ppo_resume_args, read_metrics, run_cli, run_cli_many
from dist_hybrid_models import tiny_models

ARGS = ["train.max_steps=6", "train.eval_every=0", "train.log_every=1", "checkpoint.every_minutes=0",
        "checkpoint.every_steps=3", "checkpoint.keep_last=3", "engine.zero_stage=3"]
STEP = 3


def run(step: str, model: str, out: str, ranks: int, *extra: str, check: bool = True):
    return run_cli([step, f"output_dir={out}", f"model={model}", *ARGS, *extra], ranks=ranks, check=check)


def resumable_copy(src: str, dst: str, step: int) -> str:
    """A run directory holding only `src`'s checkpoint of `step`, as a job requeued after that checkpoint finds it."""
    name = f"step_{step:08d}"
    os.makedirs(os.path.join(dst, "checkpoints"))
    shutil.copytree(os.path.join(src, "checkpoints", name), os.path.join(dst, "checkpoints", name))
    with open(os.path.join(dst, "checkpoints", "latest"), "w") as f:
        f.write(name + "\n")
    return os.path.join(dst, "checkpoints", name)


def digest(folder: str) -> dict:
    def sha(path: str) -> str:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    return {os.path.relpath(os.path.join(d, n), folder): sha(os.path.join(d, n)) for d, _, names in os.walk(folder)
            for n in names}


def by_step(run_dir: str, prefix: str) -> dict[int, dict]:
    rows = {}
    for r in read_metrics(run_dir):
        if any(k.startswith(prefix + "/") for k in r):
            rows.setdefault(r["step"], {}).update(r)
    return rows


def assert_continues(reference: str, resumed: str, prefix: str, after: int = STEP, last: int = 6,
                     unconstrained: tuple[str, ...] = ()) -> None:
    """Steps after `after` to `last` take the same examples with the same losses and learning rates, and the final
    weights match to 1e-5, but for the `unconstrained` tensors (which the loss gives no gradient beyond rounding)."""
    from safetensors.torch import load_file

    ref, got = by_step(reference, prefix), by_step(resumed, prefix)
    steps = list(range(after + 1, last + 1))
    assert sorted(s for s in got if s > after) == steps
    for s in steps:
        assert got[s][f"{prefix}/example_id_sum"] == ref[s][f"{prefix}/example_id_sum"], s  # the same examples
        assert got[s][f"{prefix}/example_id_sq_sum"] == ref[s][f"{prefix}/example_id_sq_sum"], s
        assert got[s][f"{prefix}/loss"] == pytest.approx(ref[s][f"{prefix}/loss"], abs=1e-5), s
        assert got[s][f"{prefix}/lr"] == pytest.approx(ref[s][f"{prefix}/lr"], abs=1e-12), s
    a = load_file(os.path.join(reference, "model", "model.safetensors"))
    b = load_file(os.path.join(resumed, "model", "model.safetensors"))
    assert a.keys() == b.keys() and set(unconstrained) <= set(a)
    assert max((a[k] - b[k]).abs().max().item() for k in a if k not in unconstrained) <= 1e-5


def trained_batch(run_dir: str, step: int) -> dict:
    with open(os.path.join(run_dir, "checkpoints", f"step_{step:08d}", "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    return {"world_size": state["world_size"], **state["batch"]}


def test_sft_resumes_from_two_ranks_on_one_and_back_with_the_same_examples_losses_and_weights(tiny_base, tmp_path):
    """One chain: a 2-rank run's checkpoint of step 3 continues on 1 rank (train.grad_accum 1 -> 2), and that run's own
    checkpoint of step 6 on 2 ranks again (2 -> 1), with the same command throughout; both follow the uninterrupted
    2-rank run to the end (step 9)."""
    extra = ["train.max_steps=9", "train.micro_batch_size=4", "train.grad_accum=1"]  # global batch 8
    reference = str(tmp_path / "reference")
    run("sft", tiny_base, reference, 2, *extra)
    on_one = str(tmp_path / "on_one")
    original = resumable_copy(reference, on_one, STEP)
    before = digest(original)
    # a micro-batch size that cannot make the global batch: refused, nothing converted
    proc = run("sft", tiny_base, on_one, 1, "train.max_steps=9", "train.micro_batch_size=3", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("was written by 2 ranks and this run has 1: its global batch of 8 examples (train.micro_batch_size 4 x 2 "
            "ranks x train.grad_accum 1) cannot be kept with train.micro_batch_size 3") in proc.stderr
    assert not os.path.exists(original + ".universal") and digest(original) == before
    # a checkpoint missing one of its ZeRO shards: refused by name before anything converts or loads
    damaged = str(tmp_path / "damaged")
    shutil.copytree(original, damaged)
    shard = next(os.path.relpath(os.path.join(d, n), damaged) for d, _, names in os.walk(damaged) for n in names
                 if "optim_states" in n)
    os.unlink(os.path.join(damaged, shard))
    proc = run("sft", tiny_base, str(tmp_path / "elsewhere"), 1, *extra, f"checkpoint.resume={damaged}", check=False)
    assert proc.returncode == 2 and f"missing file {shard}" in proc.stderr, proc.stderr[-3000:]
    assert not os.path.exists(damaged + ".universal")

    proc = run("sft", tiny_base, on_one, 1, *extra)
    assert "on 1 ranks: global batch 8 kept as train.micro_batch_size 4 x 1 ranks x train.grad_accum 2" in proc.stderr
    assert digest(original) == before  # the checkpoint was only read
    assert os.path.isfile(original + ".universal/COMPLETE")
    assert_continues(reference, on_one, "sft", STEP, 9)
    # its checkpoints record the accumulation it trained with, though the command says train.grad_accum=1
    assert trained_batch(on_one, 6) == {"world_size": 1, "micro_batch_size": 4, "grad_accum": 2}

    back_on_two = str(tmp_path / "back_on_two")
    resumable_copy(on_one, back_on_two, 6)
    proc = run("sft", tiny_base, back_on_two, 2, *extra)
    assert "on 2 ranks: global batch 8 kept as train.micro_batch_size 4 x 2 ranks x train.grad_accum 1" in proc.stderr
    assert_continues(reference, back_on_two, "sft", 6, 9)
    assert trained_batch(back_on_two, 9) == {"world_size": 2, "micro_batch_size": 4, "grad_accum": 1}


def test_rm_and_dpo_resume_from_two_ranks_on_one(tiny_base, tmp_path):
    """The reward model and DPO (its policy; the reference is frozen and loaded from the model folder), each run in
    one launch for both steps."""
    extra = {"rm": ["train.micro_batch_size=2"], "dpo": ["train.micro_batch_size=2"]}
    reference = {step: str(tmp_path / f"{step}_reference") for step in extra}
    resumed = {step: str(tmp_path / f"{step}_resumed") for step in extra}

    def command(step: str, out: str) -> list[str]:
        return [step, f"output_dir={out}", f"model={tiny_base}", *ARGS, *extra[step]]

    run_cli_many([command(step, reference[step]) for step in extra], ranks=2)
    for step in extra:
        resumable_copy(reference[step], resumed[step], STEP)
    proc = run_cli_many([command(step, resumed[step]) for step in extra], ranks=1)
    assert proc.stderr.count("on 1 ranks: global batch 4 kept as train.micro_batch_size 2 x 1 ranks x "
                             "train.grad_accum 2") == 2
    # the reward model's final LayerNorm bias shifts every score alike: the pairwise loss gives it a zero gradient up
    # to rounding, which Adam's normalisation turns into steps of any sign, so any two runs that round differently
    # (1 rank or 2, uninterrupted) end with different values there
    assert_continues(reference["rm"], resumed["rm"], "rm", unconstrained=("ln_f.bias",))
    assert_continues(reference["dpo"], resumed["dpo"], "dpo")


REPLAY_EXT = os.path.join(REPO, "tests", "replay_ext.py")
# figures of the first resumed step that are sums or means per response, so the same rollout gives the same value on
# any number of ranks; means over a rank's tokens or within its rollout (value_mean, task_reward_std, distinct_*) and
# the update's figures (micro-batches follow each rank's shuffle) are not
SCORING = ("ppo/kl", "ppo/task_reward", "ppo/score_with_penalty", "ppo/non_score_reward", "ppo/response_length",
           "ppo/eos_rate", "ppo/beta")


@pytest.mark.parametrize("estimator, ranks_before, ranks_after", [("gae", 2, 1), ("grpo", 1, 2)])
def test_ppo_resumes_on_another_world_size_scoring_the_same_rollout(tmp_path_factory, tmp_path, estimator,
                                                                       ranks_before, ranks_after):
    models = tiny_models(tmp_path_factory)
    record = str(tmp_path / "rollouts")

    def ppo(out: str, ranks: int, **env: str):
        args = ppo_resume_args(models, out, "ppo.steps=3", "checkpoint.every_steps=2", "data.eval_split=0",
                               f"plugins=[{REPLAY_EXT}]", "hybrid.backend=replay", estimator=estimator)
        return run_cli(args, ranks=ranks, env_extra=env)

    reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
    ppo(reference, ranks_before, REPLAY_RECORD=record)
    original = resumable_copy(reference, resumed, 2)
    before = digest(original)
    proc = ppo(resumed, ranks_after, REPLAY_FROM=record, REPLAY_FIRST_SYNC="3")
    prompts, accum = 4 * ranks_before, 2 * ranks_before // ranks_after  # ppo.rollout_batch_size 4, grad_accum 2
    assert (f"on {ranks_after} ranks: rollouts of {prompts} prompts kept as ppo.rollout_batch_size "
            f"{prompts // ranks_after} x {ranks_after} ranks, global batch {2 * 2 * ranks_before} kept as "
            f"ppo.micro_batch_size 2 x {ranks_after} ranks x ppo.grad_accum {accum}") in proc.stderr
    assert digest(original) == before and os.path.isfile(original + ".universal/COMPLETE")
    ref, got = by_step(reference, "ppo"), by_step(resumed, "ppo")
    assert max(got) == 3  # the run continued to its end
    for key in SCORING:
        assert got[3][key] == pytest.approx(ref[3][key], abs=1e-5), key
    assert abs(got[3]["ppo/kl"]) > 1e-3  # the actor moved from the reference: the log-probs compared differ
    assert os.path.isfile(os.path.join(resumed, "model", "model.safetensors"))
