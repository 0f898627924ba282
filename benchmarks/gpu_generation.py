"""One command for a GPU machine: decode throughput of today's path vs the fast path, their fraction of the HBM
roofline, the MFU of one PPO-style update, and its peak memory against the planner. A script that prints a table and
writes a JSON file (not a test).

    python benchmarks/gpu_generation.py --out gpu_generation.json          # one CUDA GPU (defaults: H200 figures)
    python benchmarks/gpu_generation.py --tiny                             # CPU smoke run of every path it can (<1 min)

Model: a random-init LLaMA-shaped model built from a LlamaConfig (default hidden 2048, 16 layers, 16 heads,
intermediate 5504, vocab 32000: 0.94 B parameters) in bf16 on one device. No download.

(1) Decode throughput, batch 1/16/64 (`--batches`) x 128-token prompts (`--prompt-len`), 256 new tokens (`--new-tokens`),
    greedy, fixed length (min_new_tokens = max_new_tokens: every run decodes exactly 256 steps):
      (a) hf              today's path: `generate` with the dynamic KV cache, eager forward (hybrid.decode=hf)
      (b) static_compile  the fast path, rlhf_ds/rollout/fast_decode.py: static KV cache + torch.compile(mode=
                          "reduce-overhead") of the decoding step (hybrid.decode=static_compile; CUDA only)
    After one warm-up call (the compile of (b) happens there), `--repeats` timed calls; the fastest is reported.
    tokens/s = batch * new tokens / seconds of the whole generate call (prefill included). Seconds per decoding step =
    (whole call - a prefill-only call with max_new_tokens=1) / (new tokens - 1).
    HBM roofline: bytes read per decoding step = weight bytes + KV-cache bytes at the mean context length
    (prompt + (new - 1) / 2 tokens; 2 x layers x batch x context x kv_heads x head_dim x dtype bytes); achieved
    bandwidth = those bytes / seconds per step; fraction = achieved / `--hbm-tb-s` (H200: 4.8 TB/s). Activations,
    logits and the static cache's padding beyond the current length are not counted (so it is a lower bound on traffic).
(2) One PPO-style update of the same model (`--train-batches`, default 16 and 64 sequences of prompt + new tokens):
    a DeepSpeed engine built the way rlhf_ds builds the actor (`strategy.init_trainable`, ZeRO-0, bf16, AdamW),
    forward of the response log-probs (`rl.experience.sequence_logprobs`), PPO clipped loss (`rl.math.policy_loss`)
    against detached old log-probs and random advantages, backward, optimizer step. One warm-up update, then
    `--train-repeats` timed ones (median).
    MFU = model FLOPs / seconds / `--peak-tflops` (H200 dense bf16: 989). Model FLOPs per update =
    6 x N x tokens, N = parameters without the input embedding (a lookup; the LM head is a matmul and counts), plus
    the attention term of PaLM (Chowdhery et al. 2022, appendix B): 12 x layers x hidden x seq_len x tokens (score
    and value matmuls, forward + backward, causal mask not discounted). Both are printed, over forward+backward and
    over the whole update (incl. the optimizer step).
    Peak memory: `get_accelerator().max_memory_allocated()` over the updates of one batch size (stats reset before),
    against `rlhf_ds.planner.plan_job` for a 1-GPU ZeRO-0 bf16 AdamW actor with that micro-batch and lengths, no
    generation phase, flash attention, `gpu_reserved_gb=0` (the CUDA context is not in max_memory_allocated).
    The generation model is moved to the CPU meanwhile, so the update's peak holds only the training engine.

GPU time: the script prints progress with elapsed seconds and rewrites `--out` after every measurement, so a run cut
short still leaves its figures. `--budget-s` (default 450) skips fast-path batch sizes not yet started past that point.
On CPU (`--tiny`, or no CUDA) the CUDA-only parts are skipped with a printed note: (b) runs with the static cache but
without torch.compile (transformers compiles only on CUDA), FastDecoder's refusal message is shown, and memory is the
accelerator's CPU figure (not comparable with the planner's GPU bytes).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

GB = 1e9
T0 = time.time()
_OUTPUTS: dict = {}

SIZES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
               intermediate_size=5504, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=176, vocab_size=512),
}


def device_label(acc) -> str:
    try:
        mod = getattr(torch, acc.device_name(), None)  # torch.cuda / torch.xpu: the card's name, when it has one
        return str(mod.get_device_name()) if hasattr(mod, "get_device_name") else acc.device_name()
    except Exception:  # noqa: BLE001
        return acc.device_name()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes; runs on CPU in well under a minute")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="model shape (default 1b; tiny with --tiny)")
    p.add_argument("--batches", default=None, help="decode batch sizes (default 1,16,64; tiny 1,4)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128; tiny 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="decoded tokens, fixed length (default 256; tiny 8)")
    p.add_argument("--train-batches", default=None, help="PPO update batch sizes (default 16,64; tiny 2)")
    p.add_argument("--repeats", type=int, default=2, help="timed generate calls per row (after one warm-up)")
    p.add_argument("--train-repeats", type=int, default=3, help="timed PPO updates per batch size (after one warm-up)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--hbm-tb-s", type=float, default=4.8, help="the card's HBM bandwidth, TB/s (H200: 4.8)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak, TFLOP/s (H200: 989)")
    p.add_argument("--gpu-memory-gb", type=float, default=141.0, help="the card's memory for the planner (H200: 141)")
    p.add_argument("--paths", default="hf,static_compile", help="decode paths to time")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip fast-path rows not started by then")
    p.add_argument("--out", default="gpu_generation.json", help="JSON file of every figure")
    a = p.parse_args(argv)
    tiny = a.tiny
    a.size = a.size or ("tiny" if tiny else "1b")
    a.batches = parse_ints(a.batches or ("1,4" if tiny else "1,16,64"))
    a.prompt_len = a.prompt_len or (16 if tiny else 128)
    a.new_tokens = a.new_tokens or (8 if tiny else 256)
    a.train_batches = parse_ints(a.train_batches or ("2" if tiny else "16,64"))
    a.paths = [x for x in a.paths.split(",") if x]
    if a.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (seconds per step need a prefill-only call to subtract)")
    return a


# ----------------------------------------------------------------------------------------------------------- model
def llama_config(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SIZES[size], max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")


def build_model(cfg, dtype: torch.dtype, device: torch.device, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes(cfg, batch: int, context: float, dtype_bytes: int) -> float:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * batch * context * cfg.num_key_value_heads * head_dim * dtype_bytes


# ------------------------------------------------------------------------------------------------------ decoding
class Timer:
    def __init__(self, acc):
        self.acc = acc

    def __call__(self, fn):
        self.acc.synchronize()
        t = time.perf_counter()
        out = fn()
        self.acc.synchronize()
        return time.perf_counter() - t, out


def decode_rows(args, cfg, model, acc, on_cuda: bool, results: dict, save) -> None:
    from rlhf_ds.rollout.fast_decode import FastDecoder, fast_generate_kwargs, static_cache_support

    timer = Timer(acc)
    dev = next(model.parameters()).device
    dbytes = next(model.parameters()).element_size()
    wbytes = weight_bytes(model)
    P, N = args.prompt_len, args.new_tokens
    mean_ctx = P + (N - 1) / 2
    ok, why = static_cache_support(model)
    results["static_cache_support"] = {"ok": ok, "why": why}
    decoder = None
    if "static_compile" in args.paths:
        try:
            decoder = FastDecoder("static_compile")
            results["fast_decoder"] = "constructed (CUDA)"
        except ValueError as e:
            results["fast_decoder"] = f"refused: {e}"
            log(f"NOTE: FastDecoder refuses here, as it must without CUDA: {e}")
            log("NOTE: (b) runs below with the static cache but WITHOUT torch.compile / CUDA graphs "
                "(transformers compiles the decoding step only on CUDA); its figures are not the fast path's.")
    outputs = _OUTPUTS  # kept across calls: (b) is compared with (a)'s tokens
    for path in args.paths:
        for B in args.batches:
            if path == "static_compile" and time.time() - T0 > args.budget_s:
                log(f"SKIP {path} batch {B}: past --budget-s {args.budget_s:.0f}s")
                results["rows"].append({"path": path, "batch": B, "skipped": "budget"})
                save()
                continue
            g = torch.Generator().manual_seed(1000 + B)
            ids = torch.randint(3, cfg.vocab_size, (B, P), generator=g).to(dev)
            mask = torch.ones_like(ids)
            base = dict(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=2,
                        use_cache=True)
            if path == "hf":
                extra, how = {}, "dynamic cache, eager"
            elif decoder is not None:
                extra = decoder.generate_kwargs(model, P, N)
                how = "static cache + torch.compile(reduce-overhead)" if extra else f"fell back to hf: {decoder.fallback_reason}"
            else:
                extra = fast_generate_kwargs(model, P, N)
                extra.pop("compile_config")  # CPU: transformers would not compile anyway (it warns); leave it out
                how = "static cache, no compile (CPU)"

            def run(new: int):
                return model.generate(**base, max_new_tokens=new, min_new_tokens=new, **extra)

            log(f"{path} batch {B}: warm-up ({how}) ...")
            with torch.no_grad():
                t_warm, _ = timer(lambda: run(N))
                t_prefill = min(timer(lambda: run(1))[0] for _ in range(2))
                times, out = [], None
                for _ in range(args.repeats):
                    t, out = timer(lambda: run(N))
                    times.append(t)
            assert out.shape == (B, P + N), out.shape
            t = min(times)
            step = max(t - t_prefill, 1e-9) / (N - 1)
            bytes_step = wbytes + kv_bytes(cfg, B, mean_ctx, dbytes)
            bw = bytes_step / step
            row = {"path": path, "how": how, "batch": B, "prompt_len": P, "new_tokens": N,
                   "warmup_s": t_warm, "seconds": t, "all_seconds": times, "prefill_s": t_prefill,
                   "tokens_per_s": B * N / t, "s_per_step": step, "bytes_per_step": bytes_step,
                   "achieved_tb_s": bw / 1e12, "roofline_fraction": bw / (args.hbm_tb_s * 1e12)}
            outputs[(path, B)] = out[:, P:].cpu()
            if path != "hf" and ("hf", B) in outputs:
                row["greedy_token_agreement_vs_hf"] = float((outputs[(path, B)] == outputs[("hf", B)]).float().mean())
            results["rows"].append(row)
            save()
            log(f"{path} batch {B}: {row['tokens_per_s']:,.0f} tok/s, {step * 1e3:.2f} ms/step, "
                f"{row['achieved_tb_s']:.3f} TB/s = {row['roofline_fraction']:.1%} of roofline (warm-up {t_warm:.1f}s)")
    if decoder is not None:
        results["fast_decoder_final_mode"] = decoder.mode


# ---------------------------------------------------------------------------------------------------- PPO update
def planner_prediction(cfg, args, batch: int) -> dict:
    from rlhf_ds import planner as pl

    spec = pl.ModelSpec(n_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, vocab=cfg.vocab_size,
                        intermediate=cfg.intermediate_size, n_heads=cfg.num_attention_heads,
                        n_kv_heads=cfg.num_key_value_heads, tie_embeddings=False, arch="llama", name=f"llama-{args.size}")
    st = pl.TrainSettings(role="actor", zero_stage=0, precision=args.dtype, optimizer="adamw")
    hw = pl.Hardware(gpus_per_node=1, nodes=1, gpu_memory_gb=args.gpu_memory_gb, gpu_reserved_gb=0.0)
    wl = pl.Workload(micro_batch=batch, prompt_len=args.prompt_len, response_len=args.new_tokens, generate=False,
                     flash_attention=True)
    plan = pl.plan_job({"actor": (spec, st)}, hw, wl)
    m = plan.models["actor"]
    return {"peak_bytes": plan.gpu_peak, "peak_phase": plan.gpu_peak_phase, "n_params": m.n_params,
            "gpu_bytes": dict(m.gpu), "details": dict(m.gpu_details)}


def train_rows(args, cfg, acc, on_cuda: bool, results: dict, save) -> None:
    from rlhf_ds.config import EngineConfig
    from rlhf_ds.engine import strategy
    from rlhf_ds.rl.experience import sequence_logprobs
    from rlhf_ds.rl.math import policy_loss

    dev = strategy.device()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    P, N = args.prompt_len, args.new_tokens
    S = P + N
    gc.collect()
    acc.empty_cache()
    base_alloc = acc.memory_allocated()
    log(f"PPO update: building the DeepSpeed ZeRO-0 {args.dtype} AdamW engine (allocated before: {base_alloc / GB:.2f} GB)")
    model = build_model(cfg, dtype, dev, seed=1)
    model.config.use_cache = False
    eng = EngineConfig(zero_stage=0, precision=args.dtype, lr=1e-6, warmup_ratio=0.0, lr_schedule="constant")
    ds = strategy.ds_config_for(eng, micro_batch_size=max(args.train_batches))
    engine = strategy.init_trainable(model, eng, ds, total_steps=1000)
    N_all = n_params(model)
    N_dense = N_all - model.get_input_embeddings().weight.numel()
    results["train_model"] = {"n_params": N_all, "n_params_without_input_embedding": N_dense}
    for B in args.train_batches:
        g = torch.Generator().manual_seed(2000 + B)
        seqs = torch.randint(3, cfg.vocab_size, (B, S), generator=g).to(dev)
        amask = torch.ones_like(seqs)
        rmask = torch.ones(B, N, dtype=torch.long, device=dev)
        adv = torch.randn(B, N, generator=g).to(dev)
        with torch.no_grad():
            old = sequence_logprobs(engine, seqs, amask, P, 1.0).detach()
        old = old + 0.01 * torch.randn(old.shape, generator=g).to(dev)  # ratios != 1, some clipped

        def update():
            acc.synchronize()
            t0 = time.perf_counter()
            logp = sequence_logprobs(engine, seqs, amask, P, 1.0)
            loss, _ = policy_loss(logp, old, adv, rmask, clip_eps=0.2)
            engine.backward(loss)
            acc.synchronize()
            t1 = time.perf_counter()
            engine.step()
            acc.synchronize()
            return t1 - t0, time.perf_counter() - t0, loss.item()

        acc.reset_peak_memory_stats()
        log(f"PPO update batch {B} x {S} tokens: warm-up ...")
        update()
        fb, full = [], []
        for _ in range(args.train_repeats):
            a, b, loss = update()
            fb.append(a)
            full.append(b)
        peak = acc.max_memory_allocated()
        tokens = B * S
        f_dense = 6 * N_dense * tokens
        f_attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * S * tokens
        t_fb, t_full = statistics.median(fb), statistics.median(full)
        peak_f = args.peak_tflops * 1e12
        plan = planner_prediction(cfg, args, B)
        row = {"batch": B, "seq_len": S, "tokens": tokens, "fwd_bwd_s": t_fb, "update_s": t_full,
               "all_fwd_bwd_s": fb, "all_update_s": full, "loss": loss,
               "flops_6N": f_dense, "flops_attention": f_attn,
               "mfu_fwd_bwd_6N": f_dense / t_fb / peak_f, "mfu_fwd_bwd_6N_attn": (f_dense + f_attn) / t_fb / peak_f,
               "mfu_update_6N": f_dense / t_full / peak_f, "mfu_update_6N_attn": (f_dense + f_attn) / t_full / peak_f,
               "max_memory_allocated": peak, "allocated_before_engine": base_alloc,
               "max_memory_allocated_net": peak - base_alloc, "planner": plan,
               "measured_over_planned": (peak - base_alloc) / plan["peak_bytes"] if plan["peak_bytes"] else None,
               "memory_comparable": on_cuda}
        results["train"].append(row)
        save()
        log(f"PPO update batch {B}: fwd+bwd {t_fb * 1e3:.1f} ms, update {t_full * 1e3:.1f} ms, MFU(fwd+bwd, 6N+attn) "
            f"{row['mfu_fwd_bwd_6N_attn']:.1%}, peak {peak / GB:.2f} GB vs planned {plan['peak_bytes'] / GB:.2f} GB")
    del engine, model
    gc.collect()
    acc.empty_cache()


# ------------------------------------------------------------------------------------------------------- output
def table(results: dict) -> str:
    env = results["env"]
    lines = [f"model: random-init LLaMA {results['model']['shape']} ({results['model']['n_params'] / 1e6:,.1f} M params, "
             f"{results['model']['weight_bytes'] / GB:.4g} GB weights), {env['dtype']} on {env['device']}; "
             f"HBM {env['hbm_tb_s']} TB/s, peak {env['peak_tflops']} TFLOP/s", "",
             "| path | batch | tokens/s | ms/step | prefill s | bytes/step GB | TB/s | roofline | tokens = hf |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if r.get("skipped"):
            lines.append(f"| {r['path']} | {r['batch']} | skipped ({r['skipped']}) | | | | | | |")
            continue
        agree = r.get("greedy_token_agreement_vs_hf")
        lines.append(f"| {r['path']} ({r['how']}) | {r['batch']} | {r['tokens_per_s']:,.0f} | {r['s_per_step'] * 1e3:.2f} "
                     f"| {r['prefill_s']:.3f} | {r['bytes_per_step'] / GB:.4g} | {r['achieved_tb_s']:.3f} "
                     f"| {r['roofline_fraction']:.1%} | {'' if agree is None else f'{agree:.1%}'} |")
    hf = {r["batch"]: r for r in results["rows"] if r["path"] == "hf" and not r.get("skipped")}
    for r in results["rows"]:
        if r["path"] != "hf" and not r.get("skipped") and r["batch"] in hf:
            lines.append(f"speed-up {r['path']} / hf at batch {r['batch']}: "
                         f"{r['tokens_per_s'] / hf[r['batch']]['tokens_per_s']:.2f}x")
    if results["train"]:
        lines += ["", "PPO-style update (ZeRO-0, AdamW; MFU over fwd+bwd and over the whole update incl. optimizer step; "
                  "FLOPs 6N [+ PaLM attention 12*L*h*s per token])", "",
                  "| batch x seq | fwd+bwd s | update s | MFU fb 6N | MFU fb 6N+attn | MFU upd 6N+attn | peak GB | planned GB | measured/planned |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for t in results["train"]:
            mo = t["measured_over_planned"]
            lines.append(f"| {t['batch']} x {t['seq_len']} | {t['fwd_bwd_s']:.3f} | {t['update_s']:.3f} "
                         f"| {t['mfu_fwd_bwd_6N']:.1%} | {t['mfu_fwd_bwd_6N_attn']:.1%} | {t['mfu_update_6N_attn']:.1%} "
                         f"| {t['max_memory_allocated_net'] / GB:.4g} | {t['planner']['peak_bytes'] / GB:.4g} "
                         f"| {'' if mo is None else f'{mo:.2f}'}{'' if t['memory_comparable'] else ' (CPU: not comparable)'} |")
    for n in results["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.getLogger("deepspeed").setLevel(logging.WARNING)
    from deepspeed.accelerator import get_accelerator

    from rlhf_ds.engine import strategy

    acc = get_accelerator()
    on_cuda = acc.device_name() == "cuda"
    strategy.setup_distributed(timeout_minutes=10)  # a world of one: the DeepSpeed engine of the update needs it
    dev = strategy.device()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = llama_config(args.size)
    results: dict = {"env": {"device": acc.device_name(), "device_name": device_label(acc),
                             "torch": torch.__version__, "dtype": args.dtype, "hbm_tb_s": args.hbm_tb_s,
                             "peak_tflops": args.peak_tflops, "threads": torch.get_num_threads()},
                     "args": {k: v for k, v in vars(args).items()}, "rows": [], "train": [], "notes": []}
    try:
        import transformers

        results["env"]["transformers"] = transformers.__version__
    except Exception:  # noqa: BLE001
        pass
    if not on_cuda:
        results["notes"].append("no CUDA: the fast path runs without torch.compile/CUDA graphs, roofline and MFU "
                                "fractions use the GPU figures given and mean nothing here, memory is not comparable")
        log("NOTE: no CUDA accelerator here; CUDA-only parts are skipped (see the notes in the table)")

    def save():
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=str)

    log(f"building the model ({args.size}, {args.dtype}) on {dev} ...")
    model = build_model(cfg, dtype, dev)
    model.eval().requires_grad_(False)
    results["model"] = {"shape": args.size, "config": {k: getattr(cfg, k) for k in SIZES[args.size]},
                        "n_params": n_params(model), "weight_bytes": weight_bytes(model)}
    save()
    log(f"model: {n_params(model) / 1e6:,.1f} M parameters")
    order = [p for p in args.paths if p == "hf"]
    rest = [p for p in args.paths if p != "hf"]
    # (a) first, then the update (generation model parked on the CPU), then (b) whose compile is the slow part
    decode_rows(argparse.Namespace(**{**vars(args), "paths": order}), cfg, model, acc, on_cuda, results, save)
    if not args.skip_train:
        model.to("cpu")
        train_rows(args, cfg, acc, on_cuda, results, save)
        model.to(dev)
    outputs_args = argparse.Namespace(**{**vars(args), "paths": rest})
    if rest:
        decode_rows(outputs_args, cfg, model, acc, on_cuda, results, save)
        hf_rows = {r["batch"]: r for r in results["rows"] if r["path"] == "hf" and not r.get("skipped")}
        for r in results["rows"]:
            if r["path"] != "hf" and r["batch"] in hf_rows and "tokens_per_s" in r:
                r["speedup_vs_hf"] = r["tokens_per_s"] / hf_rows[r["batch"]]["tokens_per_s"]
    results["total_seconds"] = time.time() - T0
    save()
    print()
    print(table(results))
    print(f"\nwrote {args.out} ({results['total_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
