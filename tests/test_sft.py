"""Steps 0 and 1 end to end through the real CLI: ZeRO-3 on 2 CPU ranks against ZeRO-0 on one, SFT lowering the
held-out loss, saved folders used with plain transformers/peft, LoRA, a LLaMA-style model, bf16.

Saved models are checked by `tests/dist_plain_hf.py` in a subprocess that never imports rlhf_ds.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, TINY_ARCH, cli_env, read_metrics, run_cli

HELPER = os.path.join(REPO, "tests", "dist_plain_hf.py")
SFT_STEPS = 30
SFT_SMALL = ["data.max_seq_len=48", "data.max_prompt_tokens=24", "train.micro_batch_size=4", "train.log_every=1",
             "train.eval_batch_size=50"]


def plain_hf(*checks: tuple[str, dict]) -> list[dict]:
    """Run checks of saved folders with transformers/peft alone, in one process where rlhf_ds is not importable."""
    env = cli_env(threads=2)
    env["PYTHONPATH"] = ""  # the repo must not be on the path: a downstream user has only the folder
    proc = subprocess.run([sys.executable, HELPER, json.dumps(checks)], cwd="/", env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"{checks} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["rlhf_ds_imported"] is False
    return result["checks"]


def first_prompt(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return json.loads(f.readline())["prompt"]


def results(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
        return json.load(f)


def step_losses(run_dir: str, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in read_metrics(run_dir) if key in row}


def partition_line(run_dir: str, rank: int) -> tuple[int, int, int] | None:
    """(tensors, elements held by the rank, full elements) from the rank's 'zero-3 partitions' debug line."""
    with open(os.path.join(run_dir, "logs", f"rank{rank}.log"), encoding="utf-8") as f:
        m = re.search(r"zero-3 partitions: (\d+) tensors, this rank holds (\d+) of (\d+) elements", f.read())
    return tuple(int(g) for g in m.groups()) if m else None


