"""Resume on another world size (issue #25): a supervised step's checkpoint written by 2 ranks under ZeRO-3 continues
on 1 rank, and one written by 1 rank on 2, with the global batch kept (train.grad_accum re-derived), the ZeRO shards
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

from conftest import REPO, ppo_resume_args, read_metrics, run_cli
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


def assert_continues(reference: str, resumed: str, prefix: str) -> None:
    from safetensors.torch import load_file

    ref, got = by_step(reference, prefix), by_step(resumed, prefix)
    assert sorted(s for s in got if s > STEP) == [4, 5, 6]
    for s in (4, 5, 6):
        assert got[s][f"{prefix}/example_id_sum"] == ref[s][f"{prefix}/example_id_sum"], s  # the same examples
        assert got[s][f"{prefix}/example_id_sq_sum"] == ref[s][f"{prefix}/example_id_sq_sum"], s
        assert got[s][f"{prefix}/loss"] == pytest.approx(ref[s][f"{prefix}/loss"], abs=1e-5), s
        assert got[s][f"{prefix}/lr"] == pytest.approx(ref[s][f"{prefix}/lr"], abs=1e-12), s
    a = load_file(os.path.join(reference, "model", "model.safetensors"))
    b = load_file(os.path.join(resumed, "model", "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


@pytest.mark.parametrize("ranks_before, ranks_after, accum_before", [(2, 1, 1), (1, 2, 2)])
def test_sft_resumes_on_another_world_size_with_the_same_examples_losses_and_weights(
        tiny_base, tmp_path, ranks_before, ranks_after, accum_before):
    extra = ["train.micro_batch_size=4", f"train.grad_accum={accum_before}"]  # global batch 8 either way
    reference = str(tmp_path / "reference")
    run("sft", tiny_base, reference, ranks_before, *extra)
    resumed = str(tmp_path / "resumed")
    original = resumable_copy(reference, resumed, STEP)
    before = digest(original)
    if ranks_after == 1:  # a micro-batch size that cannot make the global batch: refused, nothing converted
        proc = run("sft", tiny_base, resumed, 1, "train.micro_batch_size=3", check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert ("was written by 2 ranks and this run has 1: its global batch of 8 examples (train.micro_batch_size 4 "
                "x 2 ranks x train.grad_accum 1) cannot be kept with train.micro_batch_size 3") in proc.stderr
        assert not os.path.exists(original + ".universal") and digest(original) == before
        # a checkpoint missing one of its ZeRO shards: refused by name before anything converts or loads
        damaged = str(tmp_path / "damaged")
        shutil.copytree(original, damaged)
        shard = next(os.path.relpath(os.path.join(d, n), damaged) for d, _, names in os.walk(damaged) for n in names
                     if "optim_states" in n)
        os.unlink(os.path.join(damaged, shard))
        proc = run("sft", tiny_base, str(tmp_path / "elsewhere"), 1, *extra, f"checkpoint.resume={damaged}",
                   check=False)
        assert proc.returncode == 2 and f"missing file {shard}" in proc.stderr, proc.stderr[-3000:]
        assert not os.path.exists(damaged + ".universal")
    proc = run("sft", tiny_base, resumed, ranks_after, *extra)
    accum_after = accum_before * ranks_before // ranks_after
    assert (f"on {ranks_after} ranks: global batch 8 kept as train.micro_batch_size 4 x {ranks_after} ranks x "
            f"train.grad_accum {accum_after}") in proc.stderr
    assert digest(original) == before  # the checkpoint was only read
    assert os.path.isfile(original + ".universal/COMPLETE")
    assert_continues(reference, resumed, "sft")
    # the resumed run's own checkpoint records the accumulation it trained with: resuming it again on the same world
    # size keeps it although the command still says train.grad_accum={accum_before}
    with open(os.path.join(resumed, "checkpoints", "step_00000006", "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    assert state["batch"] == {"micro_batch_size": 4, "grad_accum": accum_after} and state["world_size"] == ranks_after


def test_dpo_resumes_from_two_ranks_on_one(tiny_base, tmp_path):
    extra = ["train.micro_batch_size=2"]
    reference = str(tmp_path / "reference")
    run("dpo", tiny_base, reference, 2, *extra)
    resumed = str(tmp_path / "resumed")
    resumable_copy(reference, resumed, STEP)
    run("dpo", tiny_base, resumed, 1, *extra)
    assert_continues(reference, resumed, "dpo")


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
