"""Client optimizers to hand to ``deepspeed.initialize(optimizer=...)``.

``build_optimizer(params, name="adamw" | "adamw_8bit", ...)``:

* ``"adamw"`` -> ``torch.optim.AdamW``; with ``offload=True`` DeepSpeed's ``DeepSpeedCPUAdam``
  (a C++ op JIT-compiled on first use: needs a C++ compiler and ninja, ~2 minutes once,
  then cached under ``~/.cache/torch_extensions``).  If that op cannot be built or loaded
  we fall back to ``torch.optim.AdamW`` with a warning.
* ``"adamw_8bit"`` -> ``bitsandbytes.optim.AdamW8bit`` (2 bytes/param of states instead of 8).
  Raises ``RuntimeError`` naming the fix when bitsandbytes is missing or unusable here.

DeepSpeed accepts a non-DeepSpeed optimizer under ZeRO 1-3 only with
``"zero_allow_untested_optimizer": true`` and under ZeRO-Offload only with
``"zero_force_ds_cpu_optimizer": false``.  Pass ``ds_config`` to have that checked here
(with a clear error instead of DeepSpeed's assertion), or merge
``ds_config_overrides(...)`` into your config.  bitsandbytes AdamW8bit was checked to
train (loss decreasing, uint8 states on the flat fp32 partition) as a client optimizer
with deepspeed 0.19.8 under ZeRO 0, 1, 2, 3 and ZeRO-2/3 + optimizer offload
(2 CPU ranks, gloo).
"""

from __future__ import annotations

import logging
import shutil
import warnings
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

OPTIMIZER_NAMES = ("adamw", "adamw_8bit")
_ALIASES = {"adamw8bit": "adamw_8bit", "adamw-8bit": "adamw_8bit", "adam8bit": "adamw_8bit",
            "adamw_torch": "adamw"}

_BNB_FIX = ("pip install bitsandbytes  (or: pip install 'rlhf_ds[8bit]'); on an unsupported platform "
            "use --optimizer adamw instead")


def normalize_optimizer_name(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZER_NAMES}")
    return key


def _zero_stage(ds_config: Optional[Dict[str, Any]]) -> int:
    if not ds_config:
        return 0
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0) or 0)


def _offloads_optimizer(ds_config: Optional[Dict[str, Any]]) -> bool:
    if not ds_config:
        return False
    off = (ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return str(off.get("device", "none")).lower() in ("cpu", "nvme")


def ds_config_overrides(name: str, zero_stage: int, offload: bool = False,
                        optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
    """DeepSpeed config keys a client optimizer of kind ``name`` needs for ``zero_stage``/``offload``."""
    name = normalize_optimizer_name(name)
    out: Dict[str, Any] = {}
    if name == "adamw_8bit" and zero_stage >= 1:
        out["zero_allow_untested_optimizer"] = True
    if offload and not _is_ds_cpu_adam(optimizer):
        out["zero_force_ds_cpu_optimizer"] = False
    return out


def _is_ds_cpu_adam(optimizer) -> bool:
    if optimizer is None:
        return False
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception:  # pragma: no cover - deepspeed missing
        return False
    return isinstance(optimizer, DeepSpeedCPUAdam)


def check_ds_config(name: str, ds_config: Dict[str, Any], optimizer=None) -> None:
    """Raise ``RuntimeError`` when DeepSpeed would reject this client optimizer with ``ds_config``."""
    name = normalize_optimizer_name(name)
    stage = _zero_stage(ds_config)
    if name == "adamw_8bit" and stage >= 1 and not ds_config.get("zero_allow_untested_optimizer", False):
        raise RuntimeError(
            f"DeepSpeed ZeRO stage {stage} rejects bitsandbytes AdamW8bit as an untested ZeRO optimizer. "
            'Add "zero_allow_untested_optimizer": true to the DeepSpeed config (AdamW8bit then trains '
            "under ZeRO 1/2/3; checked with deepspeed 0.19.8), or use ZeRO stage 0, or optimizer 'adamw'.")
    if _offloads_optimizer(ds_config) and not _is_ds_cpu_adam(optimizer) \
            and ds_config.get("zero_force_ds_cpu_optimizer", True):
        kind = type(optimizer).__name__ if optimizer is not None else name
        raise RuntimeError(
            f"DeepSpeed ZeRO-Offload rejects the client optimizer {kind} (it insists on DeepSpeedCPUAdam). "
            'Add "zero_force_ds_cpu_optimizer": false to the DeepSpeed config, or build the optimizer with '
            "offload=True so DeepSpeedCPUAdam is used when it can be compiled.")


def cpu_adam_status() -> Tuple[bool, str]:
    """(usable?, reason) for DeepSpeed's CPU Adam op, without compiling it."""
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder
    except Exception as e:  # pragma: no cover - deepspeed missing
        return False, f"deepspeed op builder not importable: {e}"
    try:
        builder = CPUAdamBuilder()
        if not builder.is_compatible(verbose=False):
            return False, "CPUAdamBuilder reports this system incompatible"
    except Exception as e:
        return False, f"CPUAdamBuilder check failed: {e}"
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return False, "no C++ compiler on PATH to JIT-build the cpu_adam op"
    return True, "compatible (built on first use, then cached)"


def _param_list(params) -> list:
    params = list(params)
    if params and isinstance(params[0], dict):
        return params
    trainable = [p for p in params if getattr(p, "requires_grad", True)]
    if not trainable:
        raise ValueError("build_optimizer got no trainable parameters")
    return trainable


def _build_cpu_adam(params, lr, weight_decay, betas, eps):
    ok, reason = cpu_adam_status()
    if not ok:
        raise RuntimeError(reason)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adamw_mode=True)


def _import_bnb():
    try:
        import bitsandbytes as bnb  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"optimizer 'adamw_8bit' needs bitsandbytes, which is not installed ({e}). "
                           f"Fix: {_BNB_FIX}") from e
    except Exception as e:  # bitsandbytes present but broken (missing native library, ...)
        raise RuntimeError(f"bitsandbytes is installed but unusable on this platform: {type(e).__name__}: {e}. "
                           f"Fix: {_BNB_FIX}") from e
    return bnb


