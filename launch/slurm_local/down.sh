#!/usr/bin/env bash
# launch/slurm_local/down.sh SCRATCH: stop the cluster that up.sh started in SCRATCH (only the
# PIDs in its own pidfiles), after cancelling its jobs.
S=$(realpath -m "${1:?usage: down.sh SCRATCH}")
[ -f "$S/slurm.conf" ] && SLURM_CONF="$S/slurm.conf" timeout 5 scancel --user=root 2>/dev/null || true
pids=(); for f in "$S"/run/slurmd-*.pid "$S"/run/slurmctld.pid "$S"/munge/munged.pid; do
  [ -s "$f" ] && pids+=("$(cat "$f")"); done
for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
for _ in $(seq 50); do alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ "$alive" = 0 ] && break; sleep 0.2; done
for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && kill -KILL "$p"; done
exit 0
