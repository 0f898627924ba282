"""Tests for rlhf_ds.planner: worked examples, DeepSpeed's own estimators, layouts, LoRA,
8-bit, recommend(), the CLI glue, and a measurement of real DeepSpeed engines (2 CPU ranks)."""

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from rlhf_ds.planner import (GB, GIB, DeepSpeedKnobs, Hardware, ModelSpec, TrainSettings, Workload,
                             activation_bytes_per_layer, add_plan_arguments, bytes_per_param, format_plan,
                             parse_param_count, plan_job, recommend, run_plan_cli)
from rlhf_ds import planner as planner_mod
from rlhf_ds.config import EngineConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_GEN = Workload(generate=False)


def actor_plan(spec, hw, **settings):
    return plan_job({"actor": (spec, TrainSettings(role="actor", **settings))}, hw, NO_GEN).models["actor"]


# --------------------------------------------------------------------------- worked examples


def test_worked_example_bf16_weights_plus_fp32_adam_is_70gb():
    b = bytes_per_param("bf16")
    assert b["weights"] + b["optimizer_states"] == 10
    assert (b["weights"] + b["optimizer_states"]) * 7e9 == 70e9


def test_worked_example_full_mixed_precision_is_16_bytes_112gb():
    assert bytes_per_param("bf16")["total"] == 16
    assert bytes_per_param("fp32")["total"] == 16  # 4 + 4 + 8, no separate master copy
    m = actor_plan(ModelSpec(n_params=7e9), Hardware(gpus_per_node=1), zero_stage=0)
    assert m.model_states_gpu == 112 * GB
    assert m.gpu == {**m.gpu, "weights": 14e9, "gradients": 14e9, "optimizer_states": 84e9}


def test_worked_example_zero3_8_gpus_is_14gb_per_gpu():
    m = actor_plan(ModelSpec(n_params=7e9), Hardware(gpus_per_node=8), zero_stage=3)
    assert m.model_states_gpu == 14 * GB
    assert m.gpu["weights"] == m.gpu["gradients"] == 1.75e9 and m.gpu["optimizer_states"] == 10.5e9
    plan = plan_job({"actor": (ModelSpec(n_params=7e9), TrainSettings())}, Hardware(gpus_per_node=8), NO_GEN)
    text = format_plan(plan)
    assert "14.00" in text and "GB = 1e9" in text
    assert f"{plan.gpu_peak / GIB:.2f} GiB" in text


def test_parse_param_count():
    assert parse_param_count("7B") == parse_param_count("7e9") == parse_param_count("7b") == 7_000_000_000
    assert parse_param_count("350M") == 350_000_000 and parse_param_count("1.3B") == 1_300_000_000
    with pytest.raises(ValueError):
        parse_param_count("seven")


# --------------------------------------------------------------------------- DeepSpeed's estimators

DS_SIZES = [1_300_000_000, 7_000_000_000, 13_000_000_000]
DS_TOPOLOGIES = [(1, 1), (8, 1), (4, 2), (8, 2)]  # (gpus_per_node, nodes)
LARGEST = 32000 * 4096  # embedding of a LLaMA-7B: DeepSpeed's "largest layer"


@pytest.fixture(scope="module")
def ds_estimators():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


def _details(spec, hw, **kw):
    m = actor_plan(spec, hw, **kw)
    return m, m.gpu_details, m.cpu_details


@pytest.mark.parametrize("n", DS_SIZES)
@pytest.mark.parametrize("gpus,nodes", DS_TOPOLOGIES)
def test_matches_deepspeed_zero2_estimate(ds_estimators, n, gpus, nodes):
    est2, _ = ds_estimators
    hw = Hardware(gpus_per_node=gpus, nodes=nodes)
    spec = ModelSpec(n_params=n, largest_layer_params=LARGEST)
    # no offload: 2P (16-bit params) + 18P/N (16-bit grads, fp32 grads, fp32 master, Adam)
    cpu, gpu = est2(n, gpus, nodes, cpu_offload=False, additional_buffer_factor=1.0)
    m, g, c = _details(spec, hw, zero_stage=2)
    ours = g["weights"] + g["gradients"] + g["master_weights"] + g["moments"] + g["fp32_grad_scratch"]
    assert ours == gpu
    assert c["load_peak"] == cpu  # every rank materialises the fp32 model on the CPU
    # optimizer offload: GPU keeps the 16-bit params only
    cpu, gpu = est2(n, gpus, nodes, cpu_offload=True, additional_buffer_factor=1.0)
    m, g, c = _details(spec, hw, zero_stage=2, offload_optimizer=True)
    assert g["weights"] == gpu
    states = c["master_weights"] + c["moments"] + c["gradients_fp32"]  # 16 B/param per node's share
    assert states == 16 * n * gpus // (gpus * nodes)
    if nodes == 1:
        assert max(c["load_peak"], states) == cpu
    else:  # DeepSpeed multiplies by all GPUs (not per node) and does not divide by nodes: more conservative
        assert cpu >= max(c["load_peak"], states)
    # extras DeepSpeed's estimate leaves out: the 16-bit staging copy of the partition
    assert c["bit16_staging"] == 2 * n // nodes


