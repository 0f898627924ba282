"""Run configs (YAML + overrides, validation, resolved copy) and the DeepSpeed JSON derived from them. No training."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from rlhf_ds.config import ConfigError, EngineConfig, PretrainConfig, SFTConfig, load_config, parse_override, save_config
from rlhf_ds.engine.ds_config import build_ds_config, load_template, template_name

from conftest import REPO, cli_env


def write_yaml(tmp_path, data: dict) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


# ---- loading -----------------------------------------------------------------------------------------------------------
def test_yaml_then_overrides(tmp_path):
    path = write_yaml(tmp_path, {
        "output_dir": "runs/x",
        "engine": {"lr": 3e-4, "zero_stage": 2, "lora": {"enabled": True, "rank": 4}},
        "train": {"micro_batch_size": 4, "grad_accum": 2},
        "data": {"max_seq_len": 96},
    })
    cfg = load_config("sft", path, ["engine.lr=1e-5", "train.grad_accum=3", "engine.lora.target_modules=[c_attn]",
                                    "data.eval=null", "engine.adam_betas=[0.9, 0.99]"])
    assert isinstance(cfg, SFTConfig)
    assert cfg.output_dir == "runs/x"
    assert cfg.engine.lr == pytest.approx(1e-5) and isinstance(cfg.engine.lr, float)  # override wins over YAML
    assert cfg.engine.zero_stage == 2  # from YAML
    assert cfg.train.micro_batch_size == 4 and cfg.train.grad_accum == 3
    assert cfg.engine.lora.enabled is True and cfg.engine.lora.rank == 4 and cfg.engine.lora.target_modules == ["c_attn"]
    assert cfg.engine.lora.alpha == 16.0  # untouched nested default survives a partial section
    assert cfg.data.max_seq_len == 96 and cfg.data.max_prompt_tokens is None and cfg.data.eval is None
    assert cfg.engine.adam_betas == [0.9, 0.99]
    assert cfg.train.epochs == 2  # SFT's own default for the section, not TrainConfig's (1)


def test_step_section_defaults_survive_partial_override():
    cfg = load_config("pretrain", None, ["engine.lr=1e-3"])
    assert isinstance(cfg, PretrainConfig)
    assert cfg.engine.lr == pytest.approx(1e-3)
    assert cfg.engine.zero_stage == 0  # pretrain's default, kept although the engine section was touched
    assert cfg.data.max_seq_len == 64 and cfg.train.micro_batch_size == 32


@pytest.mark.parametrize("text,expected", [
    ("engine.lr=1e-4", ("engine.lr", 1e-4)),
    ("train.max_steps=7", ("train.max_steps", 7)),
    ("engine.lora.enabled=true", ("engine.lora.enabled", True)),
    ("data.train=None", ("data.train", None)),
    ("output_dir=runs/a=b", ("output_dir", "runs/a=b")),
])
def test_parse_override(text, expected):
    key, value = parse_override(text)
    assert (key, value) == expected and type(value) is type(expected[1])


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.micro_batchsize'.*did you mean 'train\.micro_batch_size'"):
        load_config("sft", None, ["train.micro_batchsize=4"])
    with pytest.raises(ConfigError, match=r"unknown config key 'engine\.lora\.rnak'.*'engine\.lora\.rank'"):
        load_config("sft", write_yaml(tmp_path, {"engine": {"lora": {"rnak": 4}}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'arch'"):
        load_config("sft", None, ["arch.n_layers=2"])  # a pretrain-only section
    with pytest.raises(ConfigError, match="unknown step"):
        load_config("kto")  # not a step (dpo is one now)


@pytest.mark.parametrize("override,match", [
    ("train.micro_batch_size=2.5", r"train\.micro_batch_size: expected an integer"),
    ("train.micro_batch_size=true", r"train\.micro_batch_size: expected an integer"),
    ("engine.lr=fast", r"engine\.lr: expected a number"),
    ("engine.lora.enabled=1", r"engine\.lora\.enabled: expected true/false"),
    ("engine.precision=fp8", r"engine\.precision: 'fp8' is not one of"),
    ("engine.adam_betas=0.9", r"engine\.adam_betas: expected a list"),
    ("engine=3", r"expected a mapping for section 'engine'"),
    ("engine.lr.x=1", r"engine\.lr: expected a number"),
])
def test_wrong_types_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("sft", None, [override])


def test_override_into_a_value_is_refused():
    with pytest.raises(ConfigError, match=r"'output_dir' is not a section"):
        load_config("sft", None, ["output_dir=a", "output_dir.x=1"])
    with pytest.raises(ConfigError, match=r"must look like key\.sub=value"):
        load_config("sft", None, ["engine.lr"])


def test_int_to_float_is_the_only_silent_conversion():
    cfg = load_config("sft", None, ["engine.lr=1", "engine.warmup_ratio=0"])
    assert cfg.engine.lr == 1.0 and isinstance(cfg.engine.lr, float)
    assert isinstance(cfg.engine.warmup_ratio, float)


@pytest.mark.parametrize("overrides,match", [
    (["engine.offload_params=true", "engine.zero_stage=2"], r"offload_params needs zero_stage 3"),
    (["engine.offload_optimizer=true", "engine.zero_stage=0"], r"offload_optimizer needs zero_stage >= 1"),
    (["engine.zero_stage=4"], r"zero_stage must be 0, 1, 2 or 3"),
    (["data.max_prompt_tokens=48", "data.max_seq_len=48"], r"max_prompt_tokens \(48\) must be < data\.max_seq_len \(48\)"),
    (["data.max_prompt_tokens=64", "data.max_seq_len=32"], r"max_prompt_tokens"),
    (["engine.lr=0"], r"lr must be > 0"),
    (["engine.warmup_ratio=1.0"], r"warmup_ratio"),
    (["train.grad_accum=0"], r"train\.grad_accum must be > 0"),
    (["train.max_steps=-1"], r"max_steps"),
    (["engine.lora.enabled=true", "engine.lora.rank=0"], r"lora\.rank must be > 0"),
    (["engine.adam_betas=[0.9]"], r"adam_betas must have two values"),
    (["data.eval_split=1.0"], r"eval_split must be a fraction in \[0, 1\) or a count"),
    (["data.eval_split=-3"], r"eval_split"),
    (["data.train=[]"], r"data\.train: an empty list of sources"),
    (["data.train=[{path: a.jsonl, weight: 0}]"], r"data\.train\[0\]\.weight must be > 0"),
])
def test_impossible_combinations_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("sft", None, overrides)


def test_pretrain_has_no_prompt_limit():
    # pretraining packs plain text: the prompt budget does not apply, so this combination is fine there
    cfg = load_config("pretrain", None, ["data.max_seq_len=32", "data.max_prompt_tokens=64"])
    assert cfg.data.max_prompt_tokens == 64 and cfg.data.max_seq_len == 32


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("sft", str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("sft", str(bad))
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config("sft", str(top))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("sft", None, ["engine.lr=2e-5", "engine.lora.enabled=true", "train.max_steps=3"])
    path = str(tmp_path / "config.yaml")
    save_config(cfg, path)
    saved = yaml.safe_load(open(path, encoding="utf-8"))
    # every default is written out, so the file alone reproduces the run
    assert saved["engine"]["lr"] == pytest.approx(2e-5)
    assert saved["engine"]["lora"] == {"enabled": True, "rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": None}
    assert saved["train"]["max_steps"] == 3 and saved["train"]["epochs"] == 2
    assert saved["data"]["max_seq_len"] is None and saved["tracking"]["wandb"] is False
    assert load_config("sft", path) == cfg


def test_cli_reports_config_errors_without_starting(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlhf_ds.cli", "sft", "train.micro_batchsize=4",
                           f"output_dir={tmp_path / 'never'}"], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "did you mean 'train.micro_batch_size'" in proc.stderr
    assert not os.path.exists(tmp_path / "never")


# ---- DeepSpeed JSON ------------------------------------------------------------------------------------------------------
def _autos(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _autos(v, f"{prefix}{k}.")
        elif v == "auto":
            yield prefix + k


@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ds_config_from_templates(stage, precision):
    eng = EngineConfig(zero_stage=stage, precision=precision, grad_clip=0.5)
    ds = build_ds_config(eng, micro_batch_size=4, grad_accum=3, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"] == {"enabled": precision == "bf16"}
    assert ds["fp16"]["enabled"] is False
    assert list(_autos(ds)) == []
    if stage == 3:
        assert ds["zero_optimization"]["offload_param"] == {"device": "none"}
        assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == eng.zero3_param_persistence_threshold == 10000
    else:
        assert "offload_param" not in ds["zero_optimization"]
    if stage >= 1:
        assert ds["zero_optimization"]["offload_optimizer"] == {"device": "none"}
    # the templates really do leave these to the builder
    assert set(_autos(load_template(template_name(eng, False)))) >= {"train_batch_size", "train_micro_batch_size_per_gpu"}


def test_ds_config_offload_blocks():
    eng = EngineConfig(zero_stage=3, offload_params=True, offload_optimizer=True)
    ds = build_ds_config(eng, micro_batch_size=2, grad_accum=1, world_size=4)
    assert ds["train_batch_size"] == 8
    zero = ds["zero_optimization"]
    assert zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False
    # the offload template is only a starting point: switching offload off in the engine config wins
    only_opt = build_ds_config(EngineConfig(zero_stage=3, offload_optimizer=True), 2, 1, 1)
    assert only_opt["zero_optimization"]["offload_param"] == {"device": "none"}
    assert only_opt["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert list(_autos(ds)) == [] and list(_autos(only_opt)) == []


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_ds_config_allows_the_8bit_optimizer_under_zero(stage):
    ds = build_ds_config(EngineConfig(zero_stage=stage, optimizer="adamw_8bit"), 2, 1, 2)
    # DeepSpeed asserts on an untested (non-DeepSpeed, non-torch-Adam) optimizer under ZeRO 1-3 without this key
    assert ds.get("zero_allow_untested_optimizer", False) is (stage >= 1)
    assert "zero_allow_untested_optimizer" not in build_ds_config(EngineConfig(zero_stage=stage), 2, 1, 2)


def test_ds_config_inference_has_no_training_keys():
    ds = build_ds_config(EngineConfig(zero_stage=3, precision="bf16"), micro_batch_size=8, grad_accum=4, world_size=2,
                         inference=True)
    assert ds["train_batch_size"] == 16  # accumulation does not apply to inference
    assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert list(_autos(ds)) == []


def test_ds_config_template_with_unknown_auto_is_refused(tmp_path):
    (tmp_path / "zero0.json").write_text('{"train_batch_size": "auto", "optimizer": {"params": {"lr": "auto"}}}')
    with pytest.raises(ValueError, match=r"optimizer\.params\.lr"):
        build_ds_config(EngineConfig(zero_stage=0), 1, 1, 1, template_dir=str(tmp_path))


def test_data_sources_a_string_a_list_or_mappings_and_eval_split_a_fraction_or_a_count():
    from rlhf_ds.config import SourceConfig

    assert load_config("rm", None, ["data.train=hh.jsonl"]).data.train == "hh.jsonl"
    cfg = load_config("rm", None, ["data.train=[hh.jsonl, {path: se.jsonl, format: stack_exchange, weight: 0.5, "
                                   "limit: 100, template: 'Question: {question}'}]", "data.eval_split=200"])
    assert cfg.data.train == ["hh.jsonl", SourceConfig("se.jsonl", "stack_exchange", None, "Question: {question}", 0.5, 100)]
    assert cfg.data.eval_split == 200 and isinstance(cfg.data.eval_split, int)
    assert load_config("sft", None, ["data.eval_split=0.1"]).data.eval_split == 0.1


def test_pretrain_vocabulary_holds_the_byte_alphabet():
    with pytest.raises(ConfigError, match=r"arch\.vocab_size must be >= 259 \(256 byte symbols"):
        load_config("pretrain", None, ["arch.vocab_size=258"])
    assert load_config("pretrain", None, ["arch.vocab_size=259"]).arch.vocab_size == 259


def test_eval_split_a_fraction_or_a_count_seeded():
    from rlhf_ds.data.readers import DataError
    from rlhf_ds.steps.common import eval_count, split_eval

    assert (eval_count(100, 0.05), eval_count(100, 7), eval_count(100, 0), eval_count(10, 0.01)) == (5, 7, 0, 1)
    train, held = split_eval(list(range(20)), None, 4, seed=1)
    assert len(held) == 4 and sorted(train + held) == list(range(20))
    assert split_eval(list(range(20)), None, 4, seed=1) == (train, held) != split_eval(list(range(20)), None, 4, seed=2)
    assert split_eval([1, 2], [9], 0.5, seed=1) == ([1, 2], [9])  # a given eval set wins
    with pytest.raises(DataError) as err:
        split_eval(list(range(5)), None, 5, seed=1)
    assert str(err.value) == ("data.eval_split=5 holds out 5 examples, but the training data has 5 examples and "
                              "training needs at least 1: set data.eval_split to at most 4 (a count) or 0.8 (a "
                              "fraction), or give the held-out set as data.eval")


BATCH = (8, "train.micro_batch_size 8 x 1 rank x train.grad_accum 1")


@pytest.mark.parametrize("n, split, given, message", [
    # a count or a fraction that leaves less than one global batch: the largest value that works, both ways
    (200, 5000, False, "data.eval_split=5000 holds out 5000 pairs, but the training data has 200 pairs and one global "
                       "batch (train.micro_batch_size 8 x 1 rank x train.grad_accum 1) needs 8 of them: set "
                       "data.eval_split to at most 192 (a count) or 0.96 (a fraction), or give the held-out set as "
                       "data.eval"),
    (200, 0.99, False, "data.eval_split=0.99 holds out 198 pairs, but the training data has 200 pairs and one global "
                       "batch (train.micro_batch_size 8 x 1 rank x train.grad_accum 1) needs 8 of them: set "
                       "data.eval_split to at most 192 (a count) or 0.96 (a fraction), or give the held-out set as "
                       "data.eval"),
    (8, 0.05, False, "data.eval_split=0.05 holds out 1 pairs, but the training data has 8 pairs and one global batch "
                     "(train.micro_batch_size 8 x 1 rank x train.grad_accum 1) needs 8 of them: set data.eval_split=0 "
                     "(nothing held out), or give the held-out set as data.eval"),
    # too few even with nothing held out: the batch keys are what to change
    (5, 0, False, "the training data has 5 pairs, fewer than one global batch (train.micro_batch_size 8 x 1 rank x "
                  "train.grad_accum 1) of 8: lower train.micro_batch_size or train.grad_accum, or give more data"),
    (5, 2, True, "the training data has 5 pairs, fewer than one global batch (train.micro_batch_size 8 x 1 rank x "
                 "train.grad_accum 1) of 8: lower train.micro_batch_size or train.grad_accum, or give more data"),
])
def test_eval_split_is_counted_against_the_training_data(n, split, given, message):
    from rlhf_ds.data.readers import DataError
    from rlhf_ds.steps.common import split_eval

    with pytest.raises(DataError) as err:
        split_eval(list(range(n)), [0] if given else None, split, seed=1, unit="pairs", batch=BATCH)
    assert str(err.value) == message
    # the largest values named work
    if "at most 192" in message:
        for ok in (192, 0.96):
            train, held = split_eval(list(range(n)), None, ok, seed=1, unit="pairs", batch=BATCH)
            assert (len(train), len(held)) == (8, 192)


# ---- numbers: finite, named, in range (issue #22) ------------------------------------------------------------------------
# A NaN passes every `x <= 0` check (all comparisons with NaN are false), so non-finite values are refused where numbers
# are read: every float key, at any depth, named by its full path. YAML writes them .nan / .inf / -.inf; an override
# may also spell them nan / inf.
@pytest.mark.parametrize("step, yaml_text, message", [
    ("sft", "engine: {lr: .nan}", "engine.lr: nan is not a finite number"),
    ("sft", "engine: {adam_betas: [0.9, .inf]}", "engine.adam_betas[1]: inf is not a finite number"),
    ("sft", "data: {train: [a.jsonl, {path: b.jsonl, weight: .nan}]}", "data.train[1].weight: nan is not a finite number"),
    ("sft", "data: {train: [{path: b.jsonl, weight: .inf}]}", "data.train[0].weight: inf is not a finite number"),
    ("rm", "data: {eval_split: .nan}", "data.eval_split: nan is not a finite number"),
    ("ppo", "actor: {model: x}\nppo: {kl_coef: .inf}", "ppo.kl_coef: inf is not a finite number"),
    ("ppo", "actor: {model: x}\nreward: {weights: {model: -.inf}}", "reward.weights.model: -inf is not a finite number"),
    ("ppo", "actor: {model: x}\ngeneration: {top_p: .nan}", "generation.top_p: nan is not a finite number"),
    ("pipeline", "rm: {engine: {lr: .nan}}", "rm.engine.lr: nan is not a finite number"),
    ("pipeline", "ppo: {ppo: {score_clip: .inf}}", "ppo.ppo.score_clip: inf is not a finite number"),
])
def test_nonfinite_numbers_are_refused_naming_the_key(tmp_path, step, yaml_text, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(step, str(path))
    assert str(err.value) == message


@pytest.mark.parametrize("override, message", [
    ("engine.lr=nan", "engine.lr: nan is not a finite number"),
    ("engine.lr=-inf", "engine.lr: -inf is not a finite number"),
    ("data.eval_split=inf", "data.eval_split: inf is not a finite number"),
    ("engine.grad_clip=1e999", "engine.grad_clip: inf is not a finite number"),
    # a non-number names the key path, inside a list of sources too (was: "data.train: [...] fits none of Union")
    ("data.train=[{path: a.jsonl, weight: abc}]", "data.train[0].weight: expected a number, got 'abc'"),
    ("data.train=[a.jsonl, {path: b.jsonl, limit: 1.5}]", "data.train[1].limit: expected an integer, got 1.5"),
    ("data.eval_split=abc", "data.eval_split: expected a number, got 'abc'"),
    ("data.train=7", "data.train: 7 is none of: a string, a list, null"),
])
def test_non_numbers_name_the_key_path(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("sft", None, [override])
    assert str(err.value) == message


def test_yaml_exponent_numbers_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-4` without a dot as a string; a float key takes it as the number it is."""
    path = tmp_path / "run.yaml"
    path.write_text("engine: {lr: 1e-4, weight_decay: 5E-2}\ndata: {train: [{path: a.jsonl, weight: 2e0}]}\n",
                    encoding="utf-8")
    cfg = load_config("sft", str(path))
    assert (cfg.engine.lr, cfg.engine.weight_decay, cfg.data.train[0].weight) == (1e-4, 5e-2, 2.0)
    assert isinstance(cfg.engine.lr, float)


