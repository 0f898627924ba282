#!/usr/bin/env bash
# One-GPU smoke check of rlhf_ds on an offline machine (H100/H200), run from the repo root with $OUT set to a folder
# whose files are kept. Packages the machine lacks come as wheels in ./.whl (deepspeed 0.19.8 built here as a pure
# python wheel with DS_BUILD_OPS=0, so any op is JIT-compiled; its needs; transformers/peft at the versions we test).
#
#   bash benchmarks/gpu_check.sh
#
# Parts (each under `timeout`, each part's exit status in $OUT/status.txt; a failing part does not stop the others):
#   env        versions, the GPU, which transformers/deepspeed are imported             -> $OUT/env.log
#   pipe_fp32  the tiny built-in pipeline (pretrain, SFT, RM, PPO, eval) on 1 GPU, fp32  -> $OUT/pipe_fp32.log,
#              its summary.json                                                            $OUT/pipe_summary.json
#   ppo_bf16   PPO alone through the deepspeed launcher (--num-gpus 1), every role bf16, on (a)'s SFT and RM
#                                                                                       -> $OUT/ppo_bf16.log,
#                                                                                          $OUT/ppo_bf16_results.json
#   resume     benchmarks/resume.py on one GPU: PPO stopped by SIGTERM after step 3, resumed, compared -> $OUT/resume.log
# At most 8 files come back from $OUT: keep it to these (and resume.log).
# Time: the whole script stops starting parts after GPU_CHECK_BUDGET_S seconds (default 480); each part's timeout is
# its cap or what is left of that budget, whichever is smaller. Exit status: 0 when every part that ran passed.
set -uo pipefail

OUT=${OUT:?set OUT to an output folder}
mkdir -p "$OUT"
STATUS="$OUT/status.txt"
: >"$STATUS"
BUDGET=${GPU_CHECK_BUDGET_S:-480}
DEADLINE=$((SECONDS + BUDGET))
FAILED=0
PIPE_DIR=/tmp/gpu_pipe
PPO_DIR=/tmp/gpu_ppo_bf16

# ---- install the carried wheels, environment for every child process (pipeline steps, deepspeed launcher, ranks) -----
if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/env.log" 2>&1; then
  echo "install rc=1 (pip install of .whl/*.whl failed; nothing else ran)" | tee -a "$STATUS"
  tail -n 40 "$OUT/env.log"
  exit 1
fi
echo "install rc=0 secs=$SECONDS" >>"$STATUS"
export PYTHONPATH="/tmp/site:$PWD"
export PATH="/tmp/site/bin:$PATH"  # the `deepspeed` console script (launcher.py falls back to -m deepspeed.launcher.runner)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=/tmp/hf_home
export DS_ACCELERATOR=cuda                      # never fall back to CPU silently
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
export TQDM_MININTERVAL=5                       # fewer progress-bar lines in the logs

# run_part NAME CAP_SECONDS CMD...: CMD under timeout (the smaller of CAP and the time left), output appended to
# $OUT/NAME.log, "NAME rc=.. secs=.." appended to status.txt; on failure the log's tail goes to stdout.
run_part() {
  local name=$1 cap=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  local limit=$((cap < left ? cap : left))
  if ((limit < 20)); then
    echo "$name rc=skipped (out of the ${BUDGET}s budget)" | tee -a "$STATUS"
    FAILED=1
    return 1
  fi
  local log="$OUT/$name.log" t0=$SECONDS rc note=""
  echo "=== $name (timeout ${limit}s): $*" >>"$log"
  timeout -k 15 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  if ((rc == 124 || rc == 137)); then
    note=" TIMEOUT after ${limit}s"
  fi
  echo "$name rc=$rc secs=$((SECONDS - t0))$note" | tee -a "$STATUS"
  if ((rc != 0)); then
    FAILED=1
    echo "--- last 60 lines of $name.log"
    tail -n 60 "$log"
  fi
  return "$rc"
}

# ---- versions -----------------------------------------------------------------------------------------------------------
{
  echo "=== nvidia-smi"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  echo "deepspeed script: $(command -v deepspeed || echo 'not on PATH')"
} >>"$OUT/env.log"
run_part env 90 python3 - <<'EOF'
import importlib, importlib.metadata as md, sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
          "bf16", torch.cuda.is_bf16_supported(), "nccl", torch.cuda.nccl.version())