@pytest.mark.parametrize("n", DS_SIZES)
@pytest.mark.parametrize("gpus,nodes", DS_TOPOLOGIES)
def test_matches_deepspeed_zero3_estimate(ds_estimators, n, gpus, nodes):
    _, est3 = ds_estimators
    N = gpus * nodes
    hw = Hardware(gpus_per_node=gpus, nodes=nodes)
    spec = ModelSpec(n_params=n, largest_layer_params=LARGEST)
    part = n // N
    sub_group = DeepSpeedKnobs().sub_group_size
    # no offload: DeepSpeed = 4*largest + 18P/N.  We count 2 + 2 + 4 + 8 (+4 fp32 grad scratch per
    # sub-group) per param/N: the 16-bit gradient partition (grad_partitions_flat_buffer,
    # measured below) is the 2 B/param/N DeepSpeed's estimator leaves out.
    cpu, gpu, largest_mem = est3(n, LARGEST, gpus, nodes, cpu_offload=False, cpu_offload_params=False,
                                 zero_init=True, additional_buffer_factor=1.0)
    m, g, c = _details(spec, hw, zero_stage=3)
    ours = (g["weights"] + g["gradients"] + g["master_weights"] + g["moments"] + g["fp32_grad_scratch"]
            + g["zero3_live_layer"])
    assert g["zero3_live_layer"] == largest_mem
    assert ours == gpu + 2 * part - 4 * (part - min(part, sub_group))
    assert c["load_peak"] == cpu
    cpu, _, _ = est3(n, LARGEST, gpus, nodes, cpu_offload=False, cpu_offload_params=False, zero_init=False,
                     additional_buffer_factor=1.0)
    plan_no_init = plan_job({"actor": (spec, TrainSettings())}, hw, NO_GEN, DeepSpeedKnobs(zero_init=False))
    assert plan_no_init.models["actor"].cpu_details["load_peak"] == cpu
    # optimizer offload: GPU = 16-bit param partition + live layer; CPU = 16 B/param of the node's share
    cpu, gpu, _ = est3(n, LARGEST, gpus, nodes, cpu_offload=True, cpu_offload_params=False, zero_init=True,
                       additional_buffer_factor=1.0)
    m, g, c = _details(spec, hw, zero_stage=3, offload_optimizer=True)
    assert g["weights"] + g["zero3_live_layer"] == gpu
    assert c["master_weights"] + c["moments"] + c["gradients_fp32"] == cpu
    assert c["gradients_16bit"] == 2 * n // nodes  # again the 16-bit grad partition (on CPU here)
    # optimizer + parameter offload: GPU = live layer only; CPU adds the 16-bit params
    cpu, gpu, _ = est3(n, LARGEST, gpus, nodes, cpu_offload=True, cpu_offload_params=True, zero_init=True,
                       additional_buffer_factor=1.0)
    m, g, c = _details(spec, hw, zero_stage=3, offload_optimizer=True, offload_params=True)
    assert g.get("weights", 0) == 0 and g["zero3_live_layer"] == gpu
    assert c["weights"] + c["master_weights"] + c["moments"] + c["gradients_fp32"] == cpu


# --------------------------------------------------------------------------- layouts & counting

TINY = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64, bos_token_id=0, eos_token_id=0)


def _save_config(path, kind):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    cfg = {"gpt2": lambda: GPT2Config(**TINY),
           "gpt2_untied": lambda: GPT2Config(tie_word_embeddings=False, n_inner=100, **TINY),
           "llama": lambda: LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
           "llama_tied_bias": lambda: LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                                  num_attention_heads=8, num_key_value_heads=8, vocab_size=300,
                                                  tie_word_embeddings=True, attention_bias=True),
           "qwen2": lambda: Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=512)}[kind]()
    cfg.save_pretrained(str(path))
    return cfg


def _meta_model(cfg):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("kind", ["gpt2", "gpt2_untied", "llama", "llama_tied_bias", "qwen2"])
def test_layout_from_config_matches_hf_and_deepspeed(tmp_path, kind):
    pytest.importorskip("transformers")
    cfg = _save_config(tmp_path, kind)
    spec = ModelSpec.from_pretrained_dir(str(tmp_path))
    model = _meta_model(cfg)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == list(spec.layout())
    from deepspeed.runtime.zero.stage3 import model_to_params

    largest = model_to_params(model)[1]  # DeepSpeed's own "largest layer" (its total needs real storage)
    assert spec.total_params == sum(p.numel() for p in model.parameters())
    assert spec.largest_layer() == largest
    exact = ModelSpec.from_pretrained_dir(str(tmp_path), exact=True)
    assert exact.arch == "exact" and exact.total_params == spec.total_params
    assert exact.largest_layer() == largest and exact.layout() == spec.layout()


def test_unknown_model_type_is_counted_on_meta_device(tmp_path):
    pytest.importorskip("transformers")
    from transformers import OPTConfig

    cfg = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
                    max_position_embeddings=64, word_embed_proj_dim=64)
    cfg.save_pretrained(str(tmp_path))
    spec = ModelSpec.from_pretrained_dir(str(tmp_path))
    assert spec.arch == "exact"
    assert spec.total_params == sum(p.numel() for p in _meta_model(cfg).parameters())
    assert spec.dims().hidden == 64 and spec.dims().n_layers == 2


def test_guessed_architecture_for_bare_counts():
    d = ModelSpec(n_params=7e9).dims()
    assert d.inferred and d.hidden == 4096 and 30 <= d.n_layers <= 34
    assert ModelSpec(n_params=13e9).dims().hidden == 5120


