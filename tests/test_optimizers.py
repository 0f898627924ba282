"""Tests for rlhf_ds.engine.optimizers (fast, single process).

The 8-bit optimizer inside real DeepSpeed engines (ZeRO 0/2/3, 2 ranks) is exercised by
tests/test_planner.py::test_planner_matches_measured_deepspeed, which builds it with
``build_optimizer(..., ds_config=...)``.
"""

import builtins
import glob
import importlib.util
import os
import sys

import pytest
import torch

from rlhf_ds.engine import optimizers as opt_mod
from rlhf_ds.engine.optimizers import (build_optimizer, check_ds_config, cpu_adam_status, ds_config_overrides,
                                       normalize_optimizer_name)

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _params(n=3, size=64):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(size, size)) for _ in range(n)]


def test_adamw_defaults_and_hyperparameters():
    ps = _params()
    opt = build_optimizer(ps, lr=3e-4, weight_decay=0.1)
    assert type(opt) is torch.optim.AdamW
    g = opt.param_groups[0]
    assert g["lr"] == 3e-4 and g["weight_decay"] == 0.1 and g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8


def test_frozen_params_are_dropped_and_groups_pass_through():
    ps = _params()
    ps[1].requires_grad_(False)
    opt = build_optimizer(ps)
    assert len(opt.param_groups[0]["params"]) == 2
    groups = [{"params": ps[:1], "weight_decay": 0.0}, {"params": ps[2:], "weight_decay": 0.1}]
    opt = build_optimizer(groups, weight_decay=0.5)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.1]
    with pytest.raises(ValueError):
        build_optimizer([p.requires_grad_(False) for p in _params()])


def test_names():
    assert normalize_optimizer_name("AdamW") == "adamw"
    assert normalize_optimizer_name("adamw8bit") == "adamw_8bit"
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(_params(), name="sgd")


def test_cpu_adam_status_reports_without_building():
    ok, reason = cpu_adam_status()
    assert isinstance(ok, bool) and reason


def _cpu_adam_cached():
    try:
        from torch.utils.cpp_extension import _get_build_directory

        d = _get_build_directory("cpu_adam", verbose=False)
    except Exception:
        return False
    return bool(glob.glob(os.path.join(d, "cpu_adam*.so")))


@pytest.mark.skipif(not _cpu_adam_cached(), reason="DeepSpeed cpu_adam op not built yet (first build takes minutes)")
def test_offload_uses_deepspeed_cpu_adam_when_available():
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    ps = _params()
    opt = build_optimizer(ps, offload=True, lr=1e-3)
    assert isinstance(opt, DeepSpeedCPUAdam)
    for p in ps:
        p.grad = torch.ones_like(p)
    before = ps[0].detach().clone()
    opt.step()
    assert not torch.equal(before, ps[0].detach())
    # DeepSpeed needs no extra config key for its own CPU Adam under offload
    assert ds_config_overrides("adamw", 2, offload=True, optimizer=opt) == {}


def test_offload_falls_back_to_torch_adamw_with_a_clear_warning(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no C++ compiler on PATH to JIT-build the cpu_adam op")

    monkeypatch.setattr(opt_mod, "_build_cpu_adam", broken)
    with pytest.warns(RuntimeWarning, match="DeepSpeedCPUAdam unavailable.*zero_force_ds_cpu_optimizer"):
        opt = build_optimizer(_params(), offload=True)
    assert type(opt) is torch.optim.AdamW


def test_8bit_without_bitsandbytes_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import -> ImportError
    with pytest.raises(RuntimeError, match="pip install bitsandbytes"):
        build_optimizer(_params(), name="adamw_8bit")


def test_8bit_with_broken_bitsandbytes_says_unusable(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "bitsandbytes":
            raise OSError("libbitsandbytes_cuda.so: cannot open shared object file")
        return real_import(name, *a, **k)

    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(RuntimeError, match="unusable on this platform.*pip install bitsandbytes"):
        build_optimizer(_params(), name="adamw_8bit")


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_8bit_builds_steps_and_keeps_two_bytes_per_param():
    import bitsandbytes as bnb

    p = torch.nn.Parameter(torch.randn(1 << 16))
    opt = build_optimizer([p], name="adamw_8bit", lr=1e-2, betas=(0.9, 0.999))
    assert isinstance(opt, bnb.optim.AdamW8bit)
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    opt.step()
    assert (p.detach() < before).all()
    st = opt.state[p]
    assert st["state1"].dtype == torch.uint8 and st["state2"].dtype == torch.uint8
    moment_bytes = sum(v.numel() * v.element_size() for k, v in st.items()
                       if torch.is_tensor(v) and k.startswith(("state", "absmax")))
    assert 2.0 <= moment_bytes / p.numel() <= 2.05  # 2 B/param + per-256-block fp32 scales


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_8bit_unsupported_device_raises(monkeypatch):
    import bitsandbytes as bnb

    class Boom:
        def __init__(self, *a, **k):
            raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(opt_mod, "_BNB_PROBED", {})
    monkeypatch.setattr(bnb.optim, "AdamW8bit", Boom)
    with pytest.raises(RuntimeError, match="does not run on device cpu"):
        build_optimizer(_params(), name="adamw_8bit")


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_reject_8bit_without_the_config_key(stage):
    cfg = {"zero_optimization": {"stage": stage}}
    with pytest.raises(RuntimeError, match=f"ZeRO stage {stage}.*zero_allow_untested_optimizer"):
        build_optimizer(_params(), name="adamw_8bit", ds_config=cfg)
    cfg.update(ds_config_overrides("adamw_8bit", stage))
    assert cfg["zero_allow_untested_optimizer"] is True
    build_optimizer(_params(), name="adamw_8bit", ds_config=cfg)  # accepted now


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_zero0_accepts_8bit_and_offload_needs_force_flag():
    build_optimizer(_params(), name="adamw_8bit", ds_config={"zero_optimization": {"stage": 0}})
    cfg = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
           "zero_allow_untested_optimizer": True}
    with pytest.raises(RuntimeError, match="zero_force_ds_cpu_optimizer"):
        build_optimizer(_params(), name="adamw_8bit", ds_config=cfg)
    cfg.update(ds_config_overrides("adamw_8bit", 2, offload=True))
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    build_optimizer(_params(), name="adamw_8bit", ds_config=cfg)


def test_check_ds_config_for_torch_adamw_under_offload():
    opt = torch.optim.AdamW(_params())
    cfg = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(RuntimeError, match="zero_force_ds_cpu_optimizer"):
        check_ds_config("adamw", cfg, opt)
    check_ds_config("adamw", {**cfg, "zero_force_ds_cpu_optimizer": False}, opt)
    check_ds_config("adamw", {"zero_optimization": {"stage": 3}}, opt)  # torch AdamW is a "tested" optimizer
