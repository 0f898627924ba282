"""Peak RSS per rank and seconds per GRPO step on a chat checkpoint of a real shape (issue #24), through the real CLI.

    python benchmarks/chat_checkpoint_memory.py                               # (a), (b) and (c) on this checkout
    python benchmarks/chat_checkpoint_memory.py --source /tmp/base --out before.json --tag before
    python benchmarks/chat_checkpoint_memory.py --only a --set a:actor.engine.zero_stage=0 --steps 2
    python benchmarks/chat_checkpoint_memory.py --show before.json after.json   # the tables of earlier runs

The model is built locally (random init, fp32) in the shape of SmolLM2-135M: LlamaForCausalLM, 30 layers, hidden 576,
intermediate 1536, 9 attention heads / 3 KV heads, tied embeddings, 2048 positions, vocabulary 49,152, with a
byte-level BPE tokenizer covering the whole vocabulary (a small BPE trained here on the prompts, padded with filler
word tokens up to the vocabulary size), a ChatML chat template that adds a default system turn, BOS `<|im_start|>`,
EOS `<|im_end|>`, PAD == EOS and an unused special `<|endoftext|>` at id 0, like SmolLM2's (`--pad distinct`: a
separate `<|pad|>` token inside the vocabulary instead, for code that cannot load PAD == EOS). Models are cached under
`--work`, so reruns reuse them.

Settings (per rank: 8 prompts x 4 samples = 32 sequences, 48 new tokens, GRPO, a Python rule reward, no reward model,
fp32, ppo.* batch keys otherwise at their defaults):

    a        1 rank, LoRA on the actor (2 threads)
    b        2 ranks (deepspeed launcher), ZeRO-3, full fine-tuning (1 thread per rank)
    c        setting (a) at vocabularies 32,000 / 49,152 / 128,256 / 151,936 (Llama 2 / SmolLM2 / Llama 3 / Qwen 2.5),
             same hidden size (one run each, named c32000, c49152, ...; `--vocabs` picks others)

Peak RSS: `os.wait4` on the CLI process (the step itself for 1 rank, the deepspeed runner for 2) gives the largest
maximum resident set of its whole process tree (each launcher waits for its ranks), i.e. the max over ranks; each
rank's own VmHWM is also polled from /proc every 0.25 s (a lower bound for the last 0.25 s of its life). GB = 1e9 bytes.
Seconds per step: the wall-clock gaps between consecutive rows of the run's metrics.jsonl (rank 0 writes one row per
step; no checkpoints are saved in the loop), step 1 left out; phases from the rows' timing/* fields (rank means), step 1
left out. A one-step run (`--steps 1`, for settings too slow on a small machine) reports step 1's phases instead,
marked "(step 1)": they include its warm-up. The polled peak RSS at the end of each step is kept in the JSON
(`peak_rss_gb_after_step_k_then_end`), to show whether later steps grow it; the whole run's peak includes loading
and the final save of the model (`model/`, gathered and merged), which can be the largest moment.

`--source DIR` runs the rlhf_ds checkout DIR (first on PYTHONPATH, working directory of the runs), so the same script
measures an older commit and the current code. A run that fails is reported with its exit status and last error line
(the log is kept next to its run directory). Prints figures, asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9

# SmolLM2-135M's shape
SHAPE = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
             num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
             rope_theta=100000.0, hidden_act="silu")
VOCAB = 49152
SWEEP_VOCABS = (32000, 49152, 128256, 151936)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
DISTINCT_PAD = "<|pad|>"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

N_PROMPTS = 64
PROMPTS_PER_RANK = 8
SAMPLES = 4
NEW_TOKENS = 48
MAX_PROMPT_TOKENS = 64  # the rendered prompts are ~45 tokens (checked when the file is written): nothing is cut
MAX_SEQ_LEN = MAX_PROMPT_TOKENS + NEW_TOKENS + 8

REWARD_PY = '''"""Rule reward of benchmarks/chat_checkpoint_memory.py: the right number first (+1), - chars / 400."""
import re


def number_answer(prompts, responses, answer, **columns):
    scores = []
    for response, want in zip(responses, answer):
        numbers = re.findall(r"-?\\d+", response)
        right = 1.0 if numbers and numbers[0] == str(want) else 0.0
        scores.append(right - len(response) / 400.0)
    return scores
'''


# ---- model, tokenizer, data ----------------------------------------------------------------------------------------
def prompt_rows() -> list[dict]:
    """64 arithmetic questions as single user turns (the template adds the default system turn), with their answer."""
    rows = []
    ops = [("plus", lambda x, y: x + y), ("minus", lambda x, y: x - y), ("times", lambda x, y: x * y)]
    for i in range(N_PROMPTS):
        x, y = 7 + (i * 37) % 90, 3 + (i * 11) % 40
        word, fn = ops[i % 3]
        q = f"What is {x} {word} {y}? Give the final answer as a single number on its own line."
        rows.append({"messages": [{"role": "user", "content": q}], "answer": str(fn(x, y))})
    return rows


def base_tokenizer_json(work: str) -> str:
    """A byte-level BPE trained on the prompts and some English (a few thousand tokens), cached as JSON."""
    path = os.path.join(work, "bpe_base.json")
    if os.path.exists(path):
        return open(path, encoding="utf-8").read()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = ("the of and to in is was for on that with as it by at from this be are or an which his not but had "
             "they you were their one all we can her has there been if more when will would who so no what think "
             "step then give final answer single number own line plus minus times helpful assistant named trained "
             "hugging face system user reply first second result sum product difference equals because therefore "
             "let us compute add subtract multiply so we get").split()
    corpus = [json.dumps(r) for r in prompt_rows()]
    corpus += [f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n{r['messages'][0]['content']}"
               f"<|im_end|>\n<|im_start|>assistant\n{r['answer']}<|im_end|>\n" for r in prompt_rows()]
    corpus += [" ".join(words[(i * 7 + j * 13) % len(words)] for j in range(40)) for i in range(400)]
    corpus += [" ".join(str(n) for n in range(k, k + 50)) for k in range(-100, 1000, 50)]
    trainer = trainers.BpeTrainer(vocab_size=3000, min_frequency=1, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    text = tok.to_str()
    os.makedirs(work, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return text


def filler(i: int) -> str:
    """The i-th filler word token: 'Ġ' (a space) + letters, decodes to ' qab' and the like."""
    s = ""
    i += 26 * 27  # at least three letters
    while i:
        i, r = divmod(i, 26)
        s = chr(97 + r) + s
    return "\u0120" + s


def build_tokenizer(work: str, vocab: int, pad: str):
    """The base BPE padded with filler tokens to exactly `vocab` entries, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(base_tokenizer_json(work))
    table = spec["model"]["vocab"]
    i = 0
    while len(table) < vocab:
        word = filler(i)
        i += 1
        if word not in table:
            table[word] = len(table)
    if pad == "distinct":  # the last filler becomes <|pad|>, a special token inside the vocabulary (no growth)
        last = max(table, key=table.get)
        table[DISTINCT_PAD] = table.pop(last)
        spec["added_tokens"].append({"id": table[DISTINCT_PAD], "content": DISTINCT_PAD, "single_word": False,
                                     "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    assert len(table) == vocab and max(table.values()) == vocab - 1
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|im_end|>" if pad == "eos" else DISTINCT_PAD,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHATML, model_max_length=2048,
        clean_up_tokenization_spaces=False)
    assert len(tok) == vocab, (len(tok), vocab)
    return tok


def build_model(work: str, vocab: int, pad: str) -> str:
    """The model folder (cached): random-init fp32 LlamaForCausalLM of SmolLM2-135M's shape at `vocab`."""
    folder = os.path.join(work, "models", f"llama135m_v{vocab}_pad{pad}")
    if os.path.exists(os.path.join(folder, "built.json")):
        return folder
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(work, vocab, pad)
    cfg = LlamaConfig(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, torch_dtype="float32", **SHAPE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    n = sum(p.numel() for p in model.parameters())
    with open(os.path.join(tmp, "built.json"), "w") as f:
        json.dump({"parameters": n, "vocab": vocab, "pad": pad, **SHAPE}, f)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    print(f"built {folder} ({n / 1e6:.1f} M parameters)", flush=True)
    return folder


def write_data(work: str, model_dir: str) -> tuple[str, str, dict]:
    """prompts.jsonl (chat rows with an `answer` column), the reward file, and the rendered prompt lengths."""
    from transformers import AutoTokenizer

    prompts, reward = os.path.join(work, "chat_prompts.jsonl"), os.path.join(work, "number_reward.py")
    rows = prompt_rows()
    with open(prompts, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(reward, "w", encoding="utf-8") as f:
        f.write(REWARD_PY)
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) for r in rows]
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]  # as rlhf_ds encodes them
    stats = {"prompts": len(rows), "min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)}
    if stats["max"] > MAX_PROMPT_TOKENS:
        raise SystemExit(f"rendered prompts up to {stats['max']} tokens exceed "
                         f"data.max_prompt_tokens={MAX_PROMPT_TOKENS}")
    return prompts, reward, stats


# ---- running one setting -------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_rank(cmdline: list[str]) -> bool:
    """A process running the step itself (`python [-u] -m rlhf_ds.cli ...`), not a deepspeed launcher naming it."""
    return any(a == "-m" and b == "rlhf_ds.cli" for a, b in zip(cmdline, cmdline[1:]))


def read_status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    out[line[:5]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


class RankPoller(threading.Thread):
    """Every `interval` s: each rank process of the tree under `root_pid`: its VmHWM (kept) and VmRSS (a timeline)."""

    def __init__(self, root_pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.root, self.interval, self.stop = root_pid, interval, threading.Event()
        self.hwm: dict[int, int] = {}
        self.timeline: dict[int, list[tuple[float, float]]] = {}
        self.t0 = time.time()

    def ranks(self) -> list[int]:
        import psutil

        try:
            root = psutil.Process(self.root)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        pids = []
        for p in procs:
            try:
                if is_rank(p.cmdline()):
                    pids.append(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return pids

    def run(self) -> None:
        last_tl = 0.0
        while not self.stop.is_set():
            now = time.time()
            for pid in self.ranks():
                st = read_status(pid)
                if "VmHWM" in st:
                    self.hwm[pid] = max(self.hwm.get(pid, 0), st["VmHWM"])
                if "VmRSS" in st and now - last_tl >= 1.0:  # (time, RSS, peak so far)
                    self.timeline.setdefault(pid, []).append((round(now, 1), round(st["VmRSS"] / GB, 3),
                                                              round(self.hwm.get(pid, 0) / GB, 3)))
            if now - last_tl >= 1.0:
                last_tl = now
            self.stop.wait(self.interval)


def last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    pat = re.compile(r"(Error|Exception|error:|Traceback|Killed|exit status)")
    for ln in reversed(lines):
        if pat.search(ln) and not ln.startswith("File "):
            return ln[:300]
    return lines[-1][:300] if lines else ""


def peak_by_step(timeline: dict, rows: list[dict]) -> list[float]:
    """The largest polled peak RSS over ranks at the end of each logged step, and at the end of the run (GB)."""
    out = []
    for t in [r["time"] for r in rows] + [float("inf")]:
        hwm = [max((h for tt, _, h in tl if tt <= t), default=0.0) for tl in timeline.values()]
        out.append(round(max(hwm, default=0.0), 3))
    return out


def step_figures(run_dir: str, timeline: dict) -> dict:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    rows = [json.loads(ln) for ln in open(path, encoding="utf-8") if ln.strip()]
    rows = [r for r in rows if r.get("step_name", "ppo") == "ppo" and "timing/generation" in r]
    if not rows:
        return {}
    out = {"steps_logged": len(rows), "peak_rss_gb_after_step_k_then_end": peak_by_step(timeline, rows)}
    later = rows[1:] if len(rows) > 1 else rows
    gaps = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
    if gaps:
        out["s_per_step_wall"] = sum(gaps) / len(gaps)
    for k in ("generation", "weight_sync", "scoring", "training"):
        vals = [r[f"timing/{k}"] for r in later if f"timing/{k}" in r]
        if vals:
            out[f"s_{k}"] = sum(vals) / len(vals)
    if not gaps:
        out["s_per_step_note"] = "one step: its phases include step 1's warm-up"
    if all(f"s_{k}" in out for k in ("generation", "scoring", "training")):
        out["s_per_step_phases"] = out["s_generation"] + out["s_scoring"] + out["s_training"]
    out["step1_phases"] = {k: rows[0].get(f"timing/{k}") for k in ("generation", "scoring", "training")}
    out["response_length"] = sum(r.get("ppo/response_length", 0) for r in rows) / len(rows)
    out["steps_in_mean"] = len(gaps) if gaps else 1
    return out


def run_setting(name: str, ranks: int, model_dir: str, overrides: list[str], args, data: tuple[str, str]) -> dict:
    prompts, reward = data
    out_dir = os.path.join(args.work, "runs", args.tag or "run", name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    log_path = out_dir + ".log"
    step_args = ["ppo", f"output_dir={out_dir}", f"actor.model={model_dir}", "reward.model=null",
                 f"reward.function={reward}:number_answer", f"data.train={prompts}",
                 "ppo.advantage_estimator=grpo", f"ppo.n_samples_per_prompt={SAMPLES}",
                 f"ppo.rollout_batch_size={PROMPTS_PER_RANK}", f"generation.max_new_tokens={NEW_TOKENS}",
                 f"data.max_prompt_tokens={MAX_PROMPT_TOKENS}", f"data.max_seq_len={MAX_SEQ_LEN}",
                 f"ppo.steps={args.steps}", "train.log_every=1", "checkpoint.every_minutes=0", *overrides]
    threads = args.threads or (2 if ranks == 1 else 1)
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), RLHF_DS_THREADS=str(threads),
               WANDB_MODE="offline", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = args.source + os.pathsep + env.get("PYTHONPATH", "")
    if ranks == 1:
        cmd = [sys.executable, "-m", "rlhf_ds.cli", *step_args, "--resume", "never"]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--no_local_rank",
               "--master_port", str(free_port()), "--module", "rlhf_ds.cli", *step_args, "--resume", "never"]
    print(f"\n[{name}] {ranks} rank(s) x {threads} thread(s): {' '.join(cmd)}", flush=True)
    t0, load_before = time.time(), os.getloadavg()[0]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=args.source, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        poller = RankPoller(proc.pid)
        poller.start()
        timed_out = False

        def kill():
            nonlocal timed_out
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group this script started (start_new_session)
            except ProcessLookupError:
                pass

        timer = threading.Timer(args.timeout, kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        poller.stop.set()
        poller.join()
    wall = time.time() - t0
    text = open(log_path, encoding="utf-8", errors="replace").read()
    res = {"name": name, "ranks": ranks, "threads_per_rank": threads, "overrides": overrides, "command": cmd,
           "rc": proc.returncode, "timed_out": timed_out, "wall_s": round(wall, 1), "log": log_path,
           "load_avg_1min_before_after": [load_before, os.getloadavg()[0]],
           "run_dir": out_dir, "peak_rss_gb_max_over_ranks": usage.ru_maxrss * 1024 / GB,
           "peak_rss_gb_per_rank_polled": sorted((round(v / GB, 3) for v in poller.hwm.values()), reverse=True),
           "rss_timeline_gb": {str(i): [(round(t - t0, 1), r, h) for t, r, h in tl[:: max(1, len(tl) // 300)]]
                               for i, tl in enumerate(poller.timeline.values())}}
    res.update(step_figures(out_dir, poller.timeline))
    res["status"] = "ok" if proc.returncode == 0 else ("timeout" if timed_out else f"exit {proc.returncode}")
    if proc.returncode != 0:
        res["error"] = last_error(text[-20000:])
    m = re.search(r"embedding resized from (\d+) to (\d+) rows", text)
    res["embedding_resized"] = [int(m.group(1)), int(m.group(2))] if m else None
    print(f"[{name}] {res['status']} in {wall:.0f} s; peak RSS {res['peak_rss_gb_max_over_ranks']:.2f} GB "
          f"(polled per rank: {res['peak_rss_gb_per_rank_polled']}); s/step {res.get('s_per_step_wall')}"
          + (f"; {res['error']}" if "error" in res else ""), flush=True)
    return res


# ---- table ---------------------------------------------------------------------------------------------------------
def fmt(v, spec=".2f") -> str:
    return "" if v is None else format(v, spec)


def print_table(doc: dict) -> None:
    meta = doc.get("meta", {})
    lengths = meta.get("prompt_tokens", {})
    print(f"\n{meta.get('tag') or ''} source={meta.get('source')} ({meta.get('commit')}); s/step = mean of steps 2..N; "
          f"per rank {PROMPTS_PER_RANK} prompts x {SAMPLES} samples, {NEW_TOKENS} new tokens, fp32; "
          f"{lengths.get('prompts')} prompts of {lengths.get('min')}-{lengths.get('max')} tokens, "
          f"data.max_prompt_tokens={meta.get('max_prompt_tokens')}, data.max_seq_len={meta.get('max_seq_len')}; "
          "GB = 1e9 bytes")
    print("| run | ranks x threads | vocab | PAD | ZeRO/LoRA | steps | peak RSS GB (max over ranks) | polled per rank "
          "| polled peak after step 1 / last step | s/step | generation | scoring | training | load avg | status |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in doc["runs"].items():
        per_rank = " / ".join(f"{v:.2f}" for v in r.get("peak_rss_gb_per_rank_polled", []))
        by_step = r.get("peak_rss_gb_after_step_k_then_end") or [None]
        step_s = fmt(r.get("s_per_step_wall"), ".1f") or (fmt(r.get("s_per_step_phases"), ".1f") + " (step 1)"
                                                           if r.get("s_per_step_phases") else "")
        load = "-".join(f"{v:.1f}" for v in r.get("load_avg_1min_before_after", []))
        print(f"| {name} | {r['ranks']} x {r['threads_per_rank']} | {r.get('vocab')} | {r.get('pad')} "
              f"| {r.get('mode')} "
              f"| {r.get('steps_logged', 0)} | {fmt(r.get('peak_rss_gb_max_over_ranks'))} | {per_rank} "
              f"| {fmt(by_step[0])} / {fmt(by_step[-2] if len(by_step) > 1 else None)} | {step_s} "
              f"| {fmt(r.get('s_generation'), '.1f')} | {fmt(r.get('s_scoring'), '.1f')} "
              f"| {fmt(r.get('s_training'), '.1f')} | {load} "
              f"| {r['status']}{': ' + r['error'] if r.get('error') else ''} |")


# ---- main ----------------------------------------------------------------------------------------------------------
def parse_set(text: str) -> tuple[list[str], str]:
    """`[SETTINGS:]key=value`: SETTINGS a comma list of a, b, c (default: all)."""
    head, sep, rest = text.partition(":")
    if sep and "=" not in head and re.fullmatch(r"[abc](,[abc])*", head):
        return head.split(","), rest
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set wants [a,b,c:]key=value, got {text!r}")
    return ["a", "b", "c"], text


def git_commit(path: str) -> str:
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip() + (
            " +changes" if subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                                          capture_output=True, text=True).stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=REPO, help="rlhf_ds checkout to run (default: this one)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "rlhf_ds_bench_chat"),
                        help="models, data and runs (models are reused)")
    parser.add_argument("--only", default="a,b,c", help="settings to run: a comma list of a, b, c")
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps per run (step 1 is left out of s/step)")
    parser.add_argument("--vocabs", default=",".join(map(str, SWEEP_VOCABS)), help="vocabularies of the sweep (c)")
    parser.add_argument("--pad", choices=("eos", "distinct"), default="eos",
                        help="eos: PAD == EOS like SmolLM2 (default); distinct: a <|pad|> special token inside the "
                             "vocabulary")
    parser.add_argument("--set", action="append", type=parse_set, default=[], metavar="[a,b,c:]KEY=VALUE",
                        help="an extra override for the named settings (default all), e.g. "
                             "a,c:actor.engine.zero_stage=0")
    parser.add_argument("--threads", type=int, default=0, help="threads per rank (default: 2 for 1 rank, 1 for 2)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds before a run is killed")
    parser.add_argument("--tag", default="", help="a name for this measurement (runs go to WORK/runs/TAG/)")
    parser.add_argument("--out", default=None, help="JSON of the figures (default WORK/figures_TAG.json); runs of "
                                                    "the same name in an existing file are replaced, others kept")
    parser.add_argument("--show", nargs="+", metavar="JSON", help="print the tables of these JSON files and exit")
    args = parser.parse_args()
    if args.show:
        for path in args.show:
            print_table(json.load(open(path)))
        return
    args.source = os.path.abspath(args.source)
    args.work = os.path.abspath(args.work)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if not set(only) <= {"a", "b", "c"}:
        parser.error("--only takes a comma list of a, b, c")
    os.makedirs(args.work, exist_ok=True)
    out = args.out or os.path.join(args.work, f"figures_{args.tag or 'run'}.json")

    model = build_model(args.work, VOCAB, args.pad)
    prompts, reward, lengths = write_data(args.work, model)
    print(f"prompts: {lengths['prompts']} chat rows, rendered {lengths['min']}-{lengths['max']} tokens "
          f"(mean {lengths['mean']:.1f}); budgets data.max_prompt_tokens={MAX_PROMPT_TOKENS} "
          f"data.max_seq_len={MAX_SEQ_LEN}, generation.max_new_tokens={NEW_TOKENS}", flush=True)

    def extra(setting: str) -> list[str]:
        return [kv for names, kv in args.set if setting in names]

    plan = []  # (name, setting, ranks, vocab, base overrides)
    if "a" in only:
        plan.append(("a", "a", 1, VOCAB, ["actor.engine.lora.enabled=true"]))
    if "b" in only:
        plan.append(("b", "b", 2, VOCAB, ["actor.engine.zero_stage=3", "reference.engine.zero_stage=3"]))
    if "c" in only:
        for v in (int(x) for x in args.vocabs.split(",") if x.strip()):
            plan.append((f"c{v}", "c", 1, v, ["actor.engine.lora.enabled=true"]))

    doc = json.load(open(out)) if os.path.exists(out) else {"runs": {}}
    doc["meta"] = {"tag": args.tag, "source": args.source, "commit": git_commit(args.source), "steps": args.steps,
                   "pad": args.pad, "prompt_tokens": lengths, "max_prompt_tokens": MAX_PROMPT_TOKENS,
                   "max_seq_len": MAX_SEQ_LEN, "new_tokens": NEW_TOKENS, "prompts_per_rank": PROMPTS_PER_RANK,
                   "samples_per_prompt": SAMPLES, "shape": SHAPE, "python": sys.executable,
                   "machine": f"{os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d %H:%M")}
    for name, setting, ranks, vocab, base in plan:
        model_dir = model if vocab == VOCAB else build_model(args.work, vocab, args.pad)
        overrides = base + extra(setting)
        res = run_setting(name, ranks, model_dir, overrides, args, (prompts, reward))
        res.update(vocab=vocab, pad=args.pad, steps=args.steps, source=args.source, commit=doc["meta"]["commit"])
        zero = "/".join(sorted({kv.split("=")[1] for kv in overrides if "engine.zero_stage=" in kv})) or "3 (default)"
        res["mode"] = f"ZeRO {zero}, " + ("LoRA" if "actor.engine.lora.enabled=true" in overrides else "full")
        doc["runs"][name] = res
        with open(out + ".tmp", "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(out + ".tmp", out)
    print_table({"meta": doc["meta"], "runs": {n: doc["runs"][n] for n, *_ in plan}})
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