def test_activation_formula_reduces_to_korthikanti():
    spec = ModelSpec(n_layers=2, hidden=1024, vocab=1000, n_heads=16, arch="gpt2")
    b, s, h, a = 2, 512, 1024, 16
    eager = activation_bytes_per_layer(b, s, spec.dims(), 2, flash=False)
    assert eager == s * b * h * (34 + 5 * a * s / h)
    assert activation_bytes_per_layer(b, s, spec.dims(), 2, flash=True) == s * b * h * 34
    assert activation_bytes_per_layer(b, s, spec.dims(), 4, flash=True) == 2 * s * b * h * 34


def test_gradient_checkpointing_and_kv_cache():
    spec = ModelSpec(n_layers=32, hidden=4096, vocab=32000, n_heads=32, n_kv_heads=8, intermediate=11008)
    wl = Workload(micro_batch=4, prompt_len=512, response_len=512, generation_batch=8)
    full = plan_job({"actor": (spec, TrainSettings())}, Hardware(), wl).models["actor"]
    ckpt = plan_job({"actor": (spec, TrainSettings(gradient_checkpointing=True))}, Hardware(), wl).models["actor"]
    assert ckpt.gpu["activations"] < full.gpu["activations"] / 3
    # K and V, per layer, per kv head, bf16
    assert full.gpu["kv_cache"] == 2 * 32 * 8 * 128 * 8 * 1024 * 2
    assert full.gpu["gathered_params"] == 2 * spec.total_params  # hybrid engine: unsharded bf16 copy
    z2 = plan_job({"actor": (spec, TrainSettings(zero_stage=2))}, Hardware(), wl).models["actor"]
    assert z2.gpu["gathered_params"] == 0  # ZeRO-0/1/2 generate from the resident weights


# --------------------------------------------------------------------------- LoRA, 8-bit, frozen models


def test_lora_counts_match_peft(tmp_path):
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    for cfg, targets, fan in ((GPT2Config(**TINY), ("c_attn",), True),
                              (LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
                               ("q_proj", "v_proj", "down_proj"), False)):
        d = tmp_path / cfg.model_type
        cfg.save_pretrained(str(d))
        spec = ModelSpec.from_pretrained_dir(str(d))
        torch.manual_seed(0)
        model = peft.get_peft_model(AutoModelForCausalLM.from_config(cfg),
                                    peft.LoraConfig(r=8, target_modules=list(targets), fan_in_fan_out=fan))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        m = actor_plan(spec, Hardware(gpus_per_node=1), zero_stage=0, precision="fp32", lora_rank=8,
                       lora_target_modules=targets)
        assert m.n_trainable == trainable
        assert m.n_params == sum(p.numel() for p in model.parameters())


def test_lora_freezes_base_and_shrinks_states():
    spec = ModelSpec(n_layers=32, hidden=4096, vocab=32000, n_heads=32, intermediate=11008)
    hw = Hardware(gpus_per_node=8)
    full = actor_plan(spec, hw, zero_stage=2)
    lora = actor_plan(spec, hw, zero_stage=2, lora_rank=16)
    n_lora = 32 * 16 * ((4096 + 4096) * 2)  # q_proj and v_proj: r * (in + out) each
    assert lora.n_trainable == n_lora
    assert lora.gpu["weights"] >= 2 * spec.total_params  # frozen base stays (replicated under ZeRO-2)
    assert lora.gpu["optimizer_states"] == 12 * _part(n_lora, 8)
    assert lora.gpu["gradients"] < full.gpu["gradients"] / 100
    z3 = actor_plan(spec, hw, zero_stage=3, lora_rank=16)
    assert z3.gpu["weights"] < 2 * (spec.total_params + n_lora) / 8 * 1.001  # base sharded under ZeRO-3
    given = actor_plan(spec, hw, zero_stage=3, lora_trainable_fraction=0.01)
    assert given.n_trainable == round(0.01 * spec.total_params)


