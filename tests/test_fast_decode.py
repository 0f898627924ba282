"""The fast GPU decode path (`hybrid.decode`, rlhf_ds/rollout/fast_decode.py) and its benchmark, on CPU.

What CPU can check: the path is refused here with a clear message; a family without a static cache / compilable step
falls back to the "hf" path with a warning (decided from transformers' flags, or from a failing first call); the
static-cache kwargs the fast path adds decode a left-padded batch to the same greedy tokens as today's path (the
compile itself needs CUDA); and `benchmarks/gpu_generation.py --tiny` runs end to end and prints its table.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, cli_env
from rlhf_ds.rollout.fast_decode import (DECODE_MODES, FastDecoder, check_decode, fast_generate_kwargs,
                                         static_cache_support)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=96, max_position_embeddings=128, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def test_config_key_defaults_to_hf_and_is_validated():
    from rlhf_ds.config import ConfigError, HybridConfig, load_config

    assert DECODE_MODES == ("hf", "static_compile")
    assert HybridConfig().decode == "hf"
    assert load_config("ppo", None, ["hybrid.decode=static_compile"]).hybrid.decode == "static_compile"
    with pytest.raises(ConfigError, match="hybrid.decode"):
        load_config("ppo", None, ["hybrid.decode=vllm"])
    with pytest.raises(ValueError, match="hybrid.decode must be one of hf, static_compile"):
        check_decode("vllm")


def test_static_compile_is_refused_on_cpu_with_a_clear_message():
    from deepspeed.accelerator import get_accelerator

    assert get_accelerator().device_name() == "cpu"
    check_decode("hf")  # today's path runs anywhere
    FastDecoder("hf")
    with pytest.raises(ValueError) as err:
        FastDecoder("static_compile")
    msg = str(err.value)
    assert msg.startswith("hybrid.decode=static_compile needs CUDA") and "'cpu'" in msg and "hybrid.decode=hf" in msg
    with pytest.raises(ValueError, match="needs CUDA"):
        check_decode("static_compile", device_name="cpu")
    # on CUDA: only the portable backend, only tp_size 1
    check_decode("static_compile", device_name="cuda")
    with pytest.raises(ValueError, match="backend=portable"):
        check_decode("static_compile", backend="deepspeed", device_name="cuda")
    with pytest.raises(ValueError, match="tp_size=2"):
        check_decode("static_compile", tp_size=2, device_name="cuda")


def test_llama_takes_the_fast_path_with_bucketed_static_cache():
    model = tiny_llama()
    assert static_cache_support(model) == (True, "")
    dec = FastDecoder("static_compile", device_name="cuda")  # the decision only; nothing runs on a device here
    kw = dec.generate_kwargs(model, prompt_len=37, max_new_tokens=24)
    assert kw["cache_implementation"] == "static" and kw["max_cache_len"] == 128  # 61 rounded up to the 128 bucket
    assert kw["compile_config"].mode == "reduce-overhead" and kw["compile_config"].dynamic is False
    assert dec.mode == "static_compile" and dec.fallback_reason is None
    assert fast_generate_kwargs(model, 120, 24)["max_cache_len"] == 256
    assert FastDecoder("hf").generate_kwargs(model, 37, 24) == {}


def test_static_cache_gives_the_same_greedy_tokens_on_a_left_padded_batch():
    """What the fast path changes besides the compile (which needs CUDA): the static KV cache, left padding included."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 96, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0  # left padding
    ids[2, :1], mask[2, :1] = 0, 0
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                  eos_token_id=2, use_cache=True)
    extra = fast_generate_kwargs(model, ids.shape[1], 12)
    extra.pop("compile_config")  # transformers compiles only on CUDA (it would warn and skip here)
    with torch.no_grad():
        ref = model.generate(**common)
        out = model.generate(**common, **extra)
    assert torch.equal(out, ref)


