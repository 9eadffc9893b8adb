#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (Debian's slurmctld + slurmd + munge), owned by this script.
#
#   bench/slurm/cluster.sh start    install the packages if missing, write the config, start the daemons,
#                                   wait until the node is idle (idempotent: a running cluster is left alone)
#   bench/slurm/cluster.sh env      print `export SLURM_CONF=...` (eval it before sbatch/squeue/snakemake)
#   bench/slurm/cluster.sh status   daemons and sinfo
#   bench/slurm/cluster.sh stop     kill exactly the daemons this script started (by their pid files) and
#                                   remove the state directory
#
# Everything lives in $PRUNING_SLURM_DIR (default /tmp/pruning-slurm): slurm.conf, the munge key and socket,
# pid files, logs, controller state and the slurmd spool. No system service is started (munged runs on its own
# socket with its own key). The one thing outside that directory is the link /etc/slurm/slurm.conf -> its
# slurm.conf (see ETC_CONF below), made only where no slurm.conf exists. Needs root (apt-get, slurmd).
# Ports: $PRUNING_SLURM_PORT (slurmctld, default 6817) and the one after it (slurmd).
# Exit status 3: the packages are missing and cannot be installed (no apt-get, apt-get failed, not root).
set -euo pipefail

DIR=${PRUNING_SLURM_DIR:-/tmp/pruning-slurm}
PORT=${PRUNING_SLURM_PORT:-6817}
CONF=$DIR/slurm.conf
# Inside a job, snakemake's slurm-jobstep executor runs `srun` with every SLURM_* variable removed, SLURM_CONF
# included, so srun reads the compiled-in default path: the cluster's slurm.conf is linked there (only if no
# slurm.conf exists there already; `stop` removes the link only if it is still ours).
ETC_CONF=${PRUNING_SLURM_ETC_CONF:-/etc/slurm/slurm.conf}
SOCK=$DIR/munge/munge.socket.2
NODE=$(hostname -s)
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "cluster.sh: $*" >&2; }

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || { log "apt-get not found; cannot install ${missing[*]}"; return 3; }
  log "installing ${missing[*]}"
  # Keep the packages' postinst from starting system-wide munge/slurm services: the cluster's daemons are
  # the ones started below, with their own config. policy-rc.d is only created (and removed) if absent.
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [ ! -e $policy ]; then
    printf '#!/bin/sh\nexit 101\n' >$policy && chmod +x $policy && own_policy=1
  fi
  local rc=0
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
    || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; }
  } >"${TMPDIR:-/tmp}/pruning-slurm-apt.log" 2>&1 || rc=$?
  [ $own_policy -eq 1 ] && rm -f $policy
  if [ $rc -ne 0 ]; then
    log "apt-get install failed (see ${TMPDIR:-/tmp}/pruning-slurm-apt.log)"; tail -5 "${TMPDIR:-/tmp}/pruning-slurm-apt.log" >&2
    return 3
  fi
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_config() {
  mkdir -p "$DIR"/{munge,state,spool,log}
  chmod 755 "$DIR" "$DIR/munge"  # munged: its socket's directory must be searchable by everyone
  # the node as slurmd sees it (CPUs, sockets, cores, threads, memory), minus 512 MiB for the daemons
  local hw mem
  hw=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ RealMemory=[0-9]*//')
  mem=$(slurmd -C | head -1 | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  mem=$((mem > 2048 ? mem - 512 : mem))
  cat >"$CONF" <<EOF
# Written by bench/slurm/cluster.sh: a one-node cluster for tests. Do not edit, it is rewritten on start.
ClusterName=pruning
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
# munge with its own key and socket (no system munged)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# no cgroups (this may be a container or a VM without delegated cgroups): processes tracked by parent pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
# no slurmdbd: sacct only says "Slurm accounting storage is disabled". Job states come from squeue, which
# lists a finished job for MinJobAge seconds (the snakemake plugin's squeue mode wants >= 3 status intervals)
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
InactiveLimit=0
KillWait=10
NodeName=$NODE NodeAddr=127.0.0.1 $hw RealMemory=$mem State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  if [ "$(id -u)" != 0 ]; then log "needs root (apt-get, slurmd)"; return 3; fi
  install_packages
  export SLURM_CONF=$CONF
  if alive "$DIR/munged.pid" && alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then
    log "already running ($DIR)"
  else
    if [ -d "$DIR" ]; then stop; fi
    if { [ -e "$ETC_CONF" ] || [ -L "$ETC_CONF" ]; } && [ "$(readlink "$ETC_CONF")" != "$CONF" ]; then
      log "$ETC_CONF exists and is not this cluster's (-> $(readlink "$ETC_CONF" || echo "a file")); not touching it"; return 4
    fi
    local p
    for p in "$PORT" $((PORT + 1)); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        log "port $p is in use (another slurmctld/slurmd?); set PRUNING_SLURM_PORT"; return 4
      fi
    done
    write_config
    mkdir -p "$(dirname "$ETC_CONF")"
    ln -sfn "$CONF" "$ETC_CONF"
    [ -f "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key" --force
    chmod 400 "$DIR/munge/munge.key"
    munged --force --socket="$SOCK" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munged.pid" \
      --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
    slurmctld -f "$CONF" -i
    slurmd -f "$CONF" -N "$NODE"
  fi
  local i state
  for i in $(seq 60); do
    state=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null || true)
    if [ "$state" = idle ] || [ "$state" = mixed ] || [ "$state" = allocated ]; then
      log "node $NODE $state; export SLURM_CONF=$CONF"
      return 0
    fi
    sleep 1
  done
  log "node not idle after 60 s (state '${state:-?}'); logs in $DIR/log"
  tail -20 "$DIR"/log/*.log >&2 || true
  return 1
}

stop() {
  local d pid jobs
  # cancel what is still queued or running on this cluster, so no job step outlives its slurmd
  if alive "$DIR/slurmctld.pid"; then
    jobs=$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      SLURM_CONF=$CONF scancel $jobs || true
      for _ in $(seq 30); do [ -z "$(SLURM_CONF=$CONF squeue -h -t R,CG -o %i 2>/dev/null)" ] && break; sleep 1; done
    fi
  fi
  for d in slurmd slurmctld munged; do
    if alive "$DIR/$d.pid"; then
      pid=$(cat "$DIR/$d.pid")
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
    fi
  done
  if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$CONF" ]; then rm -f "$ETC_CONF"; fi
  case "$DIR" in /|"") return 1 ;; esac
  rm -rf "$DIR"
  log "stopped, $DIR removed"
}

status() {
  local d rc=0
  for d in munged slurmctld slurmd; do
    if alive "$DIR/$d.pid"; then echo "$d: running (pid $(cat "$DIR/$d.pid"))"; else echo "$d: not running"; rc=1; fi
  done
  [ $rc -eq 0 ] && SLURM_CONF=$CONF sinfo
  return $rc
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
