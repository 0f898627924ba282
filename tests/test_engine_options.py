"""Engine options on 2 CPU ranks under ZeRO-3, a few SFT steps from `tiny_base` each, against the same run with the
defaults (torch AdamW, no checkpointing, no offload):

* `engine.optimizer=adamw_8bit`: the optimizer DeepSpeed drives is bitsandbytes' AdamW8bit and its moment states
  are uint8 over this rank's ZeRO-3 partition; the loss moves, the held-out loss drops, the model reloads.
* `engine.gradient_checkpointing=true`: attention really runs twice per training step (forward + recompute in backward)
  and the per-step loss equals the plain run's (checkpointing must not change the math).
* `engine.offload_optimizer=true`: DeepSpeed runs its CPU Adam on the offloaded partition; the loss stays close to
  the plain run's.

Every run is the real CLI (`rlhf_ds.cli.main`) under the deepspeed launcher; this file doubles as the rank script
(`python tests/test_engine_options.py sft ... [:: sft ...]`, see `probe_main`), which only adds observation: it wraps
`strategy.init_trainable` to keep the engine and count attention calls, and after each step writes what it saw to
`<output_dir>.probe.rank<N>.json`. Nothing is added to the package.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO, RUN_SEPARATOR, cli_env, free_port, read_metrics, split_runs

STEPS = 5
MAX_PROMPT, MAX_SEQ = 24, 48
SFT_ARGS = [f"data.max_seq_len={MAX_SEQ}", f"data.max_prompt_tokens={MAX_PROMPT}", "train.micro_batch_size=4",
            "train.log_every=1", "train.eval_batch_size=50", f"train.max_steps={STEPS}", "engine.zero_stage=3"]
OPTIONS = {
    "plain": [],
    "adamw_8bit": ["engine.optimizer=adamw_8bit"],
    "checkpointing": ["engine.gradient_checkpointing=true"],
    "offload": ["engine.offload_optimizer=true"],
}


# ---------------------------------------------------------------------------------------------------------------------
# The rank script: the real CLI, observed
# ---------------------------------------------------------------------------------------------------------------------
def _first_attention(model):
    """The attention module of the first transformer block of a (GPT-2 or LLaMA) causal LM.

    Counted rather than the block itself: transformers checkpoints a block's `forward`, not its `__call__`, so hooks
    on the block fire once per step either way; modules called inside the block run again in the recompute."""
    for name in ("transformer.h", "model.layers"):
        node = model
        for part in name.split("."):
            node = getattr(node, part, None)
        if node is not None:
            block = node[0]
            return getattr(block, "attn", None) or block.self_attn
    raise AssertionError(f"no transformer blocks found in {type(model).__name__}")


def _describe_engine(engine, calls: dict) -> dict:
    import torch

    model = engine.module
    zero_opt = engine.optimizer
    inner = getattr(zero_opt, "optimizer", zero_opt)
    states = []
    for param, state in inner.state.items():
        states.append({"param_numel": param.numel(), "param_dtype": str(param.dtype),
                       "tensors": {k: {"dtype": str(v.dtype), "numel": v.numel()}
                                   for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0}})
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "zero_optimizer": type(zero_opt).__name__,
        "inner_optimizer": f"{type(inner).__module__}.{type(inner).__name__}",
        # the ZeRO-3 optimizer's own flag, and the device the config asked for ("none" or "cpu")
        "offload_optimizer": bool(getattr(zero_opt, "offload_optimizer", False)),
        "offload_device": str(getattr(engine.zero_offload_optimizer(), "device", None)),
        "zero_stage": engine.zero_optimization_stage(),
        "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
        "attention_training_calls": calls["training"],
        "rank_partition_numel": sum(p.ds_tensor.numel() for p in trainable if hasattr(p, "ds_tensor")),
        "full_numel": sum(getattr(p, "ds_numel", p.numel()) for p in trainable),
        "states": states,
    }


def probe_main(argv: list[str]) -> int:
    """Run each `::`-separated CLI command in turn in this rank; after each, write `<output_dir>.probe.rank<N>.json`.

    Several engines in one process is what PPO does anyway; every step re-seeds, reloads its model from disk and
    builds a fresh engine, so runs do not leak into each other (checked: bit-identical losses to one launch per
    run)."""
    from rlhf_ds import cli
    from rlhf_ds.engine import strategy
    from rlhf_ds.utils import rank

    original = strategy.init_trainable
    for args in split_runs(argv):
        seen: dict = {}
        calls = {"training": 0}

        def observed_init_trainable(model, *a, **kw):
            def count(module, inputs):
                if module.training:  # training forwards and checkpoint recomputes; evaluation runs in eval mode
                    calls["training"] += 1

            _first_attention(model).register_forward_pre_hook(count)
            seen["engine"] = original(model, *a, **kw)
            return seen["engine"]

        strategy.init_trainable = observed_init_trainable
        code = cli.main(args)
        strategy.init_trainable = original
        if code:
            return code
        out_dir = next(a.split("=", 1)[1] for a in args if a.startswith("output_dir="))
        with open(f"{out_dir}.probe.rank{rank()}.json", "w", encoding="utf-8") as f:
            json.dump(_describe_engine(seen["engine"], calls), f, indent=1)
        del seen["engine"]
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Launching and reading runs
# ---------------------------------------------------------------------------------------------------------------------
def launch(runs: dict[str, list[str]], ranks: int = 2, timeout: int = 300) -> dict[str, list[dict]]:
    """This file as the rank script on `ranks` CPU ranks through the deepspeed launcher, running the CLI commands
    `{output_dir: args}` one after the other; returns each run's per-rank probes."""
    argv = []
    for out_dir, args in runs.items():
        argv += ([RUN_SEPARATOR] if argv else []) + [*args, f"output_dir={out_dir}"]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--no_local_rank",
           "--master_port", str(free_port()), os.path.abspath(__file__), *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(threads=1), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    probes = {}
    for out_dir in runs:
        probes[out_dir] = []
        for r in range(ranks):
            with open(f"{out_dir}.probe.rank{r}.json", encoding="utf-8") as f:
                probes[out_dir].append(json.load(f))
    return probes


