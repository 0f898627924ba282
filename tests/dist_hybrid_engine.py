"""The hybrid engine under ZeRO-3 on 2 CPU ranks, checked against plain single-process Hugging Face models.

    deepspeed --num_gpus 2 --no_local_rank tests/dist_hybrid_engine.py <models root> <out.json>

`<models root>` is what `dist_hybrid_models.build_tiny_models` wrote. Rank 0 writes one JSON object of figures (per-rank
lists where ranks differ); tests/test_hybrid_engine.py asserts on them. Sections:
  greedy       hybrid greedy tokens vs `from_pretrained` of the same folder, no DeepSpeed (same process, same threads)
  state        gathered parameters, local shards, optimizer state (fp32 partitions + Adam moments), step count and a
               training forward: bit-identical before and after generation
  trained      after optimizer steps: hybrid greedy vs an unsharded model loaded with the gathered weights
  flat         the flat shard all-gather the engine uses for plain ZeRO-3 vs DeepSpeed's GatheredParameters: same copy
  group        gather_group_size 1 vs all tensors at once: same generation copy (bitwise) and same tokens
  ragged       different prompts, batch sizes and max_new_tokens per rank, sampling, a training step after each rollout
  trace        a scoring forward then a training pass, as in PPO: ZeRO-3's recorded module order stays whole
  ema          ShardedEMA shards vs the EMA computed on gathered weights; training state bit-identical after swapped_in()
  lora         peft LoRA on the ZeRO-3 actor (adapters trained one step): fused generation vs peft merge_and_unload()
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlhf_ds.config import EngineConfig, GenerationConfig, LoraConfig  # noqa: E402
from rlhf_ds.data.builtin_task import BuiltinTask  # noqa: E402
from rlhf_ds.data.features import collate_sft, pad_batch, sft_features  # noqa: E402
from rlhf_ds.data.formats import SFTExample  # noqa: E402
from rlhf_ds.engine import strategy  # noqa: E402
from rlhf_ds.engine.ema import ShardedEMA  # noqa: E402
from rlhf_ds.engine.params import _shard_layout, full_state_dict  # noqa: E402
from rlhf_ds.models.loading import apply_lora, load_causal_lm, load_tokenizer  # noqa: E402
from rlhf_ds.models.unsharded import build_plain, copy_into  # noqa: E402
from rlhf_ds.rl.experience import sequence_logprobs  # noqa: E402
from rlhf_ds.rollout.hybrid import HybridEngine  # noqa: E402

NEW_TOKENS = 16



def synced_generate(engine, ids, mask, gen):
    """The rollout protocol's two calls: the actor's current weights into the engine (collective), then decoding."""
    engine.sync_weights()
    return engine.generate(ids, mask, gen)

def engine_config() -> EngineConfig:
    return EngineConfig(zero_stage=3, lr=1e-2, warmup_ratio=0.0, lr_schedule="constant")


def build_actor(path: str, tok, lora: bool = False):
    eng = engine_config()
    ds = strategy.ds_config_for(eng, micro_batch_size=4)
    model = load_causal_lm(path, ds, disable_dropout=True, tokenizer=tok)
    if lora:
        model = apply_lora(model, LoraConfig(enabled=True, rank=4, alpha=8.0))
        g = torch.Generator().manual_seed(7)  # the same non-zero adapters on every rank (peft starts B at 0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return strategy.init_trainable(model, eng, ds, total_steps=100)


def prompt_ids(tok, texts: list[str]) -> list[list[int]]:
    return [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def plain_generate(model, ids, mask, tok, **kwargs) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, use_cache=True, **kwargs)


def train_step(actor, batch) -> float:
    out = actor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    actor.backward(out.loss)
    actor.step()
    return out.loss.item()


@torch.no_grad()
def train_forward_loss(actor, batch) -> torch.Tensor:
    return actor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def snapshot(actor) -> dict:
    """Everything generation must leave untouched: full weights, this rank's shards, optimizer state, step counters."""
    module = strategy.unwrap(actor)
    opt = actor.optimizer
    inner = getattr(opt, "optimizer", opt)
    moments = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()} for state in inner.state.values()]
    return {
        "full": full_state_dict(module, to_rank0_only=False),
        "shards": [p.ds_tensor.detach().clone() for p in module.parameters()],
        "fp32": [t.detach().clone() for t in getattr(opt, "fp32_partitioned_groups_flat", [])],
        "moments": moments,
        "steps": (actor.global_steps, actor.global_samples),
        "lr": [g["lr"] for g in inner.param_groups],
    }


