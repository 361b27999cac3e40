#!/usr/bin/env bash
# Several nodes, c10d rendezvous: run this same command on every node.
#
#   NNODES=4 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0.cluster:29500 RDZV_ID=vith14-run1 \
#       launch/multi_node.sh --config vit_h14_in1k_ep300 --run-dir /shared/runs/vith14 \
#       data.shards=/data/in1k-shards distributed.backend=fsdp2 distributed.shard_group_size=8
#
# The run directory must be on storage every node sees (checkpoints are written by all ranks).
# distributed.shard_group_size=<GPUs per node> gives HSDP: shard within a node, replicate
# across nodes (far less inter-node traffic than sharding over every GPU).
# Environment:
#   NNODES          nodes (required); "MIN:MAX" for an elastic range
#   NPROC_PER_NODE  processes per node (default: the GPUs nvidia-smi lists, else 1)
#   RDZV_ENDPOINT   host:port of the rendezvous, reachable from every node (required; any
#                   node's address, usually the first; the port must be free there)
#   RDZV_ID         one id per job, the same on every node (default: scalejepa)
#   MAX_RESTARTS    restarts of the worker group after a failure (default 3); each
#                   restart continues from the last committed checkpoint (--resume auto)
#   DRY_RUN=1       print the command, run nothing
# Tunables (NCCL, allocator, threads): see launch/README.md.
set -euo pipefail

: "${NNODES:?set NNODES (e.g. 4)}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the rendezvous (e.g. the first node:29500)}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
    [[ "${NPROC_PER_NODE:-0}" -gt 0 ]] || NPROC_PER_NODE=1
fi
PYTHON=${PYTHON:-python}

cmd=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE"
     --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-scalejepa}"
     --max-restarts="${MAX_RESTARTS:-3}" --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
     -m scalejepa.train --resume auto "$@")
echo "+ [$(hostname)] ${cmd[*]}"
[[ -n "${DRY_RUN:-}" ]] && exit 0
exec "${cmd[@]}"
