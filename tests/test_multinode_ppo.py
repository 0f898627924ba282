"""PPO across two (fake) nodes: one `deepspeed --no_ssh --node_rank N` launcher per node, one rank each, all four
models (actor, critic, reference, reward) on ZeRO-3, so every parameter gather crosses the "node" boundary.

The policy and reward model are made here from `tiny_base` with a few steps of SFT and RM training (ZeRO-0, one
process), then 2 PPO iterations run. What must hold: both launchers exit 0, each started one rank of a world of 2,
the shared outputs (results.json, metrics.jsonl, model/, critic/) are written once by global rank 0, and each rank
kept its own log.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from conftest import read_metrics, run_cli
from test_launch import run_fake_nodes

STEPS = 2
ZERO3_ALL = [f"{role}.engine.zero_stage=3" for role in ("actor", "critic", "reference", "reward")]
PPO_ARGS = [f"ppo.steps={STEPS}", "ppo.rollout_batch_size=4", "ppo.micro_batch_size=4", "ppo.ppo_epochs=1",
            "generation.max_new_tokens=12", "train.log_every=1", *ZERO3_ALL]
SMALL = ["data.max_seq_len=48", "data.max_prompt_tokens=24", "train.micro_batch_size=4", "train.eval_batch_size=100",
         "train.max_steps=3", "engine.zero_stage=0"]


@pytest.fixture(scope="module")
def policy_and_rm(tiny_base, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mn_models")
    sft, rm = str(root / "sft"), str(root / "rm")
    run_cli(["sft", f"model={tiny_base}", f"output_dir={sft}", *SMALL], ranks=1)
    run_cli(["rm", f"model={tiny_base}", f"output_dir={rm}", *SMALL], ranks=1)
    return {"sft": sft, "rm": rm}


@pytest.fixture(scope="module")
def ppo_run(policy_and_rm, tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("mn_ppo") / "ppo")
    nodes = run_fake_nodes(["ppo", f"output_dir={out}", f"actor.model={policy_and_rm['sft']}",
                            f"reward.model={policy_and_rm['rm']}", *PPO_ARGS], nodes=2, slots=1, timeout=400)
    return {"out": out, "nodes": nodes}


def test_both_nodes_ran_one_rank_of_a_world_of_two(ppo_run):
    nodes, out = ppo_run["nodes"], ppo_run["out"]
    assert [n["returncode"] for n in nodes] == [0, 0]  # run_fake_nodes raises otherwise; explicit for the reader
    for i, node in enumerate(nodes):
        assert "dist_world_size=2" in node["output"], node["output"][-3000:]
    assert "== ppo summary ==" in nodes[0]["output"] and "== ppo summary ==" not in nodes[1]["output"]
    assert sorted(os.listdir(os.path.join(out, "logs"))) == ["rank0.log", "rank1.log"]
    for r in (0, 1):
        with open(os.path.join(out, "logs", f"rank{r}.log"), encoding="utf-8") as f:
            log = f.read()
        assert f"[rank{r}]" in log and "ppo: world size 2" in log, log[:2000]
        assert f"[rank{1 - r}]" not in log  # each rank writes only its own file


def test_shared_outputs_written_once(ppo_run):
    out = ppo_run["out"]
    entries = sorted(os.listdir(out))
    for name in ("config.yaml", "metrics.jsonl", "results.json", "model", "critic", "logs", "data"):
        assert name in entries, entries
    # atomic writes by one writer leave no temp/old folders behind (two writers racing on the rename would)
    leftovers = [e for e in entries if e.startswith((".tmp-", ".old-"))]
    assert not leftovers, entries
    for sub in ("model", "critic"):
        assert not [e for e in os.listdir(os.path.join(out, sub)) if e.startswith((".tmp-", ".old-"))]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(os.path.join(out, "model")))
    assert {"config.json", "scalar_head.safetensors", "scalar_head.json"} <= set(os.listdir(os.path.join(out, "critic")))

    rows = read_metrics(out)
    keys = [json.dumps({k: v for k, v in r.items() if k != "time"}, sort_keys=True) for r in rows]
    assert rows and len(keys) == len(set(keys)), f"duplicated metrics lines (more than one writer): {rows}"
    steps = [r["step"] for r in rows if "ppo/kl" in r]
    assert steps == list(range(1, STEPS + 1))  # one row per PPO iteration, in order, not one per rank
    for r in rows:
        if "ppo/kl" in r:
            for key in ("ppo/reward", "ppo/kl", "ppo/policy_loss", "ppo/value_loss"):
                assert math.isfinite(r[key]), (key, r)
            assert 0 < r["ppo/response_length"] <= 12

    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    assert results["steps"] == STEPS and math.isfinite(results["reward_mean"])


def test_policy_trained_across_nodes_and_reloads(ppo_run, policy_and_rm):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = ppo_run["out"]
    final = load_file(os.path.join(out, "model", "model.safetensors"))
    start = load_file(os.path.join(policy_and_rm["sft"], "model", "model.safetensors"))
    assert final.keys() == start.keys()
    assert any(not torch.equal(final[k], start[k]) for k in final)  # the actor was updated
    assert all(torch.isfinite(v).all() for v in final.values())
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "model"))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_tensor_parallel_generation_within_each_of_two_nodes(tmp_path_factory):
    """4 ranks as 2 fake nodes of 2, `hybrid.tp_size=2`: each node's two ranks decode together (one TP group per node,
    the groups' all-reduces kept within their group), and PPO runs to its end on ZeRO-3 across both nodes. Greedy
    rollouts make step 1 a function of the tokens alone: it must equal the same run with whole copies (tp_size=1)."""
    from dist_hybrid_models import tiny_models

    models = tiny_models(tmp_path_factory)
    runs = {}
    for tp, steps in ((2, STEPS), (1, 1)):
        out = str(tmp_path_factory.mktemp(f"mn_tp{tp}") / "ppo")
        nodes = run_fake_nodes(["ppo", f"output_dir={out}", f"actor.model={models['llama']}",
                                f"reward.model={models['llama_rm']}", f"hybrid.tp_size={tp}", *PPO_ARGS,
                                f"ppo.steps={steps}", "ppo.rollout_batch_size=2", "ppo.micro_batch_size=2",
                                "generation.do_sample=false"], nodes=2, slots=2, timeout=400)
        assert all("dist_world_size=4" in n["output"] for n in nodes), nodes[0]["output"][-3000:]
        runs[tp] = [r for r in read_metrics(out) if "ppo/kl" in r]
    assert [r["step"] for r in runs[2]] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["ppo/reward"]) and r["ppo/response_length"] > 0 for r in runs[2]), runs[2]
    for key in ("ppo/reward", "ppo/gold_reward", "ppo/response_length", "ppo/eos_rate", "ppo/kl"):
        assert runs[2][0][key] == pytest.approx(runs[1][0][key], abs=1e-5), key