def _part(n, world):
    return -(-n // (2 * world)) * 2  # ZeRO-1/2 partition after padding to 2 * world


def test_8bit_optimizer_states_two_bytes():
    spec = ModelSpec(n_params=7e9)
    hw = Hardware(gpus_per_node=8)
    a = actor_plan(spec, hw, zero_stage=3)
    b = actor_plan(spec, hw, zero_stage=3, optimizer="adamw_8bit")
    assert a.gpu_details["moments"] == 8 * 7e9 / 8 and b.gpu_details["moments"] == 2 * 7e9 / 8
    assert a.model_states_gpu - b.model_states_gpu == 6 * 7e9 / 8


def test_frozen_models_hold_weights_only():
    spec = ModelSpec(n_params=7e9)
    hw = Hardware(gpus_per_node=8)
    ref = plan_job({"reference": spec}, hw).models["reference"]
    assert ref.gpu["weights"] == 2 * 7e9 / 8 and ref.gpu["gradients"] == 0 and ref.gpu["optimizer_states"] == 0
    ref0 = plan_job({"reference": (spec, TrainSettings(role="reference", zero_stage=0))}, hw).models["reference"]
    assert ref0.gpu["weights"] == 14e9
    off = plan_job({"reward": (spec, TrainSettings(role="reward", offload_params=True))}, hw).models["reward"]
    assert off.gpu["weights"] == 0 and off.cpu_per_node["weights"] == 14e9  # 8 ranks x 1/8 each


def test_four_model_plan_peak_and_json():
    spec = ModelSpec(n_layers=32, hidden=4096, vocab=32000, n_heads=32, intermediate=11008)
    plan = plan_job({"actor": spec, "critic": spec, "reference": spec, "reward": spec}, Hardware(gpus_per_node=8))
    assert plan.models["critic"].n_params == spec.total_params - 32000 * 4096 + 4096  # value head
    assert plan.gpu_peak == plan.gpu_resident + max(v - plan.gpu_resident for v in plan.gpu_phase_peaks.values()) \
        + int(plan.hardware.gpu_reserved_gb * GB)
    d = json.loads(json.dumps(plan.to_dict()))
    assert set(d["models"]) == {"actor", "critic", "reference", "reward"} and d["fits"] is True
    assert set(d["models"]["actor"]["gpu_bytes"]) == set(planner_mod.GPU_CATEGORIES)
    assert "actor" in plan.table() and "CPU per node" in plan.table()


def test_invalid_settings():
    with pytest.raises(ValueError):
        TrainSettings(zero_stage=2, offload_params=True)
    with pytest.raises(ValueError):
        TrainSettings(zero_stage=0, offload_optimizer=True)
    with pytest.raises(ValueError):
        TrainSettings(optimizer="sgd")
    with pytest.raises(ValueError):
        ModelSpec()


# --------------------------------------------------------------------------- recommend


def _four(n):
    spec = ModelSpec(n_params=n)
    return {"actor": spec, "critic": spec, "reference": spec, "reward": spec}


def test_recommend_fits_cheapest_first():
    rec = recommend(_four(7e9), Hardware(gpus_per_node=8, gpu_memory_gb=80))
    assert rec.fits and rec.plan.fits and rec.message.startswith("Fits")
    # nothing cheaper fits: every candidate with a lower cost overflows
    pairs = planner_mod._normalize_models(_four(7e9))
    for measures, cand in planner_mod._candidates(pairs, 16):
        cost = sum(planner_mod.MEASURE_COST[m] for m in measures)
        if cost < rec.cost:
            assert not plan_job(cand, rec.plan.hardware, rec.plan.workload).fits


def test_recommend_uses_expensive_measures_only_when_needed():
    small = recommend(_four(1.3e9), Hardware(gpus_per_node=8, gpu_memory_gb=80))
    assert small.fits and not any(m.startswith("offload") for m in small.measures)
    tight = recommend(_four(13e9), Hardware(gpus_per_node=8, gpu_memory_gb=40, cpu_memory_gb=512))
    assert tight.fits and tight.plan.gpu_peak <= 40 * GB
    assert "offload_optimizer" in tight.measures or "lora_actor" in tight.measures
    roomy = recommend(_four(13e9), Hardware(gpus_per_node=8, gpu_memory_gb=40, cpu_memory_gb=512), headroom_gb=2)
    assert roomy.plan.gpu_headroom >= 2 * GB


def test_recommend_nothing_fits_says_how_much():
    rec = recommend(_four(70e9), Hardware(gpus_per_node=1, gpu_memory_gb=24, cpu_memory_gb=64), max_nodes=4)
    assert not rec.fits and rec.message.startswith("Nothing fits")
    assert rec.gpu_over_bytes > 0 and "GB over per GPU" in rec.message
    assert rec.cpu_over_bytes > 0 and "GB over per node CPU" in rec.message
    assert json.loads(json.dumps(rec.to_dict()))["fits"] is False


# --------------------------------------------------------------------------- CLI glue


def _cli(argv, capsys):
    parser = add_plan_arguments(argparse.ArgumentParser())
    rc = run_plan_cli(parser.parse_args(argv))
    return rc, capsys.readouterr()


def test_cli_json_and_table(tmp_path, capsys):
    rc, out = _cli(["--actor", "7B", "--gpus-per-node", "8", "--json"], capsys)
    assert rc == 0
    d = json.loads(out.out)
    assert d["models"]["actor"]["model_states_gpu_bytes"] == 14 * GB
    assert d["models"]["reward"]["n_params"] == 7e9
    _save_config(tmp_path, "gpt2")
    rc, out = _cli(["--actor", str(tmp_path), "--critic", "1e6", "--zero-stage", "2", "--lora-rank", "8",
                    "--optimizer", "adamw_8bit", "--gradient-checkpointing", "--micro-batch", "2"], capsys)
    assert rc == 0 and "lora8" in out.out and "z2" in out.out
    rc, out = _cli(["--actor", "70B", "--gpus-per-node", "1", "--gpu-memory-gb", "24", "--cpu-memory-gb", "64"],
                   capsys)
    assert rc == 1 and "DOES NOT FIT" in out.out
    rc, out = _cli(["--actor", "7B", "--gpus-per-node", "8", "--recommend"], capsys)
    assert rc == 0 and out.out.startswith("Fits")
    rc, out = _cli(["--actor", "seven billion"], capsys)
    assert rc == 2 and "error" in out.err


def test_bucket_knobs_size_the_buffers_deepspeed_allocates(capsys):
    """The knobs default to what `engine.*` gives DeepSpeed; the buckets are counted as DeepSpeed allocates them:
    ZeRO-1/2 a reduce bucket per rank, a second one with overlap_comm (ipg double buffer); ZeRO-3 one resident reduce
    bucket whatever overlap_comm, and a prefetch bucket capped by the model and max live parameters."""
    eng = EngineConfig()
    assert (DeepSpeedKnobs().reduce_bucket_size, DeepSpeedKnobs().allgather_bucket_size,
            DeepSpeedKnobs().prefetch_bucket_size, DeepSpeedKnobs().max_live_parameters,
            DeepSpeedKnobs().overlap_comm) == (eng.reduce_bucket_size, eng.allgather_bucket_size,
                                               eng.zero3_prefetch_bucket_size, eng.zero3_max_live_parameters,
                                               eng.overlap_comm)
    spec, hw = ModelSpec(n_layers=32, hidden=4096, vocab=32000, n_heads=32, arch="llama"), Hardware(gpus_per_node=8)
    g = w = 2  # bf16 gradients and weights

    def details(stage, **knobs):
        st = TrainSettings(role="actor", zero_stage=stage)
        return plan_job({"actor": (spec, st)}, hw, NO_GEN, DeepSpeedKnobs(**knobs)).models["actor"].gpu_details

    for size in (5_000_000, 50_000_000):
        assert details(2, reduce_bucket_size=size, overlap_comm=False)["reduce_bucket"] == g * size
        assert details(2, reduce_bucket_size=size, overlap_comm=True)["reduce_bucket"] == 2 * g * size
        for overlap in (False, True):
            assert details(3, reduce_bucket_size=size, overlap_comm=overlap)["reduce_bucket"] == g * size
        assert details(3, prefetch_bucket_size=size)["zero3_prefetch_bucket"] == w * size
    assert details(3, prefetch_bucket_size=50_000_000, max_live_parameters=30_000_000)["zero3_prefetch_bucket"] \
        == w * 30_000_000
    # the CLI passes the options through: a smaller bucket plans fewer bytes
    planned = {}
    for opts in (["--reduce-bucket-size", "5e8", "--overlap-comm"], ["--reduce-bucket-size", "5M", "--overlap-comm"],
                 ["--reduce-bucket-size", "5M", "--no-overlap-comm"]):
        rc, out = _cli(["--actor", "7B", "--zero-stage", "2", "--gpu-memory-gb", "1000", "--json", *opts], capsys)
        assert rc == 0
        planned[" ".join(opts[1:])] = json.loads(out.out)["models"]["actor"]["gpu_details_bytes"]["reduce_bucket"]
    assert planned == {"5e8 --overlap-comm": 2 * g * 500_000_000, "5M --overlap-comm": 2 * g * 5_000_000,
                       "5M --no-overlap-comm": g * 5_000_000}
    rc, out = _cli(["--actor", "7B", "--json", "--prefetch-bucket-size", "1e6"], capsys)
    assert json.loads(out.out)["models"]["actor"]["gpu_details_bytes"]["zero3_prefetch_bucket"] == w * 1_000_000
    with pytest.raises(SystemExit):
        _cli(["--actor", "7B", "--reduce-bucket-size", "0"], capsys)
    assert "positive number of elements" in capsys.readouterr().err


# --------------------------------------------------------------------------- measured (real engines)

MEASURE_CONFIGS = [
    {"stage": 0, "lora": False}, {"stage": 0, "lora": True},
    {"stage": 2, "lora": False}, {"stage": 2, "lora": True},
    {"stage": 3, "lora": False}, {"stage": 3, "lora": True},
    {"stage": 0, "precision": "bf16"}, {"stage": 2, "precision": "bf16"}, {"stage": 3, "precision": "bf16"},
    {"stage": 2, "offload": True}, {"stage": 3, "offload": True},
    {"stage": 3, "param_persistence_threshold": 100_000},  # DeepSpeed's default: small tensors stay gathered
]
if importlib.util.find_spec("bitsandbytes") is not None:
    MEASURE_CONFIGS += [{"stage": s, "optimizer": "adamw_8bit"} for s in (0, 2, 3)]
# what tests/dist_measure_model_states.py gives DeepSpeed (overlap_comm unset: DeepSpeed's default)
MEASURE_KNOBS = DeepSpeedKnobs(reduce_bucket_size=100_000, allgather_bucket_size=100_000,
                               prefetch_bucket_size=100_000, param_persistence_threshold=0, overlap_comm=None)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    for mod in ("deepspeed", "peft", "transformers"):
        pytest.importorskip(mod)
    launcher = shutil.which("deepspeed")
    if launcher is None:
        pytest.skip("deepspeed launcher not on PATH")
    out = tmp_path_factory.mktemp("measure") / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(_free_port()),
           os.path.join(REPO, "tests", "dist_measure_model_states.py"), "--out", str(out),
           "--configs", json.dumps(MEASURE_CONFIGS)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.exists(), (proc.stdout[-4000:] + proc.stderr[-4000:])
    ranks = json.loads(out.read_text())["ranks"]
    assert len(ranks) == 2
    return ranks


def _tiny_spec(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_gpt2")
    _save_config(d, "gpt2")
    return ModelSpec.from_pretrained_dir(str(d))


def _planned(spec, conf):
    st = TrainSettings(role="actor", zero_stage=conf["stage"], precision=conf.get("precision", "fp32"),
                       lora_rank=8 if conf.get("lora") else 0, lora_target_modules=("c_attn",),
                       optimizer=conf.get("optimizer", "adamw"), offload_optimizer=bool(conf.get("offload")))
    hw = Hardware(gpus_per_node=2)
    knobs = dataclasses.replace(MEASURE_KNOBS, param_persistence_threshold=conf.get("param_persistence_threshold", 0))
    m = plan_job({"actor": (spec, st)}, hw, NO_GEN, knobs).models["actor"]
    g = hw.gpus_per_node
    # per rank: the GPU part plus this rank's share of the node's CPU part (offload); ZeRO-3
    # persistent (always gathered) small tensors are parameters too
    persistent = m.gpu_details.get("zero3_persistent_params", 0)
    return m, {"weights": m.gpu["weights"] + persistent + m.cpu_per_node["weights"] // g,
               "gradients": m.gpu["gradients"] + m.cpu_per_node["gradients"] // g,
               "optimizer_states": m.gpu["optimizer_states"] + m.cpu_per_node["optimizer_states"] // g}


@pytest.mark.parametrize("index", range(len(MEASURE_CONFIGS)),
                         ids=[json.dumps(c, separators=(",", ":")) for c in MEASURE_CONFIGS])
def test_planner_matches_measured_deepspeed(measured, tmp_path_factory, index):
    conf = MEASURE_CONFIGS[index]
    results = [rank[index] for rank in measured]
    assert all(r["config"] == conf for r in results)
    spec = _tiny_spec(tmp_path_factory)
    m, planned = _planned(spec, conf)
    assert m.n_params == results[0]["n_params"] and m.n_trainable == results[0]["n_trainable"]
    report = {}
    for cat, want in planned.items():
        got = [r[cat] for r in results]
        report[cat] = (want, got)
        # the plan is the worst rank: within 5% of the largest measurement, no rank above it by >5%
        assert abs(want - max(got)) <= 0.05 * max(got), (conf, cat, want, got)
        assert all(x <= want * 1.05 for x in got), (conf, cat, want, got)
    if conf["stage"] == 3:  # the persistent reduce bucket and grads kept after the step
        assert all(r["buffers_after_step"] == m.gpu_details["reduce_bucket"] for r in results)
        assert all(r["gradients_left_after_step"] == r["gradients"] for r in results)
    elif not conf.get("offload"):
        assert all(r["gradients_left_after_step"] == 0 for r in results)  # ZeRO-0/2 free grads after step
    print(f"\n{json.dumps(conf)} planned vs measured (rank0, rank1) bytes: {report}")


# --------------------------------------------------------------------------- TP generation (hybrid.tp_size)

LLAMA_7B = ModelSpec(n_layers=32, hidden=4096, vocab=32000, n_heads=32, n_kv_heads=8, intermediate=11008)


def test_autotp_split_mirrors_deepspeed():
    from rlhf_ds.planner import TP_FAMILIES, autotp_shard_sizes, tp_copy_numel
    from rlhf_ds.rollout.tensor_parallel import TP_FAMILIES as ENGINE_FAMILIES

    assert TP_FAMILIES == ENGINE_FAMILIES
    assert autotp_shard_sizes(8 * 128, 8, kv_heads=8) == [128] * 8  # one kv head each
    assert autotp_shard_sizes(6 * 16, 4, kv_heads=2) == [48, 48, 0, 0]  # fewer kv heads than ranks
    assert autotp_shard_sizes(200, 4, kv_heads=2, by_heads=False) == [64, 64, 64, 8]  # grains of 64, tail to the last
    assert autotp_shard_sizes(64, 2, by_heads=False) == [64, 0]  # the tiny llama's LM head: one grain
    # the tiny llama of tests/dist_hybrid_models.py (tied head, h 64, 2 layers): rank 0 holds the whole (untied) head
    tiny = ModelSpec(n_layers=2, hidden=64, vocab=512, n_heads=2, intermediate=256, tie_embeddings=True)
    assert tiny.total_params == 164_160 and tp_copy_numel(tiny, 2) == (131_392, 98_624)  # as counted there
    # per-rank numel of DeepSpeed 0.19.8 AutoTP (tp 4, meta device, counted once on 4 CPU ranks): uneven GQA,
    # tied qwen2 with q/k/v biases, mistral
    gqa = ModelSpec(n_layers=2, hidden=96, vocab=300, n_heads=6, n_kv_heads=2, head_dim=16, intermediate=200)
    assert tp_copy_numel(gqa, 4) == (109_920, 90_720, 66_144, 43_488)
    qwen = ModelSpec(n_layers=2, hidden=128, vocab=260, n_heads=8, n_kv_heads=4, intermediate=320,
                     tie_embeddings=True, qkv_bias=True)
    assert tp_copy_numel(qwen, 4) == (173_568, 124_416, 107_776, 107_776)
    mistral = ModelSpec(n_layers=1, hidden=256, vocab=500, n_heads=16, n_kv_heads=8, head_dim=16, intermediate=704)
    assert tp_copy_numel(mistral, 4) == (357_376, 357_376, 357_376, 308_224)


def test_generation_phase_with_tp_size():
    from rlhf_ds.planner import gather_group_numel, tp_copy_numel

    wl = Workload(micro_batch=4, prompt_len=512, response_len=512, generation_batch=8)
    hw = Hardware(gpus_per_node=8)
    plans = {tp: plan_job({"actor": (LLAMA_7B, TrainSettings(tp_size=tp))}, hw, wl).models["actor"] for tp in (1, 2, 8)}
    whole, tp2, tp8 = plans[1], plans[2], plans[8]
    assert whole.gpu["gathered_params"] == 2 * LLAMA_7B.total_params
    emb = 32000 * 4096
    for tp, m in ((2, tp2), (8, tp8)):
        copy = m.gpu["gathered_params"]
        assert copy == 2 * max(tp_copy_numel(LLAMA_7B, tp))
        # decoder-layer projections and LM head split, embedding and norms whole (tp 8: 11008 = 172 grains of 64
        # features split 22/21 -- the fullest rank holds a little more than 1/8 of the MLP)
        norms = 32 * 2 * 4096 + 4096
        split = LLAMA_7B.total_params - 2 * emb - norms
        even = 2 * (split // tp + emb + emb // tp + norms)
        assert copy == even if tp == 2 else 0 < copy - even < 0.02 * even
        # one gather group of full tensors on top while syncing; KV: 1/tp of the heads, tp x the sequences
        group = m.gpu_details["generation_gather_group"]
        assert group == 2 * gather_group_numel(LLAMA_7B, 8, 32) > 0
        assert m.gpu["kv_cache"] == whole.gpu["kv_cache"]
        assert m.phases["generation"] == copy + group + m.gpu["kv_cache"]
    assert whole.phases["generation"] > tp2.phases["generation"] > tp8.phases["generation"]
    assert "tp8" in format_plan(plan_job({"actor": (LLAMA_7B, TrainSettings(tp_size=8))}, hw, wl))
    with pytest.raises(ValueError, match="must divide gpus_per_node"):
        plan_job({"actor": (LLAMA_7B, TrainSettings(tp_size=4))}, Hardware(gpus_per_node=6), wl)
    with pytest.raises(ValueError, match="supports llama"):
        plan_job({"actor": (ModelSpec(n_layers=2, hidden=64, vocab=100, n_heads=2, arch="gpt2"),
                            TrainSettings(tp_size=2))}, Hardware(gpus_per_node=2), wl)
    with pytest.raises(ValueError, match="does not generate"):
        TrainSettings(role="critic", tp_size=2)


def test_recommend_tries_tp_after_cheap_measures():
    order = planner_mod.MEASURES
    assert order.index("gradient_checkpointing") < order.index("generation_tp2") < order.index("generation_tp4") \
        < order.index("generation_tp8") < order.index("8bit_optimizer") < order.index("lora_actor") \
        < order.index("offload_optimizer")
    small = recommend(_four(1.3e9), Hardware(gpus_per_node=8, gpu_memory_gb=80))
    assert small.settings["actor"].tp_size == 1 and not any(m.startswith("generation_tp") for m in small.measures)
    # a 4-GPU node: only divisors of the node are tried
    pairs = planner_mod._normalize_models(_four(7e9))
    assert planner_mod._tp_options(pairs, Hardware(gpus_per_node=4), Workload()) == (1, 2, 4)
    assert planner_mod._tp_options(pairs, Hardware(gpus_per_node=4), Workload(generate=False)) == (1,)


def test_70b_example_fits_with_tensor_parallel_generation(capsys):
    """The issue's example: `rlhf-ds plan --actor 70B --gpus-per-node 8 --nodes 4 --gpu-memory-gb 80 --recommend`."""
    hw = Hardware(gpus_per_node=8, nodes=4, gpu_memory_gb=80)
    rec = recommend(_four(70e9), hw)
    assert rec.fits and rec.plan.fits and rec.plan.gpu_peak <= 80 * GB
    actor = rec.settings["actor"]
    assert actor.tp_size > 1 and f"generation_tp{actor.tp_size}" in rec.measures
    # the whole copy is what did not fit: the same settings with tp_size 1 overflow
    whole = plan_job({r: (ModelSpec(n_params=70e9), dataclasses.replace(st, tp_size=1))
                      for r, st in rec.settings.items()}, hw)
    assert not whole.fits and whole.gpu_peak_phase == "generation"
    rc, out = _cli(["--actor", "70B", "--gpus-per-node", "8", "--nodes", "4", "--gpu-memory-gb", "80", "--recommend"],
                   capsys)
    assert rc == 0 and out.out.startswith("Fits")
    # the message names the tp_size, offload and LoRA settings it uses
    first = out.out.split("\n\n")[0]
    assert f"hybrid.tp_size {actor.tp_size}" in first and "offload" in first and "LoRA rank 16" in first
    print("\n" + out.out)
    rc, out = _cli(["--actor", "70B", "--gpus-per-node", "8", "--tp-size", "3"], capsys)
    assert rc == 2 and "must divide" in out.err
    rc, out = _cli(["--actor", "7B", "--gpus-per-node", "8", "--tp-size", "2", "--json"], capsys)
    assert rc == 0 and json.loads(out.out)["models"]["actor"]["settings"]["tp_size"] == 2


@pytest.fixture(scope="module")
def tp_bytes(tmp_path_factory):
    """Bytes of the generation copy TensorParallelEngine allocates per rank (ZeRO-3 tiny llama, 2 CPU ranks, tp 2)."""
    for mod in ("deepspeed", "transformers"):
        pytest.importorskip(mod)
    from dist_hybrid_models import tiny_models

    llama = tiny_models(tmp_path_factory)["llama"]
    out = str(tmp_path_factory.mktemp("tp_bytes") / "result.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", RLHF_DS_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--no_local_rank", "--master_port",
           str(_free_port()), os.path.join(REPO, "tests", "dist_tp_bytes.py"), llama, out]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    ranks = []
    for r in range(2):
        with open(f"{out}.{r}", encoding="utf-8") as f:
            ranks.append(json.load(f))
    return llama, ranks


def test_planned_tp_copy_matches_the_live_engine(tp_bytes):
    from rlhf_ds.planner import generation_copy_bytes

    llama, ranks = tp_bytes
    assert [r["tp_group"] for r in ranks] == [[0, 1], [0, 1]]
    spec = ModelSpec.from_pretrained_dir(llama)
    precision = {4: "fp32", 2: "bf16"}[ranks[0]["element_size"]]
    planned = generation_copy_bytes(spec, 2, precision)
    measured = [r["bytes"] for r in ranks]  # parameters + buffers of each rank's copy
    for want, got in zip(planned, measured):
        assert abs(want - got) <= 0.05 * got, (planned, measured)
    # the plan charges every rank the fullest rank's copy
    m = plan_job({"actor": (spec, TrainSettings(precision=precision, tp_size=2))}, Hardware(gpus_per_node=2),
                 Workload()).models["actor"]
    assert abs(m.gpu["gathered_params"] - max(measured)) <= 0.05 * max(measured)
    assert ranks[0]["whole_numel"] == spec.total_params
    print(f"\nTP copy bytes per rank (tp 2): planned {planned}, measured {measured} "
          f"(params {[r['param_bytes'] for r in ranks]} + buffers {[r['buffer_bytes'] for r in ranks]})")


def test_reuse_distance_counts_what_a_trained_forward_keeps_for_its_backward(capsys):
    """ZeRO-3 keeps a gathered parameter that is used again within `zero3_max_reuse_distance` elements, so a trained
    model's forward holds up to that much for its backward (all of a model below it; tests/dist_hybrid_engine.py
    measures it); in step 3 from the scoring forward to the training pass, while the other models score and train."""
    assert DeepSpeedKnobs().max_reuse_distance == EngineConfig().zero3_max_reuse_distance
    big = ModelSpec(n_layers=32, hidden=4096, vocab=32000, n_heads=32, arch="llama")
    small = ModelSpec(n_layers=12, hidden=768, vocab=32000, n_heads=12, arch="llama")
    hw, w = Hardware(gpus_per_node=8), 2
    models = {"actor": (big, TrainSettings(role="actor")), "critic": (small, TrainSettings(role="critic")),
              "reference": (big, TrainSettings(role="reference", trained=False)),
              "reward": (small, TrainSettings(role="reward", trained=False))}
    plan = plan_job(models, hw, Workload())
    held = {role: m.gpu_details.get("zero3_reuse_held", 0) for role, m in plan.models.items()}
    critic_params = plan.models["critic"].n_params
    assert held == {"actor": w * 1_000_000_000, "critic": w * critic_params, "reference": 0, "reward": 0}
    alone = {role: m.phases for role, m in plan.models.items()}
    assert plan.gpu_phase_peaks["experience:reference"] - plan.gpu_resident \
        == alone["reference"]["experience"] + held["actor"] + held["critic"]
    assert plan.gpu_phase_peaks["train:actor"] - plan.gpu_resident == alone["actor"]["train"] + held["critic"]
    assert plan.gpu_phase_peaks["generation"] - plan.gpu_resident == alone["actor"]["generation"]
    smaller = plan_job(models, hw, Workload(), DeepSpeedKnobs(max_reuse_distance=10_000_000))
    assert smaller.models["actor"].gpu_details["zero3_reuse_held"] == w * 10_000_000
    rc, out = _cli(["--actor", "7B", "--json", "--max-reuse-distance", "1e8"], capsys)
    assert rc == 0 and json.loads(out.out)["models"]["actor"]["gpu_details_bytes"]["zero3_reuse_held"] == w * 100_000_000


def test_lora_actor_base_is_the_reference_and_chunked_logits_are_counted(tmp_path, capsys):
    """As `rlhf-ds ppo` runs them: a LoRA actor without --reference has no second copy (its base with the adapters off
    is the reference); log-probs computed in chunks hold one chunk of logits, not the whole micro-batch's."""
    rc, out = _cli(["--actor", "1e9", "--lora-rank", "16", "--json"], capsys)
    assert rc in (0, 1) and "reference" not in json.loads(out.out)["models"]
    rc, out = _cli(["--actor", "1e9", "--lora-rank", "16", "--reference", "1e9", "--json"], capsys)
    assert json.loads(out.out)["models"]["reference"]["n_params"] == 1e9

    from rlhf_ds.planner import logit_bytes

    # 8 x 512 tokens of a 152k vocabulary in bf16: 6.2 GB of logits and fp32 copies at once, 0.93 GB chunked by 512
    assert logit_bytes(8 * 512, 151_936, 2) == 8 * 512 * 151_936 * 6
    assert logit_bytes(8 * 512, 151_936, 2, chunk=512) == 512 * 151_936 * 10
    assert logit_bytes(8 * 512, 1, 2, chunk=512) == 8 * 512 * 6  # a value head's width-1 output is not chunked
    _save_config(tmp_path, "gpt2")
    phases = {}
    for chunk in (0, 64):
        rc, out = _cli(["--actor", str(tmp_path), "--micro-batch", "8", "--logit-chunk-tokens", str(chunk), "--json"],
                       capsys)
        phases[chunk] = json.loads(out.out)["models"]["actor"]["phase_gpu_bytes"]
    assert all(phases[64][k] <= phases[0][k] for k in phases[0])
    assert any(phases[64][k] < phases[0][k] for k in phases[0])
