#!/usr/bin/env bash
# single_node.sh — run one rlhf_ds step on this machine, one rank per GPU, with the deepspeed launcher.
#
# Usage:  launch/single_node.sh [STEP] [key.sub=value ...]
#   e.g.  launch/single_node.sh sft output_dir=runs/sft model=runs/pretrain
#         NUM_GPUS=4 CONFIG=sft.yaml launch/single_node.sh sft train.max_steps=500
# STEP defaults to "sft"; without overrides the step's config defaults apply. Run it from the project checkout (or
# anywhere once `pip install -e .` is done).
#
# Variables to edit (or set in the environment):
#   NUM_GPUS         ranks to start (default: GPUs listed by nvidia-smi; without GPUs: 1 CPU rank)
#   CONFIG           optional YAML run config, passed as --config
#   MASTER_ADDR      rendezvous address (default 127.0.0.1)
#   MASTER_PORT      rendezvous port (default 29500; give each job on a shared machine its own)
#   OMP_NUM_THREADS  CPU threads per rank (default: cores / NUM_GPUS, so CPU ranks do not oversubscribe the cores)
#   DEEPSPEED        launcher command (default: `deepspeed`, else `python -m deepspeed.launcher.runner`)
#   LAUNCHER_ARGS    extra deepspeed launcher options (word-split), e.g. "--bind_cores_to_rank"
#   PYTHON           interpreter for the supervisor, `python -m rlhf_ds.engine.launcher` (default: python)
#   DRY_RUN=1        print the command instead of running it
#
# The launcher runs under rlhf_ds's supervisor, as `rlhf-ds --num-gpus` runs it: the exit status is non-zero when the
# launcher or a rank dies (128+N for a death by signal N; 1 when DeepSpeed's runner hides a killed launch.py as 0),
# SIGTERM/SIGUSR1 to this script reach the ranks (checkpoint, exit 75), and no rank outlives the launcher.
set -euo pipefail

STEP=${1:-sft}
if (($# > 0)); then shift; fi

if [[ -z ${NUM_GPUS:-} ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        NUM_GPUS=$(nvidia-smi -L | grep -c '^GPU')
    else
        NUM_GPUS=1
    fi
fi
((NUM_GPUS > 0)) || { echo "single_node.sh: NUM_GPUS must be > 0" >&2; exit 2; }
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z ${DEEPSPEED:-} ]]; then
    if command -v deepspeed >/dev/null 2>&1; then DEEPSPEED=deepspeed; else DEEPSPEED="python -m deepspeed.launcher.runner"; fi
fi
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    OMP_NUM_THREADS=$(($(nproc) / NUM_GPUS))
    ((OMP_NUM_THREADS > 0)) || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS RLHF_DS_THREADS=${RLHF_DS_THREADS:-$OMP_NUM_THREADS}

STEP_ARGS=("$STEP")
if [[ -n ${CONFIG:-} ]]; then STEP_ARGS+=(--config "$CONFIG"); fi
STEP_ARGS+=("$@")

read -ra LAUNCHER <<<"$DEEPSPEED"
read -ra EXTRA <<<"${LAUNCHER_ARGS:-}"
CMD=("${LAUNCHER[@]}" --num_gpus "$NUM_GPUS" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     "${EXTRA[@]}" --no_local_rank --module rlhf_ds.cli "${STEP_ARGS[@]}")

SUPERVISOR=("${PYTHON:-python}" -m rlhf_ds.engine.launcher --ranks "$NUM_GPUS" --)

if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "OMP_NUM_THREADS=$OMP_NUM_THREADS ${SUPERVISOR[*]} ${CMD[*]}"
    exit 0
fi
exec "${SUPERVISOR[@]}" "${CMD[@]}"
