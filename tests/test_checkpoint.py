"""The checkpoint module's pure parts: config comparison, checkpoint validation, RNG capture, the stop flag."""
from __future__ import annotations

import json
import os
import random
import signal

import numpy as np
import pytest
import torch

from rlhf_ds.checkpoint import COMPLETE, StopSignal, checkpoint_problem, config_changes, rng_state, set_rng_state
from rlhf_ds.config import load_config, to_dict


def test_config_changes_split_breaking_from_harmless():
    old = to_dict(load_config("ppo"))
    new = to_dict(load_config("ppo", overrides=["ppo.rollout_batch_size=32", "actor.model=other", "ppo.steps=100",
                                                "actor.engine.lr=1e-6", "output_dir=elsewhere",
                                                "tracking.wandb=true", "checkpoint.every_steps=5",
                                                "critic.engine.zero_stage=2"]))
    breaking, other = config_changes(old, new)
    assert breaking == ["actor.model: 'runs/sft' -> 'other'", "critic.engine.zero_stage: 3 -> 2",
                        "ppo.rollout_batch_size: 16 -> 32"]
    assert other == ["actor.engine.lr: 5e-05 -> 1e-06", "ppo.steps: 60 -> 100"]  # output_dir, tracking, checkpoint: not compared


def _fake_checkpoint(path, files: dict[str, bytes], complete: bool = True) -> str:
    os.makedirs(path)
    for rel, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
        with open(os.path.join(path, rel), "wb") as f:
            f.write(data)
    if complete:
        with open(os.path.join(path, COMPLETE), "w", encoding="utf-8") as f:
            json.dump({"files": {rel: len(data) for rel, data in files.items()}}, f)
    return str(path)


def test_checkpoint_problem_names_what_is_wrong(tmp_path):
    files = {"model/mp_rank_00_model_states.pt": b"x" * 10, "rank_00000.pt": b"y" * 5}
    good = _fake_checkpoint(tmp_path / "good", files)
    assert checkpoint_problem(good) is None
    assert checkpoint_problem(str(tmp_path / "absent")) == "not found"
    assert "no COMPLETE marker" in checkpoint_problem(_fake_checkpoint(tmp_path / "interrupted", files, complete=False))
    missing = _fake_checkpoint(tmp_path / "missing", files)
    os.remove(os.path.join(missing, "rank_00000.pt"))
    assert checkpoint_problem(missing) == "missing file rank_00000.pt"
    short = _fake_checkpoint(tmp_path / "short", files)
    with open(os.path.join(short, "model/mp_rank_00_model_states.pt"), "wb") as f:
        f.write(b"x" * 3)
    assert checkpoint_problem(short) == "model/mp_rank_00_model_states.pt has 3 bytes, the manifest says 10"
    bad = _fake_checkpoint(tmp_path / "bad", files)
    with open(os.path.join(bad, COMPLETE), "w", encoding="utf-8") as f:
        f.write("{not json")
    assert checkpoint_problem(bad).startswith("unreadable COMPLETE manifest")


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(3), np.random.randn()  # a cached gaussian in numpy's state too
    path = str(tmp_path / "rng.pt")
    torch.save(rng_state(), path)
    expected = (random.random(), np.random.rand(4).tolist(), np.random.randn(), torch.rand(4).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), np.random.rand(4).tolist(), np.random.randn(), torch.rand(4).tolist()) == expected


def test_stop_signal_only_sets_a_flag():
    previous = {s: signal.getsignal(s) for s in StopSignal.SIGNALS}
    try:
        stop = StopSignal()
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # the process lives on: the loop decides when to stop
        assert stop.received == "SIGTERM"
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_ema_restore_writes_into_the_live_shards():
    """Checkpoint files are read to CPU; the EMA must keep its shards where they live (a GPU run caught this)."""
    from rlhf_ds.engine.ema import ShardedEMA

    model = torch.nn.Linear(3, 2)
    ema = ShardedEMA(model, 0.5)
    live = [s.data_ptr() for s in ema.shadow]
    saved = [torch.full_like(s, 7.0) for s in ema.state_dict()]
    ema.load_state_dict(saved)
    assert [s.data_ptr() for s in ema.shadow] == live
    assert all(torch.equal(s, torch.full_like(s, 7.0)) for s in ema.shadow)