def same_state(a: dict, b: dict) -> dict:
    def eq(x, y):
        if torch.is_tensor(x):
            return torch.equal(x, y)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        return x == y

    return {k: eq(a[k], b[k]) for k in a} | {"n_moments": sum(len(m) for m in a["moments"]), "n_fp32": len(a["fp32"])}


def param_status(actor) -> list[str]:
    return [p.ds_status.name for p in strategy.unwrap(actor).parameters()]


def all_partitioned(actor) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return all(hasattr(p, "ds_id") and p.ds_status == ZeroParamStatus.NOT_AVAILABLE
               for p in strategy.unwrap(actor).parameters())


def gathered_fraction(engine) -> float:
    """The share of the partitioned parameter elements now gathered (those ZeRO-3 keeps whole are left out)."""
    params = [p for p in strategy.unwrap(engine).parameters() if not p.ds_persist]
    return sum(p.ds_numel for p in params if p.ds_status.name != "NOT_AVAILABLE") / sum(p.ds_numel for p in params)


def plain_from(path: str, full: dict | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if full is not None:
        missing, unexpected = model.load_state_dict(full, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        model.tie_weights()
    return model


def main() -> None:
    root, out_path = sys.argv[1], sys.argv[2]
    strategy.setup_distributed(timeout_minutes=5)
    r, world = dist.get_rank(), dist.get_world_size()
    gpt2 = os.path.join(root, "gpt2")
    tok = load_tokenizer(gpt2)
    res: dict = {"world": world, "threads": torch.get_num_threads()}
    task = BuiltinTask(0)
    texts = [row["prompt"] for row in task.ppo_prompts(24)]
    feats, _ = sft_features([SFTExample(prompt=x["prompt"], response=x["response"]) for x in task.sft_rows(16)], tok, 24, 48)
    batches = [collate_sft(feats[i : i + 4], tok.pad_token_id) for i in range(0, 16, 4)]
    ids, mask = pad_batch(prompt_ids(tok, texts[:8]), tok.pad_token_id, side="left")  # the same prompts on both ranks

    # ---- greedy: hybrid vs unsharded from_pretrained of the same folder
    actor = build_actor(gpt2, tok)
    res["partitioned_at_start"] = all_partitioned(actor)
    hybrid = HybridEngine(actor, tok.pad_token_id, tok.eos_token_id)
    out = synced_generate(hybrid, ids, mask, GenerationConfig(NEW_TOKENS, do_sample=False))
    ref = plain_generate(plain_from(gpt2), ids, mask, tok, do_sample=False)
    res["greedy_equal"] = torch.equal(out.sequences, ref)
    res["greedy_shape"] = list(out.sequences.shape)
    res["greedy_has_eos"] = bool((out.sequences[:, ids.shape[1]:] == tok.eos_token_id).any())

    # ---- state: train two steps (optimizer state exists), then generation must not touch anything
    for b in batches[:2]:
        train_step(actor, b)
    before = snapshot(actor)
    loss_before = train_forward_loss(actor, batches[2])
    status_before = param_status(actor)
    torch.manual_seed(100 + r)
    synced_generate(hybrid, ids, mask, GenerationConfig(NEW_TOKENS, do_sample=True, temperature=0.8))
    res["param_status_before"] = sorted(set(status_before))
    res["param_status_unchanged"] = status_before == param_status(actor)
    after = snapshot(actor)
    res["state_after_generate"] = same_state(before, after)
    res["train_forward_equal"] = torch.equal(loss_before, train_forward_loss(actor, batches[2]))

    # ---- trained weights: hybrid greedy vs an unsharded model holding the gathered weights
    out = synced_generate(hybrid, ids, mask, GenerationConfig(NEW_TOKENS, do_sample=False))
    ref_model = plain_from(gpt2, before["full"])
    res["trained_greedy_equal"] = torch.equal(out.sequences, plain_generate(ref_model, ids, mask, tok, do_sample=False))
    res["trained_weights_equal"] = all(torch.equal(t, hybrid._plain.state_dict()[n]) for n, t in before["full"].items())

    # ---- the flat shard all-gather (plain ZeRO-3) vs DeepSpeed's GatheredParameters path (`copy_into`)
    module = strategy.unwrap(actor)
    res["flat_gather_used"] = _shard_layout(module) is not None
    via_ds = build_plain(module, "cpu", torch.float32)
    copy_into(module, via_ds, flat=False)
    res["flat_equals_gathered_parameters"] = all(torch.equal(v, hybrid._plain.state_dict()[k])
                                                 for k, v in via_ds.state_dict().items())

    # ---- gather_group_size 1 vs every tensor in one group
    n_params = len(list(strategy.unwrap(actor).parameters()))
    copies, seqs = [], []
    for g in (1, n_params):
        h = HybridEngine(actor, tok.pad_token_id, tok.eos_token_id, gather_group_size=g, keep_copy=True)
        seqs.append(synced_generate(h, ids, mask, GenerationConfig(NEW_TOKENS, do_sample=False)).sequences)
        copies.append({k: v.clone() for k, v in h._plain.state_dict().items()})
    res["group_sizes"] = [1, n_params]
    res["group_tokens_equal"] = torch.equal(*seqs)
    res["group_copy_equal"] = copies[0].keys() == copies[1].keys() and all(torch.equal(copies[0][k], copies[1][k]) for k in copies[0])

    # ---- ragged ranks: other prompts, batch sizes and lengths per rank, sampling; a collective step after each
    widths, lengths = [], []
    t0 = time.time()
    for rnd in range(3):
        mine = texts[8 + 5 * r + rnd : 8 + 5 * r + rnd + 3 + 2 * r]
        pid, pmask = pad_batch(prompt_ids(tok, mine), tok.pad_token_id, side="left")
        torch.manual_seed(1000 * rnd + r)
        o = synced_generate(hybrid, pid, pmask, GenerationConfig(6 + 14 * r, do_sample=True, temperature=1.0))
        resp = o.sequences[:, o.prompt_len:]
        widths.append(int(o.sequences.shape[1]))
        lengths.append([int(x) for x in ((resp != tok.pad_token_id).sum(1))])
        seq = o.sequences[:4]
        attn = (seq != tok.pad_token_id).long()
        train_step(actor, {"input_ids": seq, "attention_mask": attn, "labels": seq.masked_fill(attn == 0, -100)})
    res["ragged_seconds"] = time.time() - t0
    res["ragged_widths"] = widths
    res["ragged_lengths"] = lengths

    # ---- PPO's pattern on the trained engine: a no-grad scoring forward, then a training pass, three times. After
    # forward_only_pass_done, ZeRO-3's recorded module order covers the training pass, so the backward prefetches and
    # reuses what the forward gathered. What a forward keeps gathered for that reuse (zero3_max_reuse_distance
    # elements; all of a small model) stays so from the scoring forward to the training backward, which releases it.
    fresh = build_actor(gpt2, tok)  # a new engine has recorded no order yet, as at the start of a PPO run
    fresh_hybrid = HybridEngine(fresh, tok.pad_token_id, tok.eos_token_id)
    coordinator = fresh.optimizer.parameter_offload.get_param_coordinator()
    res["trace_complete"], res["trace_gathered_after_scoring"], res["trace_gathered_after_training"] = [], [], []
    for _ in range(3):
        o = synced_generate(fresh_hybrid, ids[:4], mask[:4], GenerationConfig(NEW_TOKENS, do_sample=False))
        attn = torch.cat([mask[:4], (o.sequences[:, o.prompt_len:] != tok.pad_token_id).long()], dim=1)
        with torch.no_grad():
            sequence_logprobs(fresh, o.sequences, attn, o.prompt_len, 1.0)
        strategy.forward_only_pass_done(fresh)
        res["trace_gathered_after_scoring"].append(gathered_fraction(fresh))
        train_step(fresh, {"input_ids": o.sequences, "attention_mask": attn,
                           "labels": o.sequences.masked_fill(attn == 0, -100)})
        res["trace_complete"].append(coordinator.is_complete_trace())
        res["trace_gathered_after_training"].append(gathered_fraction(fresh))
    del fresh, fresh_hybrid

    # ---- EMA: shards vs the EMA of gathered weights; swapped_in() restores training state exactly
    ema = ShardedEMA(strategy.unwrap(actor), decay=0.5)
    expected = {k: v.float().clone() for k, v in full_state_dict(strategy.unwrap(actor), to_rank0_only=False).items()}
    for b in batches[:2]:
        train_step(actor, b)
        ema.update()
        now = full_state_dict(strategy.unwrap(actor), to_rank0_only=False)
        for k in expected:
            expected[k].mul_(0.5).add_(now[k].float(), alpha=0.5)
    before = snapshot(actor)
    with ema.swapped_in():
        inside = full_state_dict(strategy.unwrap(actor), to_rank0_only=False)
    res["ema_max_diff"] = max((inside[k] - expected[k]).abs().max().item() for k in expected)
    res["ema_differs_from_weights"] = sum(not torch.equal(inside[k], before["full"][k]) for k in expected)
    res["ema_tensors"] = len(expected)
    res["state_after_ema_swap"] = same_state(before, snapshot(actor))
    del actor, hybrid, h

    # ---- LoRA: adapters trained one step under ZeRO-3, fused copy vs peft merge_and_unload
    lora_actor = build_actor(gpt2, tok, lora=True)
    train_step(lora_actor, batches[3])
    before = snapshot(lora_actor)
    hybrid = HybridEngine(lora_actor, tok.pad_token_id, tok.eos_token_id)
    fused = synced_generate(hybrid, ids, mask, GenerationConfig(NEW_TOKENS, do_sample=False)).sequences
    res["lora_state_after_generate"] = same_state(before, snapshot(lora_actor))
    res["lora_flat_gather_used"] = _shard_layout(strategy.unwrap(lora_actor)) is not None
    adapters = {k: v for k, v in before["full"].items() if "lora_" in k}
    ref = apply_lora(plain_from(gpt2), LoraConfig(enabled=True, rank=4, alpha=8.0))
    missing, unexpected = ref.load_state_dict(adapters, strict=False)
    res["lora_adapters"] = len(adapters)
    res["lora_load_unexpected"] = list(unexpected)
    res["lora_adapter_nonzero_delta"] = sum(int(v.abs().sum() > 0) for k, v in adapters.items() if "lora_B" in k)
    merged = ref.merge_and_unload().eval()
    res["lora_greedy_equal"] = torch.equal(fused, plain_generate(merged, ids, mask, tok, do_sample=False))
    with torch.no_grad():
        a = hybrid._plain(input_ids=fused, attention_mask=(fused != tok.pad_token_id).long()).logits
        b = merged(input_ids=fused, attention_mask=(fused != tok.pad_token_id).long()).logits
        base = plain_from(gpt2)(input_ids=fused, attention_mask=(fused != tok.pad_token_id).long()).logits
    res["lora_logit_diff"] = (a - b).abs().max().item()
    res["lora_vs_base_logit_diff"] = (a - base).abs().max().item()

    gathered = [None] * world
    dist.all_gather_object(gathered, res)
    if r == 0:
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump(gathered, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
