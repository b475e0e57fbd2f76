#!/usr/bin/env bash
# A real single-node Slurm (munge, MariaDB + slurmdbd so `sacct` works, slurmctld, slurmd) for tests, CI
# and trying the slurm executor locally. Debian 12 / Slurm 22.05, run as root, no systemd needed.
#
#   scripts/slurm_local.sh start          install what is missing (apt), write configs, start the daemons,
#                                         wait for the node to be idle. A no-op when everything already runs.
#   scripts/slurm_local.sh stop [--wipe]  cancel leftover jobs, stop the daemons it started, by PID
#                                         (SIGTERM, SIGKILL after a few seconds). --wipe also deletes the
#                                         state dir (job ids then restart at 1, the accounting DB is empty).
#   scripts/slurm_local.sh status         which daemons run, `sinfo`, whether `sacct` works; exit 0 iff all up.
#
# State (configs, spool, controller state, MariaDB datadir, logs, pid files, jobcomp file) lives in
# $SLURM_LOCAL_DIR (default /tmp/slurm-local) and is kept across stop/start. /etc/slurm/slurm.conf and
# /etc/slurm/slurmdbd.conf are symlinks to the files there, so plain sbatch/squeue/sacct/scontrol/scancel work
# for any process without extra environment variables.
#
# Knobs (environment):
#   SLURM_LOCAL_DIR      state dir (default /tmp/slurm-local)
#   SLURM_LOCAL_CPUS     CPUs the node advertises (default: max(8, real CPUs)). More than the real count is
#                        allowed (SlurmdParameters=config_overrides) so several 1-CPU jobs run at once on a
#                        2-core CI machine; set it to the real count to schedule strictly.
#   SLURM_LOCAL_GPUS     fake GPUs the node advertises as gres/gpu (default 0: no GRES at all), backed by
#                        /dev/null-like device nodes: --gres=gpu:N / --gpus=N jobs schedule and get
#                        CUDA_VISIBLE_DEVICES=0..N-1, but there is no GPU behind it. Takes effect on a start after stop.
#   SLURM_LOCAL_DB_PORT  MariaDB TCP port on 127.0.0.1 (default 3307, away from a system MariaDB's 3306)
#   SLURM_LOCAL_TIMEOUT  seconds to wait for each daemon / for the node to become idle (default 60)
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
DB_PORT=${SLURM_LOCAL_DB_PORT:-3307}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
ETC=/etc/slurm
CLUSTER=ci
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stop goes in reverse
# + systemd: only for `systemd-analyze verify|security` on config/evaluator.service (tests/test_systemd_unit.py);
# nothing here runs systemd as init
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server systemd)

log() { echo "[slurm-local] $*"; }
die() { echo "[slurm-local] ERROR: $*" >&2; exit 1; }

pidfile() { echo "$DIR/run/$1.pid"; }

# the pid recorded for daemon $1 if that process is still alive and still that program (pid reuse guard)
live_pid() {
  local f pid
  f=$(pidfile "$1")
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ -d "/proc/$pid" ] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] || return 1
  # a zombie (exited, not reaped yet) is not running
  [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
  echo "$pid"
}

# run "$@" in the background in its own session (so a Ctrl-C of the caller's process group does not reach it),
# stdout/stderr into $DIR/log/<name>.out, its pid into the pid file (exec keeps the pid).
spawn() {
  local name=$1; shift
  setsid bash -c 'echo $$ > "$0"; exec "$@"' "$(pidfile "$name")" "$@" \
    </dev/null >>"$DIR/log/$name.out" 2>&1 9>&- &
  local i
  for i in $(seq 50); do [ -s "$(pidfile "$name")" ] && break; sleep 0.1; done
  log "started $name (pid $(cat "$(pidfile "$name")"), log $DIR/log/$name.out)"
}

# wait_for <what> <command...>: poll until the command succeeds, printing progress; die on timeout
wait_for() {
  local what=$1; shift
  local start=$SECONDS next=5
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS - start >= TIMEOUT )); then die "$what not ready after ${TIMEOUT}s (logs in $DIR/log)"; fi
    if (( SECONDS - start >= next )); then log "  waiting for $what ($((SECONDS - start))s)"; next=$((next + 5)); fi
    sleep 0.3
  done
}

require_root() { [ "$(id -u)" = 0 ] || die "must run as root (daemons, apt-get, /etc/slurm)"; }