def _zero3_partitioned(full: list[torch.Tensor], world: int, rank: int) -> torch.nn.Module:
    """A module whose parameters carry ZeRO-3's partition attributes: this rank's contiguous slice of each flattened
    parameter (ceil(numel / world) elements, the last rank's padded with zeros) as `ds_tensor`."""
    module = torch.nn.Module()
    for i, t in enumerate(full):
        p = torch.nn.Parameter(torch.empty(0))
        size = -(-t.numel() // world)
        flat = torch.cat([t.reshape(-1), t.new_zeros(size * world - t.numel())])
        p.ds_tensor, p.ds_numel = flat[rank * size : (rank + 1) * size].clone(), t.numel()
        module.register_parameter(f"p{i}", p)
    return module


@pytest.mark.parametrize("old_world, new_world", [(2, 1), (1, 2), (3, 2)])
def test_ema_shards_reshard_for_another_world_size(monkeypatch, old_world, new_world):
    """Resuming on another world size: each rank's new EMA shard is its slice of the parameters the old ranks' shards
    make together (issue #25)."""
    from rlhf_ds.engine.ema import ShardedEMA

    full = [torch.arange(1.0, 8.0).reshape(7, 1), torch.arange(10.0, 16.0).reshape(2, 3), torch.tensor([42.0])]
    saved = [ShardedEMA(_zero3_partitioned(full, old_world, r), 0.5).state_dict() for r in range(old_world)]
    for r in range(new_world):
        monkeypatch.setenv("RANK", str(r))
        ema = ShardedEMA(_zero3_partitioned([torch.zeros_like(t) for t in full], new_world, r), 0.5)
        ema.load_resharded(saved)
        expected = _zero3_partitioned(full, new_world, r)
        assert all(torch.equal(s, p.ds_tensor) for s, p in zip(ema.shadow, expected.parameters()))


def test_keep_batch_re_derives_accumulation_and_rollout_size():
    from rlhf_ds.checkpoint import describe_batch, keep_batch

    sft = {"micro_batch_size": 4, "grad_accum": 1}
    assert keep_batch("train", sft, 2, sft, 1) == {"micro_batch_size": 4, "grad_accum": 2}
    assert keep_batch("train", sft, 2, {"micro_batch_size": 2, "grad_accum": 1}, 4) == {"micro_batch_size": 2,
                                                                                          "grad_accum": 1}
    with pytest.raises(ValueError, match=r"global batch of 8 examples \(train.micro_batch_size 4 x 2 ranks x "
                                         r"train.grad_accum 1\) cannot be kept with train.micro_batch_size 3"):
        keep_batch("train", sft, 2, {"micro_batch_size": 3, "grad_accum": 1}, 1)
    ppo = {"rollout_batch_size": 4, "micro_batch_size": 2, "grad_accum": 2}
    kept = keep_batch("ppo", ppo, 2, ppo, 1)
    assert kept == {"rollout_batch_size": 8, "micro_batch_size": 2, "grad_accum": 4}
    assert describe_batch("ppo", kept, 1) == ("rollouts of 8 prompts kept as ppo.rollout_batch_size 8 x 1 ranks, global "
                                              "batch 8 kept as ppo.micro_batch_size 2 x 1 ranks x ppo.grad_accum 4")
    with pytest.raises(ValueError, match=r"rollouts of 8 prompts \(ppo.rollout_batch_size 4 x 2 ranks\) cannot be "
                                         r"split over 3 ranks"):
        keep_batch("ppo", ppo, 2, ppo, 3)


def test_8bit_optimizer_states_under_zero_are_refused_for_another_world_size():
    """DeepSpeed's universal converter reads fp32 Adam states only (measured: KeyError 'exp_avg' on adamw_8bit shards,
    after the models were built); the refusal comes from the checkpoint's config, before anything loads."""
    from rlhf_ds.checkpoint import universal_unsupported

    assert universal_unsupported({"engine": {"optimizer": "adamw_8bit", "zero_stage": 2}}) == ["engine.optimizer"]
    assert universal_unsupported({"engine": {"optimizer": "adamw_8bit", "zero_stage": 0}}) == []  # loads as it is
    assert universal_unsupported({"engine": {"optimizer": "adamw", "zero_stage": 3}}) == []
    ppo = {"actor": {"engine": {"optimizer": "adamw_8bit", "zero_stage": 3}},
           "critic": {"engine": {"optimizer": "adamw", "zero_stage": 3}},
           "reference": {"engine": {"optimizer": "adamw_8bit", "zero_stage": 3}}}  # frozen: not in the checkpoint
    assert universal_unsupported(ppo) == ["actor.engine.optimizer"]
