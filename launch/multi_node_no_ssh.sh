#!/usr/bin/env bash
# multi_node_no_ssh.sh — run one rlhf_ds step on several nodes WITHOUT ssh between them: start this script on every
# node (by hand, from your scheduler, or from a container orchestrator), each with its own NODE_RANK. Each copy runs
# `deepspeed --no_ssh --node_rank $NODE_RANK`, which starts that node's ranks; they meet at MASTER_ADDR:MASTER_PORT.
#
# Usage (on every node, same hostfile, same arguments):
#   NODE_RANK=0 MASTER_ADDR=node001 launch/multi_node_no_ssh.sh sft output_dir=/shared/runs/sft model=/shared/runs/pretrain
#   NODE_RANK=1 MASTER_ADDR=node001 launch/multi_node_no_ssh.sh sft output_dir=/shared/runs/sft model=/shared/runs/pretrain
# STEP defaults to "sft". The hostfile fixes the world: one line per node, in node-rank order, with its slots (ranks);
# with --no_ssh its names are only labels, but they must be distinct.
#
# Variables to edit (or set in the environment):
#   HOSTFILE         "<name> slots=<GPUs>" per node (default: launch/hostfile next to this script)
#   NODE_RANK        this node's line in the hostfile, from 0 (default: the line naming this host, by `hostname`)
#   MASTER_ADDR      address of node rank 0 that every node can reach (default: the first name in the hostfile)
#   MASTER_PORT      rendezvous port, the same on every node (default 29500)
#   CONFIG           optional YAML run config, passed as --config
#   OMP_NUM_THREADS  CPU threads per rank (default: this node's cores / its slots)
#   DEEPSPEED        launcher command (default: `deepspeed`, else `python -m deepspeed.launcher.runner`)
#   LAUNCHER_ARGS    extra deepspeed launcher options (word-split), e.g. "--ssh_port 2222" or "--include node001:0,1"
#   PYTHON           interpreter for the supervisor, `python -m rlhf_ds.engine.launcher` (default: python)
#   LOCAL_RANKS      ranks this node starts (default: its slots; set it when LAUNCHER_ARGS has --include/--exclude)
#   DRY_RUN=1        print the command instead of running it
#
# The launcher runs under rlhf_ds's supervisor, as `rlhf-ds --num-gpus` runs it: the exit status is non-zero when the
# launcher or a rank dies (128+N for a death by signal N; 1 when DeepSpeed's runner hides a killed launch.py as 0),
# SIGTERM/SIGUSR1 to this script reach the ranks (checkpoint, exit 75), and no rank outlives the launcher.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STEP=${1:-sft}
if (($# > 0)); then shift; fi

HOSTFILE=${HOSTFILE:-$HERE/hostfile}
[[ -f $HOSTFILE ]] || { echo "multi_node_no_ssh.sh: no hostfile at $HOSTFILE" >&2; exit 2; }
mapfile -t NAMES < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$HOSTFILE" | awk '{print $1}')
mapfile -t SLOTS < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$HOSTFILE" | sed -n 's/.*slots=\([0-9][0-9]*\).*/\1/p')
((${#NAMES[@]} > 0 && ${#NAMES[@]} == ${#SLOTS[@]})) || {
    echo "multi_node_no_ssh.sh: $HOSTFILE needs '<name> slots=<n>' lines" >&2; exit 2; }

if [[ -z ${NODE_RANK:-} ]]; then
    for i in "${!NAMES[@]}"; do
        if [[ ${NAMES[$i]} == "$(hostname)" || ${NAMES[$i]} == "$(hostname -s 2>/dev/null || true)" ]]; then
            NODE_RANK=$i
        fi
    done
    [[ -n ${NODE_RANK:-} ]] || {
        echo "multi_node_no_ssh.sh: set NODE_RANK (this host, $(hostname), is not named in $HOSTFILE)" >&2; exit 2; }
fi
((NODE_RANK >= 0 && NODE_RANK < ${#NAMES[@]})) || {
    echo "multi_node_no_ssh.sh: NODE_RANK=$NODE_RANK but $HOSTFILE has ${#NAMES[@]} node(s)" >&2; exit 2; }
MASTER_ADDR=${MASTER_ADDR:-${NAMES[0]}}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z ${DEEPSPEED:-} ]]; then
    if command -v deepspeed >/dev/null 2>&1; then DEEPSPEED=deepspeed; else DEEPSPEED="python -m deepspeed.launcher.runner"; fi
fi
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    OMP_NUM_THREADS=$(($(nproc) / SLOTS[NODE_RANK]))
    ((OMP_NUM_THREADS > 0)) || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS RLHF_DS_THREADS=${RLHF_DS_THREADS:-$OMP_NUM_THREADS}

STEP_ARGS=("$STEP")
if [[ -n ${CONFIG:-} ]]; then STEP_ARGS+=(--config "$CONFIG"); fi
STEP_ARGS+=("$@")

read -ra LAUNCHER <<<"$DEEPSPEED"
read -ra EXTRA <<<"${LAUNCHER_ARGS:-}"
CMD=("${LAUNCHER[@]}" --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
     --master_port "$MASTER_PORT" "${EXTRA[@]}" --no_local_rank --module rlhf_ds.cli "${STEP_ARGS[@]}")

SUPERVISOR=("${PYTHON:-python}" -m rlhf_ds.engine.launcher --ranks "${LOCAL_RANKS:-${SLOTS[NODE_RANK]}}" --)

if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "OMP_NUM_THREADS=$OMP_NUM_THREADS ${SUPERVISOR[*]} ${CMD[*]}"
    exit 0
fi
exec "${SUPERVISOR[@]}" "${CMD[@]}"