# ---------------------------------------------------------------------------------------------------- install
install_packages() {
  local missing=0 b
  for b in slurmctld slurmd slurmdbd sbatch sacct sacctmgr munged mungekey mariadbd mariadb-install-db mariadb \
           systemd-analyze; do
    command -v "$b" >/dev/null 2>&1 || { missing=1; break; }
  done
  [ "$missing" = 0 ] && return 0
  local t0=$SECONDS aptlog=/tmp/slurm-local-apt.log created_policy=0
  log "installing ${PACKAGES[*]} (apt-get, --no-install-recommends; log $aptlog)"
  # dpkg must not start the daemons itself (no systemd here; we start them below, under our own state dir)
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; created_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  local apt=(apt-get -q -y -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
  : > "$aptlog"
  if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e '^lock$' -e '^partial$' -e '^auxfiles$')" ]; then
    log "  apt-get update (no package lists yet)"
    "${apt[@]}" update >>"$aptlog" 2>&1 || { tail -n 20 "$aptlog" >&2; die "apt-get update failed"; }
  fi
  log "  apt-get install"
  if ! "${apt[@]}" install --no-install-recommends "${PACKAGES[@]}" >>"$aptlog" 2>&1; then
    log "  install failed; retrying after apt-get update"
    "${apt[@]}" update >>"$aptlog" 2>&1 || true
    "${apt[@]}" install --no-install-recommends "${PACKAGES[@]}" >>"$aptlog" 2>&1 \
      || { tail -n 20 "$aptlog" >&2; die "apt-get install ${PACKAGES[*]} failed (see $aptlog)"; }
  fi
  [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  log "  installed in $((SECONDS - t0))s: slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm 2>/dev/null || echo "?")"
}

# ---------------------------------------------------------------------------------------------------- configs
write_configs() {
  mkdir -p "$DIR"/{run,log,spool/slurmd,state/slurmctld,mysql}
  chmod 755 "$DIR" "$DIR/log"

  # node line from what slurmd detects; NodeName=localhost; RealMemory a little under the detected value
  # (a node configured with more memory than slurmd finds is drained as "Low RealMemory")
  local detected cpus mem real_cpus
  detected=$(slurmd -C 2>/dev/null | head -n 1)
  real_cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$detected"); real_cpus=${real_cpus:-$(nproc)}
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$detected")
  mem=$(( ${mem:-$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 ))} * 90 / 100 ))
  cpus=${SLURM_LOCAL_CPUS:-$(( real_cpus > 8 ? real_cpus : 8 ))}
  [[ "$cpus" =~ ^[1-9][0-9]*$ ]] || die "SLURM_LOCAL_CPUS must be a positive integer"
  local gpus=${SLURM_LOCAL_GPUS:-0} gres_types="" node_gres=""
  [[ "$gpus" =~ ^[0-9]+$ ]] || die "SLURM_LOCAL_GPUS must be a non-negative integer"
  if [ "$gpus" -gt 0 ]; then
    gres_types=$'GresTypes=gpu\nAccountingStorageTRES=gres/gpu'; node_gres=" Gres=gpu:$gpus"
    # slurmd ignores a count-only gpu line (node goes INVAL "gres/gpu count reported lower") and wants character
    # devices: fake ones with /dev/null's numbers (1,3), so anything that opens them reads/writes nothing
    mkdir -p "$DIR/fakegpu"
    local g; for (( g=0; g<gpus; g++ )); do
      [ -c "$DIR/fakegpu/nvidia$g" ] || { rm -f "$DIR/fakegpu/nvidia$g"; mknod -m 666 "$DIR/fakegpu/nvidia$g" c 1 3; }
    done
    echo "Name=gpu File=$DIR/fakegpu/nvidia[0-$((gpus - 1))]" > "$DIR/gres.conf"
  else
    rm -f "$DIR/gres.conf"
  fi

  cat > "$DIR/slurm.conf.new" <<EOF
