#!/usr/bin/env bash
# launch/slurm_local/up.sh SCRATCH [NNODES]: start a throwaway Slurm cluster on this machine.
#
# Debian's slurm-wlm (slurmctld, slurmd, slurm-client) + munge, started by hand as root with
# everything (config, state, logs, munge socket and key) under SCRATCH; NNODES > 1 emulates
# several nodes (n1, n2, ...) with one slurmd each on 127.0.0.1. Prints `export SLURM_CONF=...`.
# SCRATCH and every folder above it must be world-executable (munged checks it).
# Env: SLURM_LOCAL_AUTH (munge|none), SLURM_LOCAL_PORT (6817: slurmctld; slurmd use the next
# ports), SLURM_LOCAL_TIMEOUT (30 s to reach idle), SLURM_LOCAL_CRED_EXPIRE (10 s: fast requeue).
# Stop with launch/slurm_local/down.sh SCRATCH. Recipe: slurm-local.md (tested config).
set -euo pipefail
S=$(realpath -m "${1:?usage: up.sh SCRATCH [NNODES]}"); NN=${2:-1}
AUTH=${SLURM_LOCAL_AUTH:-munge}; PORT=${SLURM_LOCAL_PORT:-6817}; TMO=${SLURM_LOCAL_TIMEOUT:-30}
CREDEXP=${SLURM_LOCAL_CRED_EXPIRE:-10}
H=$(hostname -s); CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) - 1024 ))
mkdir -p "$S"/{state,log,run,jobs}
if [ "$AUTH" = munge ]; then
  M="$S/munge"; mkdir -p "$M"; chmod 0755 "$M"
  [ -s "$M/munge.key" ] || { dd if=/dev/urandom of="$M/munge.key" bs=1024 count=1 status=none; chmod 0400 "$M/munge.key"; }
  munged --socket="$M/munge.sock" --key-file="$M/munge.key" --pid-file="$M/munged.pid" \
         --log-file="$M/munged.log" --seed-file="$M/munged.seed"
  AUTHCONF="AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$M/munge.sock,cred_expire=$CREDEXP"
else
  AUTHCONF="AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=$CREDEXP"
fi
if [ "$NN" -eq 1 ]; then
  NAMES=("$H")
  HW=$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //; s/ ?RealMemory=[0-9]+//')
  NODES="NodeName=$H NodeAddr=127.0.0.1 Port=$((PORT+1)) $HW RealMemory=$MEM State=UNKNOWN"
else
  NAMES=(); NODES=""; PER=$(( CPUS / NN > 0 ? CPUS / NN : 1 )); PMEM=$(( MEM / NN ))
  for i in $(seq 1 "$NN"); do
    NAMES+=("n$i")
    NODES+="NodeName=n$i NodeHostname=$H NodeAddr=127.0.0.1 Port=$((PORT+i)) CPUs=$PER RealMemory=$PMEM State=UNKNOWN"$'\n'
    getent hosts "n$i" >/dev/null || echo "127.0.0.1 n$i" >> /etc/hosts
  done
fi
cat > "$S/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$H(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
$AUTHCONF
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerParameters=batch_sched_delay=0,bf_interval=1
SlurmdTimeout=30
KillWait=5
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool-%n
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd-%n.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd-%n.log
$NODES
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
export SLURM_CONF="$S/slurm.conf"
slurmctld -c -f "$SLURM_CONF"
for n in "${NAMES[@]}"; do
  mkdir -p "$S/spool-$n"
  if [ "$NN" -eq 1 ]; then slurmd -f "$SLURM_CONF"; else slurmd -N "$n" -f "$SLURM_CONF"; fi
done
deadline=$(( $(date +%s) + TMO ))
until [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -cx idle)" = "$NN" ]; do
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "slurm-up: not idle after ${TMO}s" >&2; sinfo >&2 || true; tail -n 20 "$S"/log/*.log >&2 || true; exit 1
  fi
  sleep 0.2
done
echo "export SLURM_CONF=$SLURM_CONF"