import deepspeed
from deepspeed.accelerator import get_accelerator
print("deepspeed", deepspeed.__version__, deepspeed.__file__, "accelerator", get_accelerator()._name)
for name in ("transformers", "peft", "accelerate", "tokenizers", "huggingface_hub", "safetensors", "pydantic",
             "datasets", "numpy", "pyarrow", "fsspec", "matplotlib"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', None) or md.version(name)} {mod.__file__}")
    except Exception as e:  # report, do not stop: only some of these are needed by the parts below
        print(f"{name} IMPORT FAILED: {type(e).__name__}: {e}")
import rlhf_ds.cli, rlhf_ds.engine.strategy  # noqa: E401  the package imports with deepspeed
print("rlhf_ds", rlhf_ds.__file__)
assert torch.cuda.is_available(), "no CUDA device visible"
EOF
cat "$OUT/env.log"

# ---- (a) the tiny built-in pipeline on one GPU, fp32 (the overrides of tests/test_pipeline.py's TINY) -----------------
# num_gpus=1: every step is one plain process (no launcher), world of one, NCCL.
TINY=(pretrain.arch.n_layers=2 pretrain.arch.hidden=64 pretrain.arch.n_heads=2 pretrain.arch.vocab_size=400
  pretrain.arch.max_positions=96 pretrain.train.max_steps=30 sft.train.max_steps=20 rm.train.max_steps=20
  ppo.ppo.steps=3 eval.max_prompts=32)
rm -rf "$PIPE_DIR"
run_part pipe_fp32 210 python3 -m rlhf_ds.cli pipeline "output_dir=$PIPE_DIR" num_gpus=1 pretrain_num_gpus=1 "${TINY[@]}"
PIPE_RC=$?
if ((PIPE_RC != 0)); then  # the step's own rank logs hold what the pipeline's output may not
  for f in "$PIPE_DIR"/*/logs/rank*.log; do
    [ -f "$f" ] && { echo "--- tail $f"; tail -n 30 "$f"; } >>"$OUT/pipe_fp32.log"
  done
fi
grep -h "INFO .*world size" "$OUT/pipe_fp32.log" | sort -u  # each step's device (cuda:0 expected)
if [ -f "$PIPE_DIR/summary.json" ]; then
  cp "$PIPE_DIR/summary.json" "$OUT/pipe_summary.json"
  python3 - "$PIPE_DIR/summary.json" <<'EOF' | tee -a "$OUT/pipe_fp32.log"
import json, sys
s = json.load(open(sys.argv[1]))
def get(path):
    node = s
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
print("pipeline steps:", s.get("steps"))
for key in ("sft.eval_loss_start", "sft.eval_loss", "rm.eval_accuracy", "rm.bayes_ceiling", "ppo.reward_mean",
            "ppo.kl", "ppo.seconds", "eval.gold_reward.sft", "eval.gold_reward.ppo", "eval.rm_score.sft",
            "eval.rm_score.ppo", "eval.win_rate_ppo_vs_sft"):
    print(f"  {key:28s} {get(key)}")
for key, value in (s.get("timing") or {}).items():
    print(f"  timing.{key:21s} {value:.1f}")
EOF
fi

# ---- (b) PPO alone, bf16 for all four roles, through the deepspeed launcher (--num-gpus 1) -----------------------------
if [ -f "$PIPE_DIR/sft/results.json" ] && [ -f "$PIPE_DIR/rm/results.json" ]; then
  rm -rf "$PPO_DIR"
  BF16=(actor.engine.precision=bf16 critic.engine.precision=bf16 reference.engine.precision=bf16
    reward.engine.precision=bf16)
  run_part ppo_bf16 120 python3 -m rlhf_ds.cli ppo --num-gpus 1 "output_dir=$PPO_DIR" "actor.model=$PIPE_DIR/sft" \
    "reward.model=$PIPE_DIR/rm" ppo.steps=10 "${BF16[@]}"
  if [ -f "$PPO_DIR/results.json" ]; then
    cp "$PPO_DIR/results.json" "$OUT/ppo_bf16_results.json"
    python3 - "$PPO_DIR" <<'EOF' | tee -a "$OUT/ppo_bf16.log"
import json, os, sys
d = sys.argv[1]
r = json.load(open(os.path.join(d, "results.json")))
print("ppo bf16 results:", json.dumps(r, sort_keys=True))
rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl")) if line.strip()]
steps = [x for x in rows if "ppo/reward" in x]
later = steps[1:] or steps  # step 1 carries warm-up
for key in ("ppo/reward", "ppo/kl", "timing/generation", "timing/scoring", "timing/training",
            "perf/generation_tokens_per_s", "perf/training_tokens_per_s"):
    vals = [x[key] for x in later if isinstance(x.get(key), (int, float))]
    if vals:
        print(f"  {key:30s} mean over steps 2..: {sum(vals) / len(vals):.4g}  (first step {steps[0].get(key)})")
cfg = os.path.join(d, "model", "config.json")
if os.path.isfile(cfg):
    c = json.load(open(cfg))
    print("  saved actor dtype:", c.get("dtype", c.get("torch_dtype")))
EOF
  fi
  grep -h "INFO .*world size" "$OUT/ppo_bf16.log" | sort -u
else
  echo "ppo_bf16 rc=skipped (no SFT/RM from pipe_fp32)" | tee -a "$STATUS"
  FAILED=1
fi

# ---- (c) checkpoint / resume on the GPU: SIGTERM after step 3, resume, compare with the uninterrupted run -----------
# (one GPU: one rank; fp32 PPO on (a)'s SFT and RM). Prints per-step equality and the largest relative difference.
resume_check() {
  if [[ ! -d $PIPE_DIR/sft/model || ! -d $PIPE_DIR/rm/model ]]; then
    echo "resume skipped: pipeline outputs missing" | tee -a "$STATUS"
    FAILED=1
    return
  fi
  run_part resume 150 python3 benchmarks/resume.py --actor "$PIPE_DIR/sft" --reward "$PIPE_DIR/rm" --ranks 1 \
    --steps 8 --stop-after 3 --out /tmp/gpu_resume ppo.rollout_batch_size=8 ppo.micro_batch_size=4 ppo.ema_decay=0.9
}
resume_check

# ---- what ran ---------------------------------------------------------------------------------------------------------
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>/dev/null |
  sed 's/^/still on the GPU: /'
echo "=== status (total ${SECONDS}s)"
cat "$STATUS"
exit "$FAILED"