# written by scripts/slurm_local.sh start -- regenerated on every start
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
$gres_types
ReturnToService=2
KillWait=5
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/state/slurmctld
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$DIR/run/slurmctld.daemonpid
SlurmdPidFile=$DIR/run/slurmd.daemonpid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# the node may advertise more CPUs than the machine has (SLURM_LOCAL_CPUS); don't drain it for that
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem$node_gres State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$DIR/slurm.conf.new" "$DIR/slurm.conf"

  [ -s "$DIR/db.pass" ] || { (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$DIR/db.pass"); }
  (umask 077; cat > "$DIR/slurmdbd.conf" <<EOF
# written by scripts/slurm_local.sh start -- regenerated on every start
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.daemonpid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$DIR/db.pass")
StorageLoc=slurm_acct_db
EOF
  )
  chmod 600 "$DIR/slurmdbd.conf"

  # clients (and daemons) read /etc/slurm/slurm.conf by default; slurmdbd reads slurmdbd.conf from the same dir
  mkdir -p "$ETC"
  local f
  if [ -e "$DIR/gres.conf" ]; then ln -sfn "$DIR/gres.conf" "$ETC/gres.conf"; elif [ -L "$ETC/gres.conf" ]; then rm -f "$ETC/gres.conf"; fi
  for f in slurm.conf slurmdbd.conf; do
    if [ -e "$ETC/$f" ] && [ ! -L "$ETC/$f" ] && [ ! -e "$ETC/$f.before-slurm-local" ]; then
      log "moving the existing $ETC/$f to $ETC/$f.before-slurm-local"
      mv "$ETC/$f" "$ETC/$f.before-slurm-local"
    fi
    ln -sfn "$DIR/$f" "$ETC/$f"
  done
}

# ---------------------------------------------------------------------------------------------------- daemons
munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munged() {
  if live_pid munged >/dev/null; then return 0; fi
  if munge_works; then log "munged already running (not started by this script; left alone)"; return 0; fi
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /etc/munge /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key
  fi
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  spawn munged setpriv --reuid=munge --regid=munge --init-groups munged -F
  wait_for munged munge_works
}

mysql_root() { mariadb --no-defaults --socket="$DIR/mysql/mysqld.sock" -uroot "$@"; }

start_mariadbd() {
  if live_pid mariadbd >/dev/null; then return 0; fi
  local datadir=$DIR/mysql/data
  if [ ! -d "$datadir/mysql" ]; then
    log "initialising MariaDB datadir $datadir"
    rm -rf "$datadir"; mkdir -p "$datadir"
    mariadb-install-db --no-defaults --user=root --datadir="$datadir" --auth-root-authentication-method=socket \
      --skip-test-db >"$DIR/log/mariadb-install-db.out" 2>&1 \
      || { tail -n 20 "$DIR/log/mariadb-install-db.out" >&2; die "mariadb-install-db failed"; }
  fi
  rm -f "$DIR/mysql/mysqld.sock"
  spawn mariadbd mariadbd --no-defaults --user=root --datadir="$datadir" \
    --socket="$DIR/mysql/mysqld.sock" --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
    --pid-file="$DIR/run/mariadbd.daemonpid" --log-error="$DIR/log/mariadbd.log" \
    --innodb-buffer-pool-size=128M --innodb-log-file-size=32M --innodb-lock-wait-timeout=900
  wait_for mariadbd mysql_root -e 'SELECT 1'
  local pass; pass=$(cat "$DIR/db.pass")
  mysql_root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
}

sacctmgr_up() { sacctmgr -n -P show cluster format=cluster; }

start_slurmdbd() {
  if ! live_pid slurmdbd >/dev/null; then
    spawn slurmdbd slurmdbd -D
  fi
  wait_for slurmdbd sacctmgr_up
  if ! sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
    log "registering cluster '$CLUSTER' in the accounting DB"
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
}

node_idle() { [ "$(sinfo -h -N -o %T 2>/dev/null | head -n 1)" = idle ]; }

start_slurm() {
  if ! live_pid slurmctld >/dev/null; then spawn slurmctld slurmctld -D; fi
  wait_for slurmctld scontrol ping
  if ! live_pid slurmd >/dev/null; then spawn slurmd slurmd -D -N localhost; fi
  local start=$SECONDS next=0 state resumed=0
  while :; do
    state=$(sinfo -h -N -o %T 2>/dev/null | head -n 1 || true)
    case "$state" in
      idle|mixed|allocated) break ;;   # mixed/allocated: jobs restored from a previous run are running
    esac
    if (( SECONDS - start >= TIMEOUT )); then
      sinfo -N -o '%N %T %E' >&2 || true; tail -n 20 "$DIR/log/slurmd.log" >&2 || true
      die "node not idle after ${TIMEOUT}s (state '${state:-?}', reason '$(sinfo -h -N -o %E | head -n 1)')"
    fi
    # a drain/down kept in the saved controller state from an earlier run (ReturnToService=2 does not undo a
    # drain): resume it once; a problem of the current config drains it again and shows in the reason below
    if [ "$resumed" = 0 ] && (( SECONDS - start >= 2 )) && [[ "$state" =~ ^(drain|drained|draining|down|inval) ]]; then
      log "  node is $state ($(sinfo -h -N -o %E | head -n 1)); resuming it once"
      scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
      resumed=1
    fi
    if (( SECONDS - start >= next )); then log "  node state: ${state:-?} ($((SECONDS - start))s)"; next=$((next + 3)); fi
    sleep 0.3
  done
  log "node localhost is $state"
}

all_up() {
  local d
  for d in "${DAEMONS[@]}"; do
    if [ "$d" = munged ] && [ ! -s "$(pidfile munged)" ]; then munge_works || return 1; continue; fi
    live_pid "$d" >/dev/null || return 1
  done
}

