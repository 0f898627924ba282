"""The DeepSpeed JSON each engine gets: package templates filled from the run config, a user's `engine.ds_config` file
merged over it and saved in the run dir, the ZeRO knobs (overlap_comm, buckets, ZeRO-3 persistence/prefetch/live/reuse)
as config keys, and configs DeepSpeed would reject."""
from __future__ import annotations

import glob
import json
import os

import pytest

from conftest import REPO, run_cli
from rlhf_ds.config import ConfigError, EngineConfig, LoopConfig, load_config
from rlhf_ds.engine.ds_config import OWNED_KEYS, build_ds_config, load_template, read_user_ds_config


def test_persistence_threshold_is_a_config_key():
    cfg = build_ds_config(EngineConfig(zero_stage=3), 4, 2, world_size=2)
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == EngineConfig().zero3_param_persistence_threshold == 10000
    cfg = build_ds_config(EngineConfig(zero_stage=3, zero3_param_persistence_threshold=0), 4, 1, world_size=2, inference=True)
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert load_config("sft", None, ["engine.zero3_param_persistence_threshold=100000"]).engine.zero3_param_persistence_threshold == 100000
    with pytest.raises(ConfigError, match="zero3_param_persistence_threshold"):
        load_config("sft", None, ["engine.zero3_param_persistence_threshold=-1"])


ZERO3_KNOBS = {"stage3_prefetch_bucket_size": "zero3_prefetch_bucket_size",
               "stage3_max_live_parameters": "zero3_max_live_parameters",
               "stage3_max_reuse_distance": "zero3_max_reuse_distance",
               "stage3_param_persistence_threshold": "zero3_param_persistence_threshold"}
REDUCE_KNOBS = {"overlap_comm": "overlap_comm", "reduce_bucket_size": "reduce_bucket_size"}


@pytest.mark.parametrize("stage,inference,applies", [
    (3, False, {**ZERO3_KNOBS, **REDUCE_KNOBS}),
    (3, True, ZERO3_KNOBS),  # a frozen ZeRO-3 model gathers parameters but reduces no gradients
    (2, False, {**REDUCE_KNOBS, "allgather_bucket_size": "allgather_bucket_size"}),
    (1, False, {**REDUCE_KNOBS, "allgather_bucket_size": "allgather_bucket_size"}),
    (0, False, {}), (0, True, {}),
])
def test_zero_knobs_come_from_the_engine_config_for_their_stage(stage, inference, applies):
    knobs = ("overlap_comm", "reduce_bucket_size", "allgather_bucket_size", *ZERO3_KNOBS)
    default = build_ds_config(EngineConfig(zero_stage=stage), 4, 1, world_size=2, inference=inference)
    eng = EngineConfig(zero_stage=stage, overlap_comm=False, reduce_bucket_size=123, allgather_bucket_size=456,
                       zero3_prefetch_bucket_size=789, zero3_max_live_parameters=1011, zero3_max_reuse_distance=1213,
                       zero3_param_persistence_threshold=1415)
    zero = build_ds_config(eng, 4, 1, world_size=2, inference=inference)["zero_optimization"]
    assert {k for k in knobs if k in zero} == set(applies)
    for ds_key, key in applies.items():
        assert zero[ds_key] == getattr(eng, key)
        assert default["zero_optimization"][ds_key] == getattr(EngineConfig(), key)
    for name in ("zero2.json", "zero3.json", "zero3_offload.json", "zero3_inference.json"):  # not in the templates
        assert not set(knobs) & set(load_template(name)["zero_optimization"]), name


@pytest.mark.parametrize("key", ["reduce_bucket_size", "allgather_bucket_size", "zero3_prefetch_bucket_size",
                                 "zero3_max_live_parameters", "zero3_max_reuse_distance"])
def test_zero_bucket_keys_must_be_positive(key):
    assert getattr(load_config("ppo", None, [f"critic.engine.{key}=1000"]).critic.engine, key) == 1000
    with pytest.raises(ConfigError, match=rf"critic\.engine\.{key} must be > 0"):
        load_config("ppo", None, [f"critic.engine.{key}=0"])
    assert load_config("sft", None, ["engine.overlap_comm=false"]).engine.overlap_comm is False


def test_planner_counts_persistent_parameters():
    from rlhf_ds.planner import DeepSpeedKnobs, Hardware, ModelSpec, TrainSettings, Workload, plan_job

    spec = ModelSpec(n_layers=12, hidden=768, vocab=50257, n_heads=12, arch="gpt2")  # GPT-2 small: biases, norms
    models = {"actor": (spec, TrainSettings(role="actor", zero_stage=3))}
    hw, wl = Hardware(gpus_per_node=8), Workload()
    kept = {t: plan_job(models, hw, wl, DeepSpeedKnobs(param_persistence_threshold=t)).models["actor"].gpu_details
            .get("zero3_persistent_params", 0) for t in (0, 10000, 10**6)}
    assert kept[0] == 0 < kept[10000] < kept[10**6]
    assert DeepSpeedKnobs().param_persistence_threshold == EngineConfig().zero3_param_persistence_threshold