def results(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
        return json.load(f)


def losses(run_dir: str) -> dict[int, float]:
    return {row["step"]: row["sft/loss"] for row in read_metrics(run_dir) if "sft/loss" in row}


def heldout_nll(run_dir: str) -> float:
    """Token-mean NLL of the run's SFT eval set recomputed from the saved folder with plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_ds.data.features import collate_sft, sft_features
    from rlhf_ds.data.formats import load_sft
    from rlhf_ds.models.loading import load_tokenizer

    model_dir = os.path.join(run_dir, "model")
    tok = load_tokenizer(model_dir)
    examples, _ = load_sft(os.path.join(run_dir, "data", "sft_eval.jsonl"))
    feats, _ = sft_features(examples, tok, MAX_PROMPT, MAX_SEQ)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(feats), 100):
            b = collate_sft(feats[i:i + 100], tok.pad_token_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            labels = b["labels"][:, 1:]
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum").item()
            n += int((labels != -100).sum())
    return nll / n


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory) -> dict[str, dict]:
    """The four runs in one launch (launcher and import start-up is most of a tiny run's time)."""
    root = tmp_path_factory.mktemp("engine_options")
    dirs = {name: str(root / name) for name in OPTIONS}
    probes = launch({dirs[n]: ["sft", f"model={tiny_base}", *SFT_ARGS, *OPTIONS[n]] for n in OPTIONS}, timeout=600)
    return {name: {"dir": d, "probes": probes[d], "losses": losses(d), "results": results(d)} for name, d in dirs.items()}


def check_run(run: dict) -> None:
    """Trained for STEPS steps with finite, moving losses; the saved folder reloads and holds the trained weights."""
    steps = run["losses"]
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in steps.values())
    assert len({round(v, 5) for v in steps.values()}) == STEPS  # the loss changes every step
    res = run["results"]
    assert res["steps"] == STEPS and res["eval_loss"] < res["eval_loss_start"], res
    # the held-out NLL from the reloaded folder is what the run measured at the end (fp32, other batching)
    assert heldout_nll(run["dir"]) == pytest.approx(res["eval_loss"], rel=1e-5)
    for probe in run["probes"]:
        assert probe["zero_stage"] == 3 and probe["zero_optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
        # ZeRO-3 partitioned: each rank holds about half of the parameters
        assert probe["full_numel"] <= 2 * probe["rank_partition_numel"] <= probe["full_numel"] + 1000


def test_plain_baseline(runs):
    run = runs["plain"]
    check_run(run)
    for probe in run["probes"]:
        assert probe["inner_optimizer"] == "torch.optim.adamw.AdamW"
        assert not probe["offload_optimizer"] and not probe["gradient_checkpointing"]
        assert probe["offload_device"] in ("none", "OffloadDeviceEnum.none")
        assert probe["attention_training_calls"] == STEPS  # one forward per step (grad_accum 1), no recompute
        [state] = probe["states"]  # one flat fp32 partition, fp32 moments of its size
        assert state["tensors"]["exp_avg"] == state["tensors"]["exp_avg_sq"] == \
            {"dtype": "torch.float32", "numel": state["param_numel"]}


def test_adamw_8bit_keeps_uint8_states_under_zero3(runs):
    run = runs["adamw_8bit"]
    check_run(run)
    for probe in run["probes"]:
        assert probe["inner_optimizer"] == "bitsandbytes.optim.adamw.AdamW8bit"
        assert probe["states"], "no optimizer state: the optimizer never stepped"
        held = 0
        for state in probe["states"]:
            assert state["param_dtype"] == "torch.float32"  # the fp32 master partition DeepSpeed hands it
            t = state["tensors"]
            # both Adam moments quantised to 1 byte per element of the partition (8 bytes/element with AdamW)
            assert t["state1"] == t["state2"] == {"dtype": "torch.uint8", "numel": state["param_numel"]}, t
            assert all(v["dtype"] != "torch.float32" or v["numel"] < state["param_numel"] // 100 for v in t.values())
            held += state["param_numel"]
        assert held == probe["rank_partition_numel"]  # the states cover exactly this rank's shard
    # step 1's loss is computed before any update: identical to the plain run's; later steps use other updates
    plain, bnb = runs["plain"]["losses"], run["losses"]
    assert bnb[1] == pytest.approx(plain[1], rel=1e-6)
    assert any(abs(bnb[s] - plain[s]) > 1e-6 for s in range(2, STEPS + 1))


def test_gradient_checkpointing_recomputes_and_keeps_the_math(runs):
    run = runs["checkpointing"]
    check_run(run)
    for probe in run["probes"]:
        assert probe["gradient_checkpointing"]
        assert probe["attention_training_calls"] == 2 * STEPS  # forward, then recomputed in every backward
    plain = runs["plain"]["losses"]
    # recomputation repeats the same fp32 ops on the same inputs (no dropout in tiny_base): the gradients, hence the
    # next steps' losses, are the plain run's
    for step in range(1, STEPS + 1):
        assert run["losses"][step] == pytest.approx(plain[step], abs=1e-5, rel=0), step
    assert run["results"]["eval_loss"] == pytest.approx(runs["plain"]["results"]["eval_loss"], abs=1e-5, rel=0)


def test_offload_optimizer_runs_on_cpu_adam(runs):
    run = runs["offload"]
    check_run(run)
    for probe in run["probes"]:
        assert probe["offload_optimizer"] and probe["offload_device"] in ("cpu", "OffloadDeviceEnum.cpu")
        # DeepSpeed's CPU Adam when its op builds (cached here); the documented fallback is torch AdamW
        assert probe["inner_optimizer"] in ("deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam", "torch.optim.adamw.AdamW")
        [state] = probe["states"]
        assert state["tensors"]["exp_avg"]["numel"] == state["param_numel"] == probe["rank_partition_numel"]
    plain = runs["plain"]["losses"]
    # another Adam kernel (fused C++ vs torch) on the same fp32 partition: ~1e-7 relative per update
    for step in range(1, STEPS + 1):
        assert run["losses"][step] == pytest.approx(plain[step], abs=1e-4, rel=0), step


if __name__ == "__main__":  # a rank of `launch(...)`
    code = probe_main(sys.argv[1:])
    if code == 0:  # as `rlhf_ds.cli.entry` does
        from rlhf_ds.engine.strategy import end_rank

        end_rank(code)
    sys.exit(code)