cmd_start() {
  require_root
  local t0=$SECONDS
  if [ -d "$DIR/run" ] && all_up && node_idle_or_busy; then
    log "already running (state dir $DIR); nothing to do"
    return 0
  fi
  install_packages
  local t1=$SECONDS
  write_configs
  start_munged
  start_mariadbd
  start_slurmdbd
  start_slurm
  if ! sacct -n -X -o JobID -S now-1hour >/dev/null 2>&1; then die "sacct does not work (see $DIR/log/slurmdbd.log)"; fi
  log "up in $((SECONDS - t1))s (total $((SECONDS - t0))s); state dir $DIR, logs $DIR/log, config $ETC/slurm.conf"
}

node_idle_or_busy() { case "$(sinfo -h -N -o %T 2>/dev/null | head -n 1)" in idle|mixed|allocated) return 0 ;; esac; return 1; }

# SIGTERM, then SIGKILL after $2 seconds
kill_pid() {
  local pid=$1 grace=${2:-8} name=$3 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq $((grace * 10))); do
    [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 0
    # a zombie has exited (init reaps it; cmd_stop waits for that once, at the end)
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = Z ] && return 0
    sleep 0.1
  done
  log "  $name (pid $pid) still alive after ${grace}s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for i in $(seq 30); do [ -d "/proc/$pid" ] || return 0; sleep 0.1; done
}

# processes (slurmstepd of jobs still running) holding files under the state dir open
stray_stepds() {
  local p
  for p in $(pgrep -x slurmstepd || true); do
    if ls -l "/proc/$p/fd" 2>/dev/null | grep -q -- "-> $DIR/"; then echo "$p"; fi
  done
}

cmd_stop() {
  local wipe=0
  [ "${1:-}" = --wipe ] && wipe=1
  require_root
  if live_pid slurmctld >/dev/null; then
    local jobs; jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)
    if [ -n "${jobs// /}" ]; then
      log "cancelling jobs still queued/running: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      local i; for i in $(seq 100); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.1; done
    fi
  fi
  local d pid i stopped=""
  for (( i=${#DAEMONS[@]}-1; i>=0; i-- )); do
    d=${DAEMONS[$i]}
    if pid=$(live_pid "$d"); then
      log "stopping $d (pid $pid)"
      kill_pid "$pid" 8 "$d"
      stopped="$stopped $pid"
    fi
    rm -f "$(pidfile "$d")"
  done
  for pid in $(stray_stepds); do log "stopping leftover slurmstepd (pid $pid)"; kill_pid "$pid" 3 slurmstepd; done
  if [ -z "$stopped" ]; then log "nothing running"; return 0; fi
  # exited daemons are zombies until init reaps them (here PID 1 does so every ~2 s), and pgrep lists zombies:
  # wait a little so that "stop, then pgrep" sees nothing
  for i in $(seq 50); do
    local left=0
    for pid in $stopped; do [ -d "/proc/$pid" ] && left=1; done
    [ "$left" = 0 ] && break
    sleep 0.1
  done
  [ "$left" = 0 ] || log "exited daemons not reaped yet by their parent (zombies):$stopped"
  if [ "$wipe" = 1 ]; then
    log "wiping $DIR"
    rm -rf "$DIR"
    for d in slurm.conf slurmdbd.conf gres.conf; do if [ -L "$ETC/$d" ]; then rm -f "$ETC/$d"; fi; done
  fi
  return 0
}

cmd_status() {
  local d pid ok=0
  for d in "${DAEMONS[@]}"; do
    if pid=$(live_pid "$d"); then
      printf '  %-10s running (pid %s)\n' "$d" "$pid"
    elif [ "$d" = munged ] && munge_works; then
      printf '  %-10s running (not started by this script)\n' "$d"
    else
      printf '  %-10s not running\n' "$d"; ok=1
    fi
  done
  echo "sinfo:"
  if sinfo -N -o '%N %P %T %c %m' 2>&1 | sed 's/^/  /'; then
    node_idle_or_busy || ok=1
  else ok=1; fi
  if sacct -n -X -o JobID -S now-1hour >/dev/null 2>&1; then echo "sacct: works"; else echo "sacct: FAILS"; ok=1; fi
  echo "state dir: $DIR (logs in $DIR/log)"
  return "$ok"
}

# one start/stop at a time (CI and a developer's shell may share the machine); outside $DIR, which --wipe deletes
lock() { exec 9>"${DIR%/}.lock"; flock -w 120 9 || die "another slurm_local.sh holds ${DIR%/}.lock"; }

case "${1:-}" in
  start|stop) lock ;;
esac
case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  status) shift; cmd_status "$@" ;;
  *) echo "usage: $0 start|stop [--wipe]|status" >&2; exit 2 ;;
esac
