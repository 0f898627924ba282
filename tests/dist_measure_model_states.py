"""Measure the bytes a DeepSpeed engine really holds per rank, by category.

Launched by tests/test_planner.py as::

    deepspeed --num_gpus 2 tests/dist_measure_model_states.py --out result.json \
        --configs '[{"stage": 0, "lora": false, "precision": "fp32"}, ...]'

Config keys: ``stage`` (0-3), ``lora`` (peft LoRA r=8 on ``c_attn``, fan_in_fan_out), ``precision``
(fp32/bf16), ``offload`` (optimizer offload to CPU), ``optimizer`` ("adamw" or "adamw_8bit", the
latter built with ``rlhf_ds.engine.optimizers.build_optimizer``), ``param_persistence_threshold``
(ZeRO-3, default 0 so that only partitions remain).  Bucket sizes default to 1e5 elements.

Every configuration is run inside the same launch (one engine after the other) to
keep the test fast.  For each one a tiny GPT-2 (built from a config, no download) is
wrapped by ``deepspeed.initialize`` with a client ``torch.optim.AdamW`` holding only
the trainable parameters, one micro-batch is run and the tensors the engine holds are
counted, de-duplicated by storage (a flat buffer and the views into it count once):

* after ``engine.backward``: gradients (``param.grad``/``grad_accum``; ZeRO-1/2
  ``averaged_gradients``; ZeRO-3 ``grad_partitions_flat_buffer``) and the
  communication buckets (``ipg_buckets``);
* after ``engine.step``: parameters (module ``param.data``; ZeRO-1/2 ``bit16_groups_flat``;
  ZeRO-3 ``param.ds_tensor`` partitions and any still-gathered ``param.data``), the fp32
  master partition (ZeRO-1/2 ``single_partition_of_fp32_groups``; ZeRO-3
  ``fp32_partitioned_groups_flat``; fp16/bf16 ZeRO-0 ``fp32_groups_flat``) when it is a
  separate storage from the parameters, and the inner optimizer's ``state`` tensors.

Anything else tensor-valued reachable from the ZeRO optimizer object is summed into
``other`` so that nothing is silently missed.  Rank 0 writes JSON to ``--out``.
"""

import argparse
import json
import os
import sys
import time

import torch


def _storage_key(t):
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr(), s.nbytes())


class StorageCounter:
    """Sums storage bytes per category; a storage is counted in the first category that sees it."""

    def __init__(self):
        self.seen = {}
        self.bytes = {}

    def add(self, category, tensor):
        if tensor is None or not torch.is_tensor(tensor) or tensor.device.type == "meta":
            return
        key = _storage_key(tensor)
        if key[2] == 0 or key in self.seen:
            return
        self.seen[key] = category
        self.bytes[category] = self.bytes.get(category, 0) + key[2]

    def add_all(self, category, obj, depth=0):
        """Add every tensor inside (nested) lists/tuples/dicts/objects with a flat_partition."""
        if depth > 6 or obj is None:
            return
        if torch.is_tensor(obj):
            self.add(category, obj)
            flat = getattr(obj, "flat_partition", None)
            if flat is not None:
                self.add(category, flat)
            return
        flat = getattr(obj, "flat_partition", None)
        if flat is not None:
            self.add(category, flat)
        if isinstance(obj, dict):
            for v in obj.values():
                self.add_all(category, v, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                self.add_all(category, v, depth + 1)


def _walk_other(counter, obj, path="optimizer", depth=0, visited=None, details=None):
    """Count tensors reachable from ``obj`` attributes that no category claimed yet."""
    if visited is None:
        visited = set()
    if depth > 6 or id(obj) in visited:
        return
    visited.add(id(obj))
    if torch.is_tensor(obj):
        before = counter.bytes.get("other", 0)
        counter.add("other", obj)
        grown = counter.bytes.get("other", 0) - before
        if grown and details is not None:
            details[path] = details.get(path, 0) + grown
        return
    if isinstance(obj, dict):
        items = [(f"{path}[{k!r}]" if isinstance(k, (str, int)) else f"{path}[.]", v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple, set)):
        items = [(f"{path}[]", v) for v in obj]
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("deepspeed", "torch.optim")):
        items = [(f"{path}.{k}", v) for k, v in vars(obj).items() if k not in ("module", "_modules")]
    else:
        return
    for sub_path, v in items:
        _walk_other(counter, v, sub_path, depth + 1, visited, details)


def build_model(lora, lora_rank):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                 target_modules=["c_attn"], fan_in_fan_out=True))
    return model