def base_model_dims(base_run: str) -> dict:
    with open(os.path.join(base_run, "model", "config.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def sft_pair(tiny_base, tmp_path_factory) -> dict[str, str]:
    """The same SFT run twice: ZeRO-0 on 1 rank with grad_accum=2, ZeRO-3 on 2 ranks with grad_accum=1.

    rlhf_ds.data.batching gives micro-step j of rank r the slice (j * world + r) of each global batch, so both runs
    see the same micro-batches and the same global batch of 8 per optimizer step.
    """
    root = tmp_path_factory.mktemp("sft_pair")
    common = ["sft", f"model={tiny_base}", f"train.max_steps={SFT_STEPS}", *SFT_SMALL]
    z0, z3 = str(root / "zero0"), str(root / "zero3")
    # and whole logits on one side, log-probs from hidden states in chunks of 16 tokens (many per micro-batch) on the other
    run_cli([*common, f"output_dir={z0}", "engine.zero_stage=0", "train.grad_accum=2", "engine.logit_chunk_tokens=0"],
            ranks=1)
    run_cli([*common, f"output_dir={z3}", "engine.zero_stage=3", "train.grad_accum=1", "engine.logit_chunk_tokens=16"],
            ranks=2)
    return {"zero0": z0, "zero3": z3}


def test_zero3_two_ranks_matches_zero0_one_rank(sft_pair):
    z0 = step_losses(sft_pair["zero0"], "sft/loss")
    z3 = step_losses(sft_pair["zero3"], "sft/loss")
    assert sorted(z0) == sorted(z3) == list(range(1, SFT_STEPS + 1))
    # fp32 both ways; only the reduction order differs (grad averaging over 2 ranks vs accumulation over 2 micro-steps,
    # reduce-scatter of flat buckets vs per-tensor sums, clipping norms summed over shards). Each adds ~1e-7 relative
    # per step (measured: steps 1-5 equal to 7 digits, ~1e-7 apart by step 6); 1e-5 relative leaves room yet catches
    # any real difference (a wrong batch, a missing gradient average or a skipped step changes the loss by >1e-3).
    for step in range(1, 6):
        assert z3[step] == pytest.approx(z0[step], rel=1e-5, abs=0), f"step {step}: {z3[step]} vs {z0[step]}"
    # the runs must actually be training (otherwise equal losses prove nothing)
    assert len({round(z0[s], 4) for s in range(1, 6)}) == 5
    # held-out loss before and after, computed on different shardings of the eval set (1 vs 2 ranks)
    r0, r3 = results(sft_pair["zero0"]), results(sft_pair["zero3"])
    assert r3["eval_loss_start"] == pytest.approx(r0["eval_loss_start"], rel=1e-6)
    assert r3["eval_loss"] == pytest.approx(r0["eval_loss"], rel=1e-4)  # 30 steps of drift, still tiny
    assert r0["steps"] == r3["steps"] == SFT_STEPS


def test_zero3_really_partitions_parameters(sft_pair):
    total = results(sft_pair["zero3"])["total_params"]
    for rank in (0, 1):
        line = partition_line(sft_pair["zero3"], rank)
        assert line is not None, f"rank {rank} logged no partitioning"
        tensors, held, full = line
        assert full == total
        # each tensor is split in 2; a tensor of odd size gives each rank ceil(n/2), hence at most 1 extra per tensor
        assert full <= 2 * held <= full + tensors, (held, full)
    assert partition_line(sft_pair["zero0"], 0) is None  # ZeRO-0: nothing partitioned


def test_sft_lowers_heldout_loss_and_saves_a_plain_hf_model(sft_pair, tiny_base):
    run = sft_pair["zero3"]
    res = results(run)
    # measured: 3.09 -> ~2.6 after 30 steps; the base was pretrained on text alone, so the response format is learnt
    assert res["eval_loss"] < res["eval_loss_start"] - 0.2, res
    assert math.isfinite(res["train_loss"]) and res["trainable_params"] == res["total_params"]
    model = os.path.join(run, "model")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(model))
    assert not os.path.exists(os.path.join(model, "adapter"))

    # the held-out NLL recomputed with transformers alone from the saved folders equals what training reported:
    # the saved weights are the trained ones, and the base is what SFT started from
    eval_file = os.path.join(run, "data", "sft_eval.jsonl")
    nll, info = plain_hf(
        ("sft_nll", dict(models=[os.path.join(tiny_base, "model"), model], data=eval_file, max_seq_len=48)),
        ("inspect", dict(model=model, prompt=first_prompt(eval_file))),  # a held-out prompt of the task
    )
    nll = nll["nll"]
    assert nll[model] == pytest.approx(res["eval_loss"], rel=1e-4)
    assert nll[os.path.join(tiny_base, "model")] == pytest.approx(res["eval_loss_start"], rel=1e-4)
    assert len({info["pad"], info["eos"], info["bos"]}) == 3 and None not in (info["pad"], info["eos"], info["bos"])
    assert info["config_pad"] == info["pad"] and info["config_eos"] == info["eos"]
    assert info["len_tokenizer"] == info["vocab_size"]  # the pretrain tokenizer has its own PAD: no resize
    assert info["new_ids"] and info["text"].strip(), info


def test_lora_sft_trains_only_adapters(tiny_base, tmp_path):
    out = str(tmp_path / "lora")
    rank = 4
    run_cli(["sft", f"model={tiny_base}", f"output_dir={out}", "train.max_steps=5", *SFT_SMALL, "engine.zero_stage=3",
             "engine.lora.enabled=true", f"engine.lora.rank={rank}", "engine.lr=1e-2"], ranks=2)
    res = results(out)
    cfg = base_model_dims(tiny_base)
    d, inner, layers = cfg["n_embd"], cfg["n_inner"] or 4 * cfg["n_embd"], cfg["n_layer"]
    # GPT-2 default targets c_attn (d -> 3d), attn.c_proj (d -> d), mlp.c_fc (d -> inner), mlp.c_proj (inner -> d);
    # a rank-r adapter on a (in -> out) layer has r * (in + out) weights (A: r x in, B: out x r), no bias
    per_layer = rank * ((d + 3 * d) + (d + d) + (d + inner) + (inner + d))
    assert res["trainable_params"] == layers * per_layer == 2 * 4 * 1024
    # the base model counted by hand: embeddings, per block 2 LayerNorms + 4 Conv1D (weight + bias), final LayerNorm
    base = cfg["vocab_size"] * d + cfg["n_positions"] * d + 2 * d + layers * (
        4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d))
    assert res["total_params"] == base + res["trainable_params"]
    tensors, held, total = partition_line(out, 1)
    assert total == res["total_params"] and total <= 2 * held <= total + tensors  # adapters are partitioned too
    assert tensors == (3 + 12 * layers + 1) + 2 * 4 * layers  # base tensors (wte, wpe, ln_f w+b) + lora_A/B per target

    model = os.path.join(out, "model")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(os.path.join(model, "adapter")))
    prompt = first_prompt(os.path.join(out, "data", "sft_eval.jsonl"))
    [check] = plain_hf(("lora", dict(base=os.path.join(tiny_base, "model"), merged=model,
                                     adapter=os.path.join(model, "adapter"), prompt=prompt)))
    assert check["adapter_config"]["r"] == rank and check["adapter_config"]["fan_in_fan_out"] is True
    assert check["lora_b_count"] == 4 * layers and check["lora_b_nonzero"] == 4 * layers  # every adapter moved
    # the base with the saved adapter on top computes what the saved merged model computes (fp32, a 2-layer model:
    # merging only reorders a few sums): the base weights were left untouched by training
    assert check["max_logit_diff"] < 1e-5, check["max_logit_diff"]
    assert check["base_vs_merged_logit_diff"] > 1e-2  # and the adapter does matter
    # merging changed exactly the target weight matrices; embeddings, norms and biases are the base's, bit for bit
    expected = {f"transformer.h.{i}.{m}.weight" for i in range(layers)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert set(check["changed_weights"]) == expected


def test_llama_pretrain_builds_trains_and_reloads(tmp_path):
    out = str(tmp_path / "llama")
    arch = [a for a in TINY_ARCH] + ["arch.type=llama"]
    run_cli(["pretrain", f"output_dir={out}", *arch, "train.max_steps=20", "train.micro_batch_size=16",
             "engine.zero_stage=3", "train.log_every=1"], ranks=2)
    res = results(out)
    losses = step_losses(out, "pretrain/loss")
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses.values())
    # measured: 6.0 (ln 400 = 5.99, a uniform guess) -> ~4.5 after 20 steps
    assert res["eval_loss_start"] == pytest.approx(math.log(res["vocab_size"]), abs=0.1)
    assert res["eval_loss"] < res["eval_loss_start"] - 0.5, res
    model = os.path.join(out, "model")
    held, info = plain_hf(
        ("lm_nll", dict(model=model, data=os.path.join(out, "data", "pretrain.jsonl"), block=64, fraction=0.05)),
        ("inspect", dict(model=model, prompt="the fox")),
    )
    assert held["model_type"] == "llama" and held["tied"] is True
    assert held["nll"] == pytest.approx(res["eval_loss"], rel=1e-4)  # the saved weights are the trained ones
    assert info["model_type"] == "llama" and len({info["pad"], info["eos"], info["bos"]}) == 3
    assert info["new_ids"] and info["text"].strip(), info


def test_bf16_sft_runs(sft_pair, tiny_base, tmp_path):
    out = str(tmp_path / "bf16")
    run_cli(["sft", f"model={tiny_base}", f"output_dir={out}", "train.max_steps=5", *SFT_SMALL, "engine.zero_stage=3",
             "engine.precision=bf16"], ranks=2)
    res = results(out)
    losses = step_losses(out, "sft/loss")
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses.values())
    # step 1 sees the same batch as the fp32 runs, before any update: bf16 weights/activations (8-bit mantissa,
    # ~4e-3 relative per value) move a mean over ~100 tokens by well under 1%
    fp32 = step_losses(sft_pair["zero3"], "sft/loss")[1]
    assert losses[1] == pytest.approx(fp32, rel=1e-2)
    assert res["eval_loss"] < res["eval_loss_start"], res
    with open(os.path.join(out, "model", "config.json"), encoding="utf-8") as f:
        assert json.load(f)["dtype"] == "bfloat16"
