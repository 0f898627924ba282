"""Tensor-parallel generation (rlhf_ds/rollout/tensor_parallel.py) under ZeRO-3 on 2 CPU ranks, tp_size 2.

    deepspeed --num_gpus 2 --no_local_rank tests/dist_tensor_parallel.py <models root> <out.json>

`<models root>` is what `dist_hybrid_models.build_tiny_models` wrote (its `llama` folder). Every rank writes
`<out.json>.<rank>`; tests/test_tensor_parallel.py asserts on them. Sections:
  greedy    after a training step, TP greedy tokens vs the portable HybridEngine's (whole copy) for the same prompts
  counts    parameters held by each rank's generation copy (TP) vs the whole copy, in the decoder layers and in total
  autotp    our streamed slices vs AutoTP's own partition of a materialised whole copy: bitwise equal, parameter by
            parameter (the name / split-dim mapping is right)
  state     full weights, shards, fp32 partitions, Adam moments, step counters: bit-identical across TP generation
  ragged    other prompts, batch sizes and widths per rank: each rank's greedy answers equal HybridEngine's for its own
            prompts; sampling: both TP ranks decode the same group batch, the non-leader's RNG is left as it was
  lora      a peft LoRA actor (adapters trained a step): TP greedy == Hybrid (adapters fused while streaming)
  families  mistral (untied head) and qwen2 (q/k/v biases) actors built from the llama weights: TP greedy == Hybrid
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_hybrid_engine import build_actor, prompt_ids, same_state, snapshot, train_step  # noqa: E402
from rlhf_ds.config import GenerationConfig  # noqa: E402
from rlhf_ds.data.builtin_task import BuiltinTask  # noqa: E402
from rlhf_ds.data.features import collate_sft, pad_batch, sft_features  # noqa: E402
from rlhf_ds.data.formats import SFTExample  # noqa: E402
from rlhf_ds.engine import strategy  # noqa: E402
from rlhf_ds.models.loading import load_tokenizer  # noqa: E402
from rlhf_ds.rollout.hybrid import HybridEngine  # noqa: E402
from rlhf_ds.rollout.tensor_parallel import TensorParallelEngine  # noqa: E402

NEW_TOKENS = 16



def synced_generate(engine, ids, mask, gen):
    """The rollout protocol's two calls: the actor's current weights into the engine (collective), then decoding."""
    engine.sync_weights()
    return engine.generate(ids, mask, gen)

def count(module: torch.nn.Module) -> dict:
    named = list(module.named_parameters())  # deduplicated: a tied head counts once
    return {"total": sum(p.numel() for _, p in named),
            "layers": sum(p.numel() for n, p in named if ".layers." in n)}


def same_tokens(a: torch.Tensor, b: torch.Tensor, pad: int) -> bool:
    """Equal up to trailing all-pad columns (a group batch may run longer than one rank's own batch)."""
    w = min(a.shape[1], b.shape[1])
    rest = [t[:, w:] for t in (a, b)]
    return torch.equal(a[:, :w], b[:, :w]) and all(bool((r == pad).all()) for r in rest)


def derived_family(llama_dir: str, family: str, out_dir: str) -> None:
    """A `family` model holding the trained tiny llama's weights (mistral: untied head; qwen2: + seeded q/k/v biases)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    c = src.config
    kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
              num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
              num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
              rms_norm_eps=c.rms_norm_eps, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
              pad_token_id=c.pad_token_id, tie_word_embeddings=False)
    if family == "mistral":
        kw["head_dim"] = c.head_dim
    cfg = AutoConfig.for_model(family, **kw)
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = dict(src.state_dict())
    state["lm_head.weight"] = src.get_output_embeddings().weight.detach().clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(m.endswith("_proj.bias") for m in missing), (missing, unexpected)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name in missing:
            p = model.get_parameter(name)
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(llama_dir).save_pretrained(out_dir)


class Allocations:
    """Bytes of new (non-meta) tensor storage created inside the block, and the largest single one."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        outer = self
        self.bytes, self.largest, seen = 0, 0, set()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                          if isinstance(t, torch.Tensor) and t.device.type != "meta"}
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        ptr = t.untyped_storage().data_ptr()
                        if ptr not in inputs and ptr not in seen:
                            seen.add(ptr)
                            n = t.untyped_storage().nbytes()
                            outer.bytes += n
                            outer.largest = max(outer.largest, n)
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def main() -> None:
    root, out_path = sys.argv[1], sys.argv[2]
    strategy.setup_distributed(timeout_minutes=5)
    r, world = dist.get_rank(), dist.get_world_size()
    llama = os.path.join(root, "llama")
    tok = load_tokenizer(llama)
    pad = tok.pad_token_id
    res: dict = {"rank": r, "world": world, "threads": torch.get_num_threads()}
    task = BuiltinTask(0)
    texts = [row["prompt"] for row in task.ppo_prompts(24)]
    feats, _ = sft_features([SFTExample(prompt=x["prompt"], response=x["response"]) for x in task.sft_rows(8)], tok, 24, 48)
    batches = [collate_sft(feats[i : i + 4], pad) for i in range(0, 8, 4)]
    ids, mask = pad_batch(prompt_ids(tok, texts[:6]), pad, side="left")  # the same prompts on both ranks
    greedy = GenerationConfig(NEW_TOKENS, do_sample=False)

    # ---- greedy on the folder's weights (responses that stop at EOS), then after a training step
    actor = build_actor(llama, tok)
    res["fresh_greedy_equal"] = torch.equal(
        synced_generate(TensorParallelEngine(actor, pad, tok.eos_token_id, tp_size=2), ids, mask, greedy).sequences,
        synced_generate(HybridEngine(actor, pad, tok.eos_token_id), ids, mask, greedy).sequences)
    fresh = synced_generate(HybridEngine(actor, pad, tok.eos_token_id), ids, mask, greedy).sequences
    res["fresh_has_eos"] = bool((fresh[:, ids.shape[1]:] == tok.eos_token_id).any())
    for b in batches:
        train_step(actor, b)
    hybrid = HybridEngine(actor, pad, tok.eos_token_id)
    ref = synced_generate(hybrid, ids, mask, greedy).sequences
    tp = TensorParallelEngine(actor, pad, tok.eos_token_id, tp_size=2, gather_group_size=4)
    before = snapshot(actor)
    t0 = time.time()
    out = synced_generate(tp, ids, mask, greedy)
    res["tp_seconds"] = time.time() - t0
    after = snapshot(actor)
    res["greedy_equal"] = torch.equal(out.sequences, ref)
    res["greedy_shape"] = [list(out.sequences.shape), list(ref.shape)]
    res["greedy_has_eos"] = bool((ref[:, ids.shape[1]:] == tok.eos_token_id).any())
    res["state_after_generate"] = same_state(before, after)
    res["tp_group"] = tp.group_ranks
    res["is_leader"] = r == tp.leader

    # ---- memory of building the copy (meta -> AutoTP -> to_empty): only this rank's slices are ever allocated
    probe = TensorParallelEngine(actor, pad, tok.eos_token_id, tp_size=2)
    with Allocations() as alloc:
        built = probe._build()
    res["build_alloc_bytes"], res["build_largest_alloc"] = alloc.bytes, alloc.largest
    res["copy_bytes_tp"], res["copy_bytes_whole"] = nbytes(built), nbytes(hybrid._plain)
    res["largest_full_layer_tensor_bytes"] = max(p.numel() * p.element_size() for n, p in hybrid._plain.named_parameters()
                                                 if ".layers." in n)
    del probe, built

    # ---- counts: what each rank's copy holds
    res["count_whole"] = count(hybrid._plain)
    res["count_tp"] = count(tp._module)
    res["split_params"] = sorted(n for ts in tp._targets.values() for n, _, d, _, _ in ts if d is not None)

    # ---- our streamed slices vs AutoTP's own partition of a materialised whole copy (same weights)
    import deepspeed

    from rlhf_ds.rollout.tensor_parallel import _MPU, _rng_guard

    whole = copy.deepcopy(hybrid._plain)
    with _rng_guard():
        ref_tp = deepspeed.init_inference(whole, tensor_parallel={"tp_size": 2, "tp_group": tp.group, "mpu": _MPU(tp.group)},
                                          replace_with_kernel_inject=False, dtype=torch.float32).module
    ours = dict(tp._module.named_parameters())
    theirs = dict(ref_tp.named_parameters())
    res["autotp_names_equal"] = sorted(ours) == sorted(theirs)
    res["autotp_mismatch"] = sorted(n for n in ours if n not in theirs or not torch.equal(ours[n], theirs[n]))
    res["autotp_buffers_equal"] = all(torch.equal(b, dict(ref_tp.named_buffers())[n]) for n, b in tp._module.named_buffers())
    del whole, ref_tp

    # ---- ragged: different prompts, batch sizes and widths per rank
    mine_texts = texts[8 : 11] if r == 0 else texts[12 : 17]
    pid = prompt_ids(tok, mine_texts)
    if r == 1:
        pid = [p[:4] for p in pid]  # much narrower prompts on rank 1 -> the group batch re-pads them
    rid, rmask = pad_batch(pid, pad, side="left")
    rag = synced_generate(tp, rid, rmask, greedy)
    res["ragged_shape"] = [list(rid.shape), list(rag.sequences.shape)]
    res["ragged_prompt_len"] = rag.prompt_len
    res["ragged_prompts_kept"] = torch.equal(rag.sequences[:, : rid.shape[1]], rid)
    res["ragged_greedy_equal"] = same_tokens(rag.sequences, synced_generate(hybrid, rid, rmask, greedy).sequences, pad)
    # sampling: the group decodes one batch under the leader's RNG; the non-leader's own generator is left alone
    torch.manual_seed(200 + r)
    rng_before = torch.get_rng_state()
    synced_generate(tp, rid, rmask, GenerationConfig(NEW_TOKENS, do_sample=True, temperature=0.8))
    res["rng_unchanged"] = torch.equal(rng_before, torch.get_rng_state())
    batch = tp.last_group_sequences.contiguous()
    shapes = [torch.zeros(2, dtype=torch.long) for _ in range(world)]
    dist.all_gather(shapes, torch.tensor(batch.shape))
    res["group_batch_shapes"] = [s.tolist() for s in shapes]
    if all(torch.equal(s, shapes[0]) for s in shapes):
        every = [torch.empty_like(batch) for _ in range(world)]
        dist.all_gather(every, batch)
        res["group_batch_identical"] = all(torch.equal(e, every[0]) for e in every)
    else:
        res["group_batch_identical"] = False
    # a training step after the rollouts, then a sync picks the new weights up
    train_step(actor, batches[0])
    res["after_train_greedy_equal"] = torch.equal(synced_generate(tp, ids, mask, greedy).sequences,
                                                  synced_generate(hybrid, ids, mask, greedy).sequences)
    del actor, hybrid, tp

    # ---- LoRA actor: adapters fused into the streamed base weights
    la = build_actor(llama, tok, lora=True)
    train_step(la, batches[1])
    res["lora_greedy_equal"] = torch.equal(
        synced_generate(TensorParallelEngine(la, pad, tok.eos_token_id, tp_size=2), ids, mask, greedy).sequences,
        synced_generate(HybridEngine(la, pad, tok.eos_token_id), ids, mask, greedy).sequences)
    del la

    # ---- other declared families
    fam = {}
    for family in ("mistral", "qwen2"):
        d = os.path.join(os.path.dirname(out_path), family)
        if r == 0 and not os.path.isfile(os.path.join(d, "config.json")):
            derived_family(llama, family, d)
        dist.barrier()
        a = build_actor(d, tok)
        h = synced_generate(HybridEngine(a, pad, tok.eos_token_id), ids, mask, greedy).sequences
        e = TensorParallelEngine(a, pad, tok.eos_token_id, tp_size=2, keep_copy=(family == "mistral"))
        t = synced_generate(e, ids, mask, greedy).sequences
        split = len({n for ts in e._targets.values() for n, _, d_, _, _ in ts if d_ is not None})
        e.release()  # the step's generation is over: a copy not kept is freed
        fam[family] = {"greedy_equal": torch.equal(t, h), "split": split, "copy_released": e._module is None,
                       "keep_copy": e.keep_copy}
        del a
    res["families"] = fam

    with open(f"{out_path}.{r}", "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
