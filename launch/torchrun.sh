#!/usr/bin/env bash
# launch/torchrun.sh CONFIG [key=value ...]: run `python -m train CONFIG overrides` under torchrun.
#
# One node (default): NPROC_PER_NODE processes (default: the GPU count, 1 without GPUs).
# Many nodes: run this once per node with the same NNODES, MASTER_ADDR, MASTER_PORT and each
# node's NODE_RANK (0 .. NNODES-1), or give RDZV_ENDPOINT=host:port (c10d rendezvous; node ranks
# are then assigned by the rendezvous, RDZV_ID names the job).
#
# Environment (all optional):
#   NNODES (1)  NODE_RANK (0)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)  NPROC_PER_NODE
#   RDZV_ENDPOINT  RDZV_ID (difftron, or $SLURM_JOB_ID)  PYTHON (.venv/bin/python, else python3)
#   LAUNCH_MODULE (train: the module every rank runs)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT (120: seconds torchrun waits after forwarding SIGTERM)
#   IFNAME: the network interface between nodes (e.g. ib0, eth0); sets NCCL_SOCKET_IFNAME and
#     GLOO_SOCKET_IFNAME (gloo carries the CPU-tensor collectives) unless they are set.
#   NCCL_*, GLOO_*, CUDA_DEVICE_MAX_CONNECTIONS, OMP_NUM_THREADS pass through to every rank
#     (the run sets CUDA_DEVICE_MAX_CONNECTIONS=1 itself when parallel.tp > 1).
#
# Signals: SIGUSR1 (the preemption warning, e.g. Slurm's --signal), SIGTERM, SIGINT (Ctrl-C) and
# SIGHUP (as SIGTERM) are forwarded to the training processes, which all finish the same step,
# save a checkpoint and exit 0; then this script exits 0 (also when torchrun itself was signalled
# and reports a failure, as long as every local rank saved and stopped cleanly).
set -uo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then usage; [ $# -ge 1 ]; exit $?; fi
CONFIG=$1; shift
if [ ! -f "$CONFIG" ]; then echo "error: config file not found: $CONFIG" >&2; exit 2; fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [ -z "${NPROC_PER_NODE:-}" ]; then
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then NPROC_PER_NODE=$SLURM_GPUS_ON_NODE
  elif command -v nvidia-smi >/dev/null 2>&1 && n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') && [ "$n" -gt 0 ]; then NPROC_PER_NODE=$n
  else NPROC_PER_NODE=1; fi
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
for v in NNODES NODE_RANK NPROC_PER_NODE; do
  case ${!v} in ''|*[!0-9]*) echo "error: $v must be a non-negative integer, got '${!v}'" >&2; exit 2;; esac
done
if [ "$NODE_RANK" -ge "$NNODES" ]; then echo "error: NODE_RANK ($NODE_RANK) must be < NNODES ($NNODES)" >&2; exit 2; fi

ARGS=(--nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE")
if [ -n "${RDZV_ENDPOINT:-}" ]; then
  ARGS+=(--rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-${SLURM_JOB_ID:-difftron}}")
elif [ "$NNODES" = 1 ] && [ -z "${MASTER_ADDR:-}" ] && [ -z "${MASTER_PORT:-}" ]; then
  ARGS+=(--standalone)  # one node: a free local port, nothing to configure
else
  ARGS+=(--node-rank="$NODE_RANK" --master-addr="${MASTER_ADDR:-127.0.0.1}" --master-port="${MASTER_PORT:-29500}")
fi
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ -n "${IFNAME:-}" ]; then
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$IFNAME} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$IFNAME}
fi
NETVARS=$(env | grep -E '^(NCCL_SOCKET_IFNAME|GLOO_SOCKET_IFNAME|NCCL_IB_HCA|CUDA_DEVICE_MAX_CONNECTIONS)=' | tr '\n' ' ')

echo "torchrun.sh: node $NODE_RANK/$NNODES, $NPROC_PER_NODE proc(s), $(hostname -s): ${LAUNCH_MODULE:-train} $CONFIG $*${NETVARS:+ [$NETVARS]}" >&2

# Each rank that stops cleanly on a signal (after saving) leaves a file here (train/__main__.py).
STOP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/difftron-stop.XXXXXX") || exit 1
export DIFFTRON_STOP_DIR=$STOP_DIR
trap 'rm -rf "$STOP_DIR"' EXIT

# torchrun runs in the background with SIGUSR1 ignored (an unhandled SIGUSR1 would kill it and,
# under srun, the whole step); the ranks inherit "ignored" until the trainer installs its handler.
# It gets its own session (setsid) so that a terminal's Ctrl-C reaches only this script, which
# forwards it to the ranks: torchrun itself, when signalled, kills its ranks after a timeout and
# exits 1 even when they saved.
SETSID=; command -v setsid >/dev/null 2>&1 && SETSID=setsid
( trap '' USR1; exec $SETSID "$PYTHON" -m torch.distributed.run "${ARGS[@]}" -m "${LAUNCH_MODULE:-train}" "$CONFIG" "$@" ) &
AGENT=$!

forward() {  # send a signal to the training processes (torchrun's children)
  local sig=$1 kids
  kids=$(pgrep -P "$AGENT" 2>/dev/null || ps -o pid= --ppid "$AGENT" 2>/dev/null || true)
  echo "torchrun.sh: SIG$sig -> ranks ${kids//$'\n'/ }" >&2
  if [ -n "$kids" ]; then
    kill -s "$sig" $kids 2>/dev/null
  elif [ "$sig" != USR1 ]; then  # no ranks yet: stop torchrun itself
    kill -s "$sig" "$AGENT" 2>/dev/null
  fi
  return 0
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward TERM' HUP

rc=0
wait "$AGENT"; rc=$?
while kill -0 "$AGENT" 2>/dev/null; do wait "$AGENT"; rc=$?; done  # a trap interrupted the wait
if [ "$rc" -ne 0 ]; then
  stopped=$(find "$STOP_DIR" -name 'rank-*' 2>/dev/null | wc -l)
  if [ "$stopped" -ge "$NPROC_PER_NODE" ] && [ "$NPROC_PER_NODE" -gt 0 ]; then
    echo "torchrun.sh: torchrun exited $rc after a signal, but all $stopped rank(s) saved and stopped cleanly; exiting 0" >&2
    rc=0
  fi
fi
exit "$rc"
