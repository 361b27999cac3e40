#!/usr/bin/env bash
# Single node: one process per GPU under torchrun --standalone (a local rendezvous on a free port).
#
#   NPROC_PER_NODE=8 launch/single_node.sh --config vit_h14_in1k_ep300 --run-dir runs/vith14 \
#       data.shards=/data/in1k-shards distributed.backend=fsdp2
#
# Everything after the script name goes to scalejepa.train (--config, --run-dir, --resume,
# section.key=value overrides). Environment:
#   NPROC_PER_NODE  processes (default: the GPUs nvidia-smi lists, else 1)
#   MAX_RESTARTS    torchrun restarts of the whole worker group after a failure (default 0);
#                   a restart continues from the last committed checkpoint (--resume auto)
#   DRY_RUN=1       print the command, run nothing
# Tunables (NCCL, allocator, threads): see launch/README.md.
set -euo pipefail

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
    [[ "${NPROC_PER_NODE:-0}" -gt 0 ]] || NPROC_PER_NODE=1
fi
PYTHON=${PYTHON:-python}

cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC_PER_NODE"
     --max-restarts="${MAX_RESTARTS:-0}" --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
     -m scalejepa.train "$@")
echo "+ ${cmd[*]}"
[[ -n "${DRY_RUN:-}" ]] && exit 0
exec "${cmd[@]}"