def measure(conf, world_size):
    import deepspeed

    stage = int(conf["stage"])
    precision = conf.get("precision", "fp32")
    torch.manual_seed(0)
    model = build_model(conf.get("lora", False), int(conf.get("lora_rank", 8)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in trainable)
    zero = {
        "stage": stage,
        "reduce_bucket_size": int(conf.get("reduce_bucket_size", 100_000)),
        "allgather_bucket_size": int(conf.get("allgather_bucket_size", 100_000)),
    }
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = int(conf.get("param_persistence_threshold", 0))
        zero["stage3_prefetch_bucket_size"] = int(conf.get("prefetch_bucket_size", 100_000))
    if conf.get("offload"):
        zero["offload_optimizer"] = {"device": "cpu"}
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "bf16": {"enabled": precision == "bf16"},
    }
    name = conf.get("optimizer", "adamw")
    if name == "adamw":
        # plain torch AdamW also under offload (DeepSpeedCPUAdam would need a 2-minute JIT build)
        opt = torch.optim.AdamW(trainable, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
        if conf.get("offload"):
            ds_config["zero_force_ds_cpu_optimizer"] = False
    else:
        from rlhf_ds.engine.optimizers import build_optimizer, ds_config_overrides

        ds_config.update(ds_config_overrides(name, stage, offload=bool(conf.get("offload"))))
        opt = build_optimizer(trainable, name=name, lr=1e-3, ds_config=ds_config)
    engine, zopt, _, _ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=trainable,
                                              config=ds_config)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, 512, (2, 32), generator=g)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)

    # ---- after backward: gradients and buckets
    after_bwd = StorageCounter()
    params = list(engine.module.parameters())
    for p in params:  # parameters first so that views of them are never counted as grads
        after_bwd.add("weights", p.data)
        after_bwd.add("weights", getattr(p, "ds_tensor", None))
    for p in params:
        after_bwd.add("gradients", p.grad)
        after_bwd.add("gradients", getattr(p, "grad_accum", None))
    if hasattr(zopt, "averaged_gradients"):
        after_bwd.add_all("gradients", zopt.averaged_gradients)
    for name in ("grad_partitions_flat_buffer", "all_grad_tensors", "grads_in_partition"):
        after_bwd.add_all("gradients", getattr(zopt, name, None))
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # offload: fp32 grad buffers
        for t in getattr(zopt, name, None) or []:
            after_bwd.add("gradients", getattr(t, "grad", None))
    after_bwd.add_all("buffers", getattr(zopt, "param_buffer_of_bit16_for_cpu_offload_groups", None))
    for bucket in getattr(zopt, "ipg_buckets", {}).values():
        after_bwd.add_all("buffers", getattr(bucket, "buffer", None))

    engine.step()

    # ---- after step: parameters, master copy, optimizer states
    after_step = StorageCounter()
    for p in params:
        after_step.add("weights", p.data)
        after_step.add("weights", getattr(p, "ds_tensor", None))
    for name in ("bit16_groups_flat", "lp_param_buffer", "fp16_partitioned_groups_flat"):
        after_step.add_all("weights", getattr(zopt, name, None))
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat",
                 "fp32_groups"):
        after_step.add_all("master_weights", getattr(zopt, name, None))
    inner = getattr(zopt, "optimizer", zopt)
    for state in inner.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.dim() > 0:
                after_step.add("moments", v)
    for p in params:
        after_step.add("gradients_left_after_step", p.grad)
    after_step.add_all("gradients_left_after_step", getattr(zopt, "grad_partitions_flat_buffer", None))
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        for t in getattr(zopt, name, None) or []:
            after_step.add("gradients_left_after_step", getattr(t, "grad", None))
    after_step.add_all("buffers", getattr(zopt, "param_buffer_of_bit16_for_cpu_offload_groups", None))
    for bucket in getattr(zopt, "ipg_buckets", {}).values():
        after_step.add_all("buffers", getattr(bucket, "buffer", None))
    other_details = {}
    if zopt is not inner:
        _walk_other(after_step, zopt, details=other_details)

    result = {
        "config": conf,
        "world_size": world_size,
        "n_params": n_total,
        "n_trainable": n_trainable,
        "optimizer_class": type(zopt).__name__,
        "weights": after_step.bytes.get("weights", 0),
        "gradients": after_bwd.bytes.get("gradients", 0),
        "master_weights": after_step.bytes.get("master_weights", 0),
        "moments": after_step.bytes.get("moments", 0),
        "buffers_after_backward": after_bwd.bytes.get("buffers", 0),
        "buffers_after_step": after_step.bytes.get("buffers", 0),
        "gradients_left_after_step": after_step.bytes.get("gradients_left_after_step", 0),
        "other_after_step": after_step.bytes.get("other", 0),
        "other_details": other_details,
        "loss": float(loss),
    }
    result["optimizer_states"] = result["master_weights"] + result["moments"]
    engine.destroy() if hasattr(engine, "destroy") else None
    del engine, zopt, opt, model
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--configs", required=True, help="JSON list of configurations (see module docstring)")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = parser.parse_args()

    import deepspeed
    import torch.distributed as dist

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    world = dist.get_world_size()
    results = []
    for conf in json.loads(args.configs):
        t0 = time.perf_counter()
        res = measure(conf, world)
        dist.barrier()
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results.append(res)
    # gather every rank's numbers so the test can check them all
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"ranks": gathered}, f, indent=1)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
