#!/usr/bin/env bash
# multi_node_hostfile.sh — run one rlhf_ds step on several nodes from ONE shell: deepspeed reads the hostfile and
# starts the ranks on every node over ssh with pdsh.
#
# Usage:  launch/multi_node_hostfile.sh [STEP] [key.sub=value ...]
#   e.g.  HOSTFILE=launch/hostfile launch/multi_node_hostfile.sh sft output_dir=/shared/runs/sft model=/shared/runs/pretrain
# STEP defaults to "sft". Run it on the first node of the hostfile.
#
# Requirements: passwordless ssh from this node to every node in the hostfile (BatchMode, known host keys), pdsh
# installed here, the same checkout and Python environment at the same path on every node, and output_dir / model on a
# filesystem all nodes share (only global rank 0 writes the run's shared outputs).
#
# Variables to edit (or set in the environment):
#   HOSTFILE         "<host> slots=<GPUs>" per line (default: launch/hostfile next to this script)
#   MASTER_ADDR      rendezvous address every node can reach (default: the first host of the hostfile)
#   MASTER_PORT      rendezvous port (default 29500)
#   CONFIG           optional YAML run config, passed as --config
#   OMP_NUM_THREADS  CPU threads per rank (default: this node's cores / its slots)
#   FORWARD_VARS     variables copied to the remote ranks when set here (deepspeed itself forwards only PYTHON*,
#                    NCCL*, UCX*, ... and ~/.deepspeed_env or ./.deepspeed_env, whose lines are kept too)
#   DEEPSPEED        launcher command (default: `deepspeed`, else `python -m deepspeed.launcher.runner`)
#   LAUNCHER_ARGS    extra deepspeed launcher options (word-split), e.g. "--ssh_port 2222" or "--include node001:0,1"
#   PYTHON           interpreter for the supervisor, `python -m rlhf_ds.engine.launcher` (default: python)
#   DRY_RUN=1        print the environment file and the command instead of running
#
# The runner runs under rlhf_ds's supervisor: when it dies (or pdsh does), the status is non-zero (128+N for a death by
# signal N) and the pdsh and ssh processes it leaves are killed; every remote rank ends with its ssh session
# (RLHF_DS_END_WITH_SSH=1 in the environment file), so no rank outlives the launch.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STEP=${1:-sft}
if (($# > 0)); then shift; fi

HOSTFILE=${HOSTFILE:-$HERE/hostfile}
[[ -f $HOSTFILE ]] || { echo "multi_node_hostfile.sh: no hostfile at $HOSTFILE" >&2; exit 2; }
# hosts and slots, comments and blank lines skipped
mapfile -t HOST_LINES < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$HOSTFILE")
((${#HOST_LINES[@]} > 0)) || { echo "multi_node_hostfile.sh: $HOSTFILE lists no hosts" >&2; exit 2; }
read -r FIRST_HOST FIRST_SLOTS _ <<<"${HOST_LINES[0]}"
FIRST_SLOTS=${FIRST_SLOTS#slots=}
MASTER_ADDR=${MASTER_ADDR:-$FIRST_HOST}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z ${DEEPSPEED:-} ]]; then
    if command -v deepspeed >/dev/null 2>&1; then DEEPSPEED=deepspeed; else DEEPSPEED="python -m deepspeed.launcher.runner"; fi
fi
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    OMP_NUM_THREADS=$(($(nproc) / FIRST_SLOTS))
    ((OMP_NUM_THREADS > 0)) || OMP_NUM_THREADS=1
fi
RLHF_DS_THREADS=${RLHF_DS_THREADS:-$OMP_NUM_THREADS}
FORWARD_VARS=${FORWARD_VARS:-"WANDB_API_KEY WANDB_MODE WANDB_PROJECT WANDB_ENTITY HF_HOME HF_TOKEN HF_HUB_OFFLINE HF_DATASETS_OFFLINE TOKENIZERS_PARALLELISM GLOO_SOCKET_IFNAME TORCH_DISTRIBUTED_DEBUG"}

# The remote ranks get their environment from a deepspeed env file (DS_ENV_FILE): the usual .deepspeed_env lines
# plus the thread counts and FORWARD_VARS.
ENV_FILE=$(mktemp "${TMPDIR:-/tmp}/rlhf_ds-env.XXXXXX")
trap 'rm -f "$ENV_FILE"' EXIT
for f in "$HOME/.deepspeed_env" "./.deepspeed_env"; do
    if [[ -f $f ]]; then grep -v '^[[:space:]]*$' "$f" >>"$ENV_FILE" || true; fi
done
{
    echo "OMP_NUM_THREADS=$OMP_NUM_THREADS"
    echo "RLHF_DS_THREADS=$RLHF_DS_THREADS"
    echo "RLHF_DS_END_WITH_SSH=1"  # each remote rank stops when its ssh session ends (the runner here died)
    for v in $FORWARD_VARS; do
        if [[ -n ${!v:-} ]]; then echo "$v=${!v}"; fi
    done
} >>"$ENV_FILE"
export DS_ENV_FILE=$ENV_FILE OMP_NUM_THREADS RLHF_DS_THREADS

STEP_ARGS=("$STEP")
if [[ -n ${CONFIG:-} ]]; then STEP_ARGS+=(--config "$CONFIG"); fi
STEP_ARGS+=("$@")

read -ra LAUNCHER <<<"$DEEPSPEED"
read -ra EXTRA <<<"${LAUNCHER_ARGS:-}"
CMD=("${LAUNCHER[@]}" --hostfile "$HOSTFILE" --launcher pdsh --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     "${EXTRA[@]}" --no_local_rank --module rlhf_ds.cli "${STEP_ARGS[@]}")

# ranks here: none counted (they run under ssh sessions, even on this node; pdsh passes their status back)
SUPERVISOR=("${PYTHON:-python}" -m rlhf_ds.engine.launcher --ranks 0 --)

if [[ ${DRY_RUN:-0} == 1 ]]; then
    sed 's/^/env: /' "$ENV_FILE" | sed -E 's/^(env: [A-Z_]*(KEY|TOKEN)=).*/\1***/'
    echo "${SUPERVISOR[*]} ${CMD[*]}"
    exit 0
fi
"${SUPERVISOR[@]}" "${CMD[@]}"