def test_unsupported_family_falls_back_to_hf_with_a_warning(caplog):
    from transformers import JetMoeConfig, JetMoeForCausalLM

    assert JetMoeForCausalLM._can_compile_fullgraph is False  # transformers: MoE top-k gating cannot be traced
    torch.manual_seed(0)
    model = JetMoeForCausalLM(JetMoeConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                           num_key_value_heads=2, kv_channels=8, intermediate_size=32, num_local_experts=2,
                                           num_experts_per_tok=1, vocab_size=64, max_position_embeddings=64,
                                           bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    ok, why = static_cache_support(model)
    assert not ok and "_can_compile_fullgraph=False" in why and "JetMoeForCausalLM" in why
    dec = FastDecoder("static_compile", device_name="cuda")
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=2)
    with caplog.at_level(logging.WARNING, logger="rlhf_ds.rollout.fast_decode"), torch.no_grad():
        assert dec.generate_kwargs(model, 5, 4) == {}
        out = dec.generate(model, ids, **kw)
        ref = model.generate(input_ids=ids, **kw)
    assert torch.equal(out, ref)
    assert dec.mode == "hf" and "falls back to hybrid.decode=hf" in caplog.text and "JetMoeForCausalLM" in caplog.text
    assert sum("falls back" in r.getMessage() for r in caplog.records) == 1  # one warning, not one per rollout


def test_a_failing_first_static_call_falls_back_and_decodes_the_batch(caplog):
    """What the flags cannot tell: the first static/compiled generate raises -> warning, the same batch on "hf"."""
    model = tiny_llama()
    calls = []

    class Refusing(torch.nn.Module):  # a supported-looking model whose static cache path fails at first use
        config = model.config
        _can_compile_fullgraph = True

        def _supports_default_dynamic_cache(self):
            return True

        def generate(self, **kw):
            calls.append("static" if "cache_implementation" in kw else "hf")
            if "cache_implementation" in kw:
                raise NotImplementedError("static cache not implemented for this attention")
            return model.generate(**kw)

    dec = FastDecoder("static_compile", device_name="cuda")
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=2)
    with caplog.at_level(logging.WARNING, logger="rlhf_ds.rollout.fast_decode"), torch.no_grad():
        out = dec.generate(Refusing(), ids, **kw)
        again = dec.generate(Refusing(), ids, **kw)
    assert calls == ["static", "hf", "hf"]
    assert torch.equal(out, again) and out.shape == (2, 11)
    assert dec.mode == "hf" and "NotImplementedError" in dec.fallback_reason and "falls back" in caplog.text


def test_gpu_benchmark_tiny_runs_on_cpu_and_prints_its_table(tmp_path):
    """`python benchmarks/gpu_generation.py --tiny`: every path it can run on CPU, < 60 s."""
    out = tmp_path / "gpu_generation.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "gpu_generation.py"), "--tiny", "--repeats", "1",
           "--train-repeats", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=cli_env(threads=2), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    text = proc.stdout
    assert "| path | batch | tokens/s |" in text and "PPO-style update" in text and "measured/planned" in text
    assert "hybrid.decode=static_compile needs CUDA" in text  # the CUDA-only part is skipped with a note
    res = json.loads(out.read_text())
    rows = {(r["path"], r["batch"]): r for r in res["rows"]}
    assert set(rows) == {("hf", 1), ("hf", 4), ("static_compile", 1), ("static_compile", 4)}
    assert all(r["tokens_per_s"] > 0 and r["s_per_step"] > 0 and r["roofline_fraction"] > 0 for r in rows.values())
    assert rows[("static_compile", 4)]["how"] == "static cache, no compile (CPU)"
    assert rows[("static_compile", 4)]["greedy_token_agreement_vs_hf"] > 0.9
    (train,) = res["train"]
    assert train["planner"]["n_params"] == res["model"]["n_params"]  # the planner lays the model out exactly
    assert train["mfu_fwd_bwd_6N_attn"] > train["mfu_fwd_bwd_6N"] > 0 and train["max_memory_allocated"] > 0
    assert res["total_seconds"] < 60