@pytest.mark.parametrize("step, overrides, message", [
    ("sft", ["data.train=[{path: a.jsonl, weight: 0}]"], "data.train[0].weight must be > 0, got 0.0"),
    ("sft", ["data.eval=[a.jsonl, {path: b.jsonl, weight: -2}]"], "data.eval[1].weight must be > 0, got -2.0"),
    ("sft", ["data.train=[{path: a.jsonl, limit: -1}]"], "data.train[0].limit must be >= 0, got -1"),
    ("sft", ["data.train=[{weight: 2}]"], "data.train[0].path: a source needs a path"),
    ("sft", ["engine.lora.dropout=1.0"], "engine.lora.dropout must be in [0, 1), got 1.0"),
    ("sft", ["engine.lora.alpha=0"], "engine.lora.alpha must be > 0, got 0.0"),
    ("sft", ["engine.weight_decay=-0.1"], "engine.weight_decay must be >= 0, got -0.1"),
    ("sft", ["engine.adam_betas=[0.9, 1.0]"], "engine.adam_betas must be two values in [0, 1), got [0.9, 1.0]"),
    ("sft", ["engine.grad_clip=-1"], "engine.grad_clip must be >= 0 (0 = no clipping), got -1.0"),
    ("ppo", ["actor.model=x", "generation.top_p=0"], "generation.top_p must be in (0, 1], got 0.0"),
    ("ppo", ["actor.model=x", "generation.top_k=-1"], "generation.top_k must be >= 0 (0 = off), got -1"),
    ("ppo", ["actor.model=x", "ppo.gamma=1.5"], "ppo.gamma must be in [0, 1], got 1.5"),
    ("ppo", ["actor.model=x", "ppo.lam=-0.1"], "ppo.lam must be in [0, 1], got -0.1"),
    ("ppo", ["actor.model=x", "ppo.vf_coef=-1"], "ppo.vf_coef must be >= 0, got -1.0"),
    ("ppo", ["actor.model=x", "ppo.score_clip=0"], "ppo.score_clip must be > 0 or null, got 0.0"),
    ("ppo", ["actor.model=x", "ppo.value_clip=-0.2"], "ppo.value_clip must be > 0 or null, got -0.2"),
    ("ppo", ["actor.model=x", "reward.weights.model=-0.5"], None),  # a negative weight is allowed (a penalty)
])
def test_numeric_limits_name_the_key(step, overrides, message):
    if message is None:
        assert load_config(step, None, overrides) is not None
        return
    with pytest.raises(ConfigError) as err:
        load_config(step, None, overrides)
    assert str(err.value) == message