_BNB_PROBED: Dict[str, Optional[str]] = {}


def _probe_bnb(bnb, device: torch.device) -> None:
    """One tiny 8-bit step on ``device`` so that an unsupported backend fails here, clearly."""
    key = str(device)
    if key not in _BNB_PROBED:
        try:
            p = torch.nn.Parameter(torch.zeros(4096, device=device))
            opt = bnb.optim.AdamW8bit([p], lr=1e-3)
            p.grad = torch.ones_like(p)
            opt.step()
            _BNB_PROBED[key] = None
        except Exception as e:
            _BNB_PROBED[key] = f"{type(e).__name__}: {e}"
    if _BNB_PROBED[key] is not None:
        raise RuntimeError(f"bitsandbytes 8-bit AdamW does not run on device {key}: {_BNB_PROBED[key]}. "
                           f"Fix: {_BNB_FIX}")


def _first_device(params) -> torch.device:
    for p in params:
        if isinstance(p, dict):
            for q in p["params"]:
                return q.device
        else:
            return p.device
    return torch.device("cpu")


def build_optimizer(params: Iterable, name: str = "adamw", lr: float = 1e-5, weight_decay: float = 0.0,
                    betas: Tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, offload: bool = False,
                    ds_config: Optional[Dict[str, Any]] = None) -> torch.optim.Optimizer:
    """Build the client optimizer for ``deepspeed.initialize(optimizer=...)``.

    ``params``: tensors (frozen ones are dropped) or param-group dicts.  ``offload``: the
    DeepSpeed config offloads optimizer states to CPU (picks DeepSpeedCPUAdam for "adamw").
    ``ds_config``: if given, checked for the keys DeepSpeed needs to accept this optimizer
    (see ``check_ds_config``); ``offload`` is then also read from it.
    """
    name = normalize_optimizer_name(name)
    params = _param_list(params)
    offload = bool(offload or _offloads_optimizer(ds_config))
    betas = (float(betas[0]), float(betas[1]))
    if name == "adamw":
        opt = None
        if offload:
            try:
                opt = _build_cpu_adam(params, lr, weight_decay, betas, eps)
            except Exception as e:
                msg = (f"DeepSpeedCPUAdam unavailable ({e}); falling back to torch.optim.AdamW for the offloaded "
                       'optimizer (slower). DeepSpeed then needs "zero_force_ds_cpu_optimizer": false.')
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                logger.warning(msg)
        if opt is None:
            opt = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    else:
        bnb = _import_bnb()
        device = torch.device("cpu") if offload else _first_device(params)
        _probe_bnb(bnb, device)
        opt = bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if ds_config is not None:
        check_ds_config(name, ds_config, opt)
    return opt