@pytest.mark.parametrize("example", sorted(glob.glob(os.path.join(REPO, "ds_configs", "*.json"))))
def test_shipped_examples_merge_over_the_generated_config(example):
    user = read_user_ds_config(example)
    engine = EngineConfig(zero_stage=3, ds_config=example)
    merged = build_ds_config(engine, 4, 2, world_size=2)
    base = build_ds_config(EngineConfig(zero_stage=3), 4, 2, world_size=2)
    for key, value in user.items():
        expected = {**base.get(key, {}), **value} if isinstance(value, dict) else value
        assert merged[key] == expected
    assert merged["train_batch_size"] == 16 and merged["zero_optimization"]["stage"] == 3  # owned keys untouched


def test_user_file_may_not_set_keys_the_run_config_owns(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}, "train_batch_size": 64}))
    with pytest.raises(ConfigError) as err:
        load_config("sft", None, [f"engine.ds_config={path}"])
    assert str(path) in str(err.value) and "zero_optimization.stage (set engine.zero_stage)" in str(err.value)
    assert "train_batch_size" in str(err.value)
    assert "zero_optimization.overlap_comm (set engine.overlap_comm)" in str(err.value)
    assert set(OWNED_KEYS) >= {"train_batch_size", "zero_optimization.stage", "bf16"}
    for key, owner in [("reduce_bucket_size", "engine.reduce_bucket_size"),
                       ("allgather_bucket_size", "engine.allgather_bucket_size"),
                       ("stage3_prefetch_bucket_size", "engine.zero3_prefetch_bucket_size"),
                       ("stage3_max_live_parameters", "engine.zero3_max_live_parameters"),
                       ("stage3_max_reuse_distance", "engine.zero3_max_reuse_distance")]:
        path.write_text(json.dumps({"zero_optimization": {key: 1000}}))
        with pytest.raises(ConfigError, match=rf"zero_optimization\.{key} \(set {owner}\)"):
            load_config("ppo", None, [f"reward.engine.ds_config={path}"])
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable JSON file"):
        load_config("sft", None, [f"engine.ds_config={path}"])
    with pytest.raises(ConfigError, match="not a readable JSON file"):
        load_config("sft", None, [f"engine.ds_config={tmp_path / 'missing.json'}"])


@pytest.mark.parametrize("role", ["reference", "reward"])
@pytest.mark.parametrize("stage", [1, 2])
def test_frozen_engine_at_stage_1_or_2_is_refused_at_load(role, stage):
    with pytest.raises(ConfigError, match=rf"{role}\.engine\.zero_stage is {stage}, but this model is frozen"):
        load_config("ppo", None, [f"{role}.engine.zero_stage={stage}"])
    for ok in (0, 3):
        load_config("ppo", None, [f"{role}.engine.zero_stage={ok}"])
    load_config("ppo", None, [f"actor.engine.zero_stage={stage}", f"critic.engine.zero_stage={stage}"])


def test_ppo_has_no_keys_it_ignores():
    """PPO batches with ppo.*; the supervised loop's batch keys are not PPO keys (a change to them used to block a
    resume although PPO never read them)."""
    cfg = load_config("ppo")
    assert type(cfg.train) is LoopConfig
    for key in ("micro_batch_size", "grad_accum", "epochs", "max_steps", "eval_every", "eval_batch_size"):
        with pytest.raises(ConfigError, match=f"unknown config key 'train.{key}'"):
            load_config("ppo", None, [f"train.{key}=4"])
    assert load_config("ppo", None, ["train.seed=7", "train.log_every=2"]).train.seed == 7


def test_run_saves_the_merged_deepspeed_config(tiny_base, tmp_path):
    user = tmp_path / "timers.json"
    user.write_text(json.dumps({"wall_clock_breakdown": True, "zero_optimization": {"sub_group_size": 100000000}}))
    out = str(tmp_path / "sft")
    run_cli(["sft", f"output_dir={out}", f"model={tiny_base}", "train.max_steps=2", "train.micro_batch_size=4",
             "data.max_seq_len=48", "data.max_prompt_tokens=24", "engine.zero_stage=3", f"engine.ds_config={user}",
             "engine.zero3_param_persistence_threshold=5000", "engine.overlap_comm=false",
             "engine.reduce_bucket_size=1000000"])
    with open(os.path.join(out, "ds_config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    (cfg,) = saved.values()
    assert cfg["wall_clock_breakdown"] is True
    zero = cfg["zero_optimization"]
    assert zero["sub_group_size"] == 100000000 and zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 5000
    assert zero["overlap_comm"] is False and zero["reduce_bucket_size"] == 1000000
    assert cfg["train_micro_batch_size_per_gpu"] == 4
