"""Components registered from outside the package (issue #23): tests/plugin_ext.py, named in a config's `plugins`,
registers an advantage estimator (GRPO against the group median), a reward source (words x scale) and a preference
loss (hinge), with no edit inside rlhf_ds.

* the generic registry, and each plugin component against hand-computed numbers;
* config: names checked once the plugins are imported (an unknown one lists the registered names), options of a
  registered reward source checked at load, the pipeline handing its plugins to each step, --help / config show;
* bad input at the CLI: an unknown estimator, a plugin that raises on import: exit 2 naming it, nothing written;
* real runs on the tiny base model: GRPO through the deepspeed launcher (the rank loads the plugin itself) with the
  plugin's estimator and reward source, every advantage redone by hand from what the plugin recorded; DPO with the
  hinge loss, its logged loss equal to the hinge of its logged margins.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

from conftest import REPO, cli_env, free_port, read_metrics, run_cli
from rlhf_ds.config import ConfigError, load_config
from rlhf_ds.config_help import default_yaml, keys_help
from rlhf_ds.registry import Registry, load_plugins
from rlhf_ds.rewards.base import SOURCES, RewardBatch
from rlhf_ds.rl.advantages import ESTIMATORS, AdvantageInputs, get_estimator
from rlhf_ds.rl.preference import LOSSES, preference_loss
from rlhf_ds.rollout.backends import BACKENDS

PLUGIN = os.path.join(REPO, "tests", "plugin_ext.py")
BUILTIN_ESTIMATORS = "gae, grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline"
D = torch.float64


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


@pytest.fixture
def registries():
    """The registries as they are, restored after the test, and the plugin's module forgotten: the other test files
    of this process see the built-ins only (tests/test_advantages.py counts them)."""
    saved = {registry: dict(registry._entries) for registry in (ESTIMATORS, LOSSES, SOURCES, BACKENDS)}
    modules = set(sys.modules)
    yield
    for registry, entries in saved.items():
        registry._entries = entries
    for name in set(sys.modules) - modules:
        if getattr(sys.modules[name], "__file__", None) == PLUGIN:
            del sys.modules[name]


@pytest.fixture
def plugin(registries):
    load_plugins([PLUGIN])


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_ds.cli", *args], cwd=REPO, env=cli_env(threads=1),
                          capture_output=True, text=True, timeout=300)


# ---- the registry and the plugin's components by hand ----------------------------------------------------------------


def test_registry_registers_gets_and_names():
    widgets = Registry("widget")

    @widgets.register("a")
    def a():
        pass

    assert widgets.register("b", 2) == 2
    assert widgets.names() == ["a", "b"] and widgets.get("a") is a and list(widgets) == ["a", "b"]
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        widgets.register("a", 3)
    with pytest.raises(ValueError, match=r"unknown widget 'c'; registered: a, b \(a plugin registers more"):
        widgets.get("c")


def test_plugin_registers_each_kind_once(plugin):
    load_plugins([PLUGIN])  # a second import would register every name again: it is loaded once per process
    estimator = get_estimator("grpo_median")
    assert estimator.needs_groups and not estimator.needs_critic
    assert ESTIMATORS.names()[-1] == "grpo_median" and SOURCES.names() == ["word_count"]
    hinge = LOSSES.get("hinge")
    assert hinge.needs_reference and not hinge.averages and not hinge.smooths
    assert BACKENDS.names() == ["portable", "deepspeed"]


def test_grpo_median_by_hand(plugin):
    # group 5: scores 3, 1, 2; row 0 pays beta 0.5 x KL (0.4 + 0.6; its pad's 9.0 is not read): R = 2.5, 1, 2, median
    # 2 -> A = 0.5, -1, 0. Group 9: R = 4, 0, 10, 1 -> sorted 0, 1, 4, 10, median (1 + 4) / 2 = 2.5 -> 1.5, -2.5, 7.5,
    # -1.5. Every response token gets its row's A, pads exactly 0.
    lengths = [2, 1, 3, 3, 1, 2, 3]
    mask = torch.tensor([[1.0 if j < n else 0.0 for j in range(3)] for n in lengths], dtype=D)
    kl = torch.zeros(7, 3, dtype=D)
    kl[0] = t(0.4, 0.6, 9.0)
    inp = AdvantageInputs(torch.tensor([3.0, 1, 2, 4, 0, 10, 1], dtype=D), kl, mask,
                          torch.tensor([5, 5, 5, 9, 9, 9, 9]), None, 0.5)
    advantages, returns = get_estimator("grpo_median").fn(inp, None)
    expected = [0.5, -1.0, 0.0, 1.5, -2.5, 7.5, -1.5]
    torch.testing.assert_close(advantages, torch.tensor(expected, dtype=D)[:, None] * mask, rtol=0, atol=1e-12)
    assert torch.equal(returns, advantages)


def test_word_count_source_by_hand(plugin):
    source = SOURCES.get("word_count")(scale=0.5)
    batch = RewardBatch(["p"] * 3, ["the fox runs .", "", "a  b"], [{}] * 3)
    assert source(batch).tolist() == [2.0, 0.0, 1.0]


def test_hinge_loss_by_hand(plugin):
    # beta 0.5; h = (pi_c - ref_c) - (pi_r - ref_r): 0.4 + 0.4 = 0.8, 1 + 3 = 4, -1 - 1 = -2
    # margin beta * h = 0.4, 2, -1 -> relu(1 - margin) = 0.6, 0, 2; implicit rewards beta * (pi - ref)
    losses, chosen, rejected = preference_loss("hinge", t(-10.0, -5.0, -8.0), t(-12.0, -9.0, -6.0),
                                               t(-10.4, -6.0, -7.0), t(-11.6, -6.0, -7.0), beta=0.5)
    torch.testing.assert_close(losses, t(0.6, 0.0, 2.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(chosen, t(0.2, 0.5, -0.5), rtol=0, atol=1e-12)
    torch.testing.assert_close(rejected, t(-0.2, -1.5, 0.5), rtol=0, atol=1e-12)


# ---- config ----------------------------------------------------------------------------------------------------------


def test_config_imports_its_plugins_before_checking_the_names(registries, tmp_path):
    grpo = [f"output_dir={tmp_path / 'run'}", f"actor.model={tmp_path}", "reward.model=null",
            f"reward.function={REPO}/examples/rewards/builtin_rules.py:on_topic", "ppo.advantage_estimator=grpo_median",
            "ppo.n_samples_per_prompt=2"]
    with pytest.raises(ConfigError, match=rf"^ppo\.advantage_estimator: unknown advantage estimator 'grpo_median'; "
                                          rf"registered: {BUILTIN_ESTIMATORS} \(a plugin registers more"):
        load_config("ppo", None, grpo)
    cfg = load_config("ppo", None, [f"plugins=[{PLUGIN}]", *grpo, "reward.registered={word_count: {scale: 0.5}}",
                                    "reward.weights={word_count: 2.0}"])
    assert cfg.plugins == [PLUGIN] and cfg.reward.sources() == ["function", "word_count"]
    assert cfg.reward.registered == {"word_count": {"scale": 0.5}}


@pytest.mark.parametrize("step, extra, message", [
    ("ppo", ["reward.model=null", "reward.registered={word_count: {sale: 2}}"],
     "reward.registered.word_count: options ['sale'] do not fit the source's factory: got an unexpected keyword "
     "argument 'sale'"),
    ("ppo", ["reward.model=null", "reward.registered={length: {}}"],
     "reward.registered: unknown reward source 'length'; registered: word_count"),
    ("ppo", ["reward.model=null", "reward.registered={word_count: {}}", "reward.weights={words: 1.0}"],
     "reward.weights names ['words'], but the reward sources given are ['word_count']"),
    ("ppo", ["reward.registered={word_count: {}}"], "to use reward.function / reward.url / reward.registered alone set "
                                                    "reward.model=null"),
    ("ppo", ["hybrid.backend=vllm"], "hybrid.backend: unknown rollout backend 'vllm'; registered: portable, deepspeed"),
    ("dpo", ["dpo.loss=kto"], "dpo.loss: unknown preference loss 'kto'; registered: sigmoid, ipo, simpo, hinge"),
    ("dpo", ["dpo.loss=hinge", "dpo.label_smoothing=0.1"],
     "dpo.label_smoothing applies to the sigmoid and simpo losses, not hinge"),
    ("sft", ["plugins=[no_such_plugin_xyz]"], "plugin 'no_such_plugin_xyz': cannot import no_such_plugin_xyz"),
])
def test_bad_component_settings_are_config_errors(plugin, step, extra, message):
    with pytest.raises(ConfigError) as err:
        load_config(step, None, extra)
    assert message in str(err.value)


def test_pipeline_hands_its_plugins_to_each_step(registries, tmp_path):
    from rlhf_ds.steps import pipeline

    cfg = load_config("pipeline", None, [f"output_dir={tmp_path / 'run'}", f"plugins=[{PLUGIN}]", "ppo.plugins=[json]",
                                         "ppo.ppo.advantage_estimator=grpo_median", "ppo.ppo.n_samples_per_prompt=2"])
    plugins = {p.name: p.cfg.plugins for p in pipeline.plan(cfg)}
    assert plugins == {"pretrain": [PLUGIN], "sft": [PLUGIN], "rm": [PLUGIN], "ppo": [PLUGIN, "json"], "eval": [PLUGIN]}


def test_help_and_config_show_list_the_registered_names(plugin):
    line = next(x for x in keys_help("ppo").splitlines() if x.strip().startswith("ppo.advantage_estimator "))
    assert line.endswith(f"[registered: {BUILTIN_ESTIMATORS}, grpo_median]"), line
    assert any(x.strip().startswith("reward.registered ") and x.endswith("[registered: word_count]")
               for x in keys_help("ppo").splitlines())
    line = next(x for x in default_yaml("dpo").splitlines() if x.strip().startswith("loss: "))
    assert line.strip().startswith("loss: sigmoid  # ") and line.endswith("[registered: sigmoid, ipo, simpo, hinge]")


# ---- bad input at the CLI --------------------------------------------------------------------------------------------


def test_unknown_estimator_exits_2_listing_the_registered_names(tmp_path):
    out = str(tmp_path / "run")
    proc = cli("ppo", f"output_dir={out}", f"actor.model={tmp_path}", "reward.model=null", f"plugins=[{PLUGIN}]",
               "reward.registered={word_count: {}}", "ppo.advantage_estimator=grpo_mean")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"rlhf-ds ppo: config error: ppo.advantage_estimator: unknown advantage estimator 'grpo_mean'; registered: "
            f"{BUILTIN_ESTIMATORS}, grpo_median") in proc.stderr
    assert not os.path.exists(out)


def test_plugin_that_raises_on_import_exits_2_naming_it(tmp_path):
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("raise RuntimeError('this plugin needs a GPU')\n")
    out = str(tmp_path / "run")
    proc = cli("dpo", f"output_dir={out}", f"plugins=[{broken}]")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"rlhf-ds dpo: config error: plugin '{broken}': loading {broken} failed: RuntimeError: this plugin needs "
            "a GPU") in proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(out)


# ---- real runs -------------------------------------------------------------------------------------------------------


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_grpo_run_with_the_plugins_estimator_and_reward_source(tiny_base, tmp_path):
    out, record = str(tmp_path / "grpo"), tmp_path / "record"
    record.mkdir()
    # --num-gpus 1: the wrapper checks the config, then the deepspeed launcher's rank loads it (and the plugin) again
    run_cli(["ppo", "--num-gpus", "1", "--master-port", str(free_port()), f"output_dir={out}",
             f"actor.model={tiny_base}", "reward.model=null", f"plugins=[{PLUGIN}]",
             "ppo.advantage_estimator=grpo_median", "reward.registered={word_count: {scale: 0.5}}",
             "reward.weights={word_count: 2.0}", "ppo.n_samples_per_prompt=4", "ppo.rollout_batch_size=2",
             "ppo.micro_batch_size=4", "ppo.steps=2", "ppo.kl_coef=0", "generation.max_new_tokens=8",
             "actor.engine.zero_stage=0", "reference.engine.zero_stage=0", "train.log_every=1",
             "checkpoint.every_minutes=0"], env_extra={"PLUGIN_EXT_RECORD": str(record)})
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        assert json.load(f)["advantage_estimator"] == "grpo_median"
    sources, estimates = read_jsonl(record / "word_count.jsonl"), read_jsonl(record / "grpo_median.jsonl")
    task_reward = {r["step"]: r["ppo/task_reward"] for r in read_metrics(out) if "ppo/task_reward" in r}
    assert len(sources) == len(estimates) == len(task_reward) == 2
    moved = 0
    for step, (source, estimate) in enumerate(zip(sources, estimates), start=1):
        assert len(source["responses"]) == 8
        assert source["scores"] == [0.5 * len(r.split()) for r in source["responses"]]
        # the weighted sum (weight 2, no KL in the reward, no penalty: a registered source alone) is what the
        # estimator got, and what the metrics logged
        rewards = [2.0 * s for s in source["scores"]]
        assert estimate["rewards"] == rewards
        assert task_reward[step] == pytest.approx(statistics.mean(rewards), rel=1e-6)
        groups = estimate["group_ids"]
        assert sorted(groups.count(g) for g in set(groups)) == [4, 4]
        for i, (reward, group, length) in enumerate(zip(rewards, groups, estimate["lengths"])):
            median = statistics.median(r for r, g in zip(rewards, groups) if g == group)
            row = estimate["advantages"][i]
            assert row[:length] == [reward - median] * length and not any(row[length:]), (step, i)
            moved += reward != median
    assert moved  # the word counts differ within some group: the advantages are not all 0


def test_dpo_run_with_the_plugins_hinge_loss(tiny_base, tmp_path):
    out = str(tmp_path / "dpo")
    run_cli(["dpo", f"model={tiny_base}", f"output_dir={out}", f"plugins=[{PLUGIN}]", "dpo.loss=hinge",
             "dpo.beta=0.1", "train.max_steps=3", "data.max_seq_len=48", "data.max_prompt_tokens=24",
             "train.micro_batch_size=4", "train.log_every=1", "train.eval_batch_size=100", "engine.lr=1e-3",
             "engine.zero_stage=0", "reference.engine.zero_stage=0", "checkpoint.every_minutes=0"])
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        res = json.load(f)
    assert res["loss_type"] == "hinge" and res["reference"] == "engine"
    # before any update the policy is the reference: every margin 0, every hinge relu(1 - 0) = 1
    assert res["eval_loss_start"] == pytest.approx(1.0, abs=1e-6)
    assert res["eval_reward_margin_start"] == pytest.approx(0.0, abs=1e-6)
    rows = {r["step"]: r for r in read_metrics(out) if "dpo/loss" in r}
    assert sorted(rows) == [1, 2, 3]
    # every pair's margin beta * h stays below 1, so each hinge is 1 - margin and their mean 1 - the mean margin
    for step, r in rows.items():
        assert r["dpo/loss"] == pytest.approx(1.0 - r["dpo/reward_margin"], abs=1e-6), step
    assert rows[1]["dpo/loss"] == pytest.approx(1.0, abs=1e-6) and rows[3]["dpo/reward_margin"] != 0
    # held out: a hinge is never below 1 - margin (it is 0 past margin 1), and training moved the mean below 1
    assert res["eval_loss_start"] > res["eval_loss"] >= 1.0 - res["eval_reward_margin"] - 1e-6
