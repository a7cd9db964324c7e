#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the tests marked `slurm`: installs Debian's
# packages if they are missing, writes the config for this one machine, starts munged, MariaDB
# and slurmdbd (accounting), slurmctld and slurmd without systemd, and exits 0 once the node is
# idle and a job step runs on it. Needs root. Idempotent: run it again at any time; daemons that
# run are left running (this script restarts its own only when their config changed), and a
# cluster that something else started is checked and used as it is.
# Settings, pitfalls and the way back: scripts/slurm-local/README.md.
set -euo pipefail

ACCT=${SLURM_LOCAL_ACCOUNTING:-1}  # 1: slurmdbd + MariaDB too, so that `sacct` works (submitit needs it)
PART=${SLURM_LOCAL_PARTITION:-debug}
WAIT=${SLURM_LOCAL_TIMEOUT:-90}    # seconds to wait for each daemon, and for the node to be idle
CLUSTER=stepwise
DBPASS=stepwise-slurm-local        # MariaDB listens on its unix socket only (--skip-networking)
STATE=/run/stepwise-slurm-local    # PIDs of the daemons this script started: down.sh stops those
PIDS=$STATE/pids
NODE=$(hostname -s)
T0=$(date +%s.%N)

log() { printf 'slurm-local [%5.1fs]: %s\n' "$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')" "$*"; }
die() { echo "slurm-local: ERROR: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"

# -- which daemons run, and which of them this script started ----------------------------------
alive() { [ -n "${2:-}" ] && [ "$(cat "/proc/$2/comm" 2>/dev/null)" = "$1" ]; }  # NAME PID
pid_in() { cat "$1" 2>/dev/null || true; }
ours() { awk -v n="$1" '$1 == n { print $2 }' "$PIDS" 2>/dev/null || true; }
record() {
  mkdir -p "$STATE"
  { grep -v "^$1 " "$PIDS" 2>/dev/null || true; echo "$1 $2"; } > "$PIDS.tmp"
  mv "$PIDS.tmp" "$PIDS"
}
until_ok() {  # until_ok SECONDS CMD...: poll CMD until it succeeds (1 after SECONDS)
  local end=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$end" ] || return 1; sleep 0.2; done
}
pidfile_alive() { alive "$1" "$(pid_in "$2")"; }
started() {  # started NAME PIDFILE: wait for the daemon (it forks) to write its pid file; record it
  until_ok "$WAIT" pidfile_alive "$1" "$2" || die "$1 did not start (see its log in /var/log)"
  record "$1" "$(pid_in "$2")"
  log "$1 started (pid $(pid_in "$2"))"
}
stop_ours() {  # stop_ours NAME: stop a daemon that this script started (its config changed)
  local p; p=$(ours "$1")
  alive "$1" "$p" || return 0
  log "restarting $1 (pid $p): its config changed"
  kill -TERM "$p"
  until_ok 30 eval "! alive $1 $p" || kill -KILL "$p" 2>/dev/null || true
}
foreign() {  # foreign NAME PIDFILE: it runs, and this script did not start it
  local p; p=$(pid_in "$2")
  alive "$1" "$p" && [ "$p" != "$(ours "$1")" ]
}
put_conf() {  # put_conf FILE MODE OWNER CONTENT: write FILE if it differs (0: it was written)
  local tmp; tmp=$(mktemp)
  printf '%s\n' "$4" > "$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; return 1; fi
  install -m "$2" -o "$3" -g "$3" "$tmp" "$1"
  rm -f "$tmp"
  log "wrote $1"
}

# -- 1. packages -------------------------------------------------------------------------------
install_packages() {
  local pkgs=(munge slurmctld slurmd slurm-client) missing=() p policy="" ok=1
  [ "$ACCT" != 1 ] || pkgs+=(slurmdbd mariadb-server)
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  log "apt-get install ${missing[*]} (log: /var/log/slurm-local-apt.log)"
  # Without systemd, a package's postinst may start its daemon through invoke-rc.d before there
  # is a config for it: a policy-rc.d that answers 101 forbids that while the packages install.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 0755 "$policy"
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Another apt-get or dpkg (a colleague's install) holds the dpkg lock: wait for it, not fail.
  local apt=(apt-get -q -o DPkg::Lock::Timeout=600)
  if ! "${apt[@]}" install -y --no-install-recommends "${missing[@]}" >/var/log/slurm-local-apt.log 2>&1; then
    "${apt[@]}" update >>/var/log/slurm-local-apt.log 2>&1 || true  # a stale package list: refresh once
    "${apt[@]}" install -y --no-install-recommends "${missing[@]}" >>/var/log/slurm-local-apt.log 2>&1 || ok=0
  fi
  [ -z "$policy" ] || rm -f "$policy"
  [ $ok = 1 ] || { tail -20 /var/log/slurm-local-apt.log >&2; die "apt-get install ${missing[*]} failed"; }
  log "packages installed"
}

# -- 2. munge: the credentials every SLURM daemon and command checks ----------------------------
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
start_munge() {
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  if munge_ok; then log "munged already running"; return; fi
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock  # left by an unclean stop
  runuser -u munge -- /usr/sbin/munged
  until_ok "$WAIT" munge_ok || die "munged does not answer (see /var/log/munge/munged.log)"
  started munged /run/munge/munged.pid
}

# -- 3. the config of this one machine ------------------------------------------------------------
slurm_conf() {
  local hw cpus mem node acct
  hw=$(slurmd -C | head -1)  # what slurmd will find here: the node must not claim more
  cpus=$(grep -o 'CPUs=[0-9]*' <<<"$hw" || true); mem=$(grep -o 'RealMemory=[0-9]*' <<<"$hw" || true)
  [ -n "$cpus" ] && [ -n "$mem" ] || die "could not read 'slurmd -C': $hw"
  node=$(grep -oE '(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=[0-9]+' <<<"$hw" | tr '\n' ' ')
  if [ "$ACCT" = 1 ]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux"
  else
    acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
  fi
  cat <<CONF
# Written by stepwise's scripts/slurm-local/up.sh: one node, no cgroups, no systemd.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/backfill
# By default an sbatch job waits up to 3 s (batch_sched_delay) before it is scheduled.
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job that asks for no memory would get the whole node: jobs would run one at a time.
DefMemPerCPU=1024
ReturnToService=2
# scancel sends SIGTERM and SIGKILL KillWait s later; submitit ignores SIGTERM, and while a job
# is COMPLETING the node takes no other job (the default, 30 s, stalls the cluster that long).
KillWait=5
MailProg=/bin/true
$acct
JobCompType=jobcomp/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 ${node}State=UNKNOWN
PartitionName=$PART Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

slurmdbd_conf() {
  cat <<CONF
# Written by stepwise's scripts/slurm-local/up.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
PidFile=/run/slurm/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
CONF
}

# -- 4. accounting: MariaDB and slurmdbd --------------------------------------------------------
db_ok() { mariadb -e 'select 1'; }
start_accounting() {
  install -d -o mysql -g root -m 0755 /run/mysqld
  if db_ok >/dev/null 2>&1; then
    log "MariaDB already running"
  else
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql \
      >/var/log/slurm/mariadb-install.log 2>&1
    setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --skip-networking \
      --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid \
      </dev/null >>/var/log/slurm/mariadb.log 2>&1 &
    until_ok "$WAIT" db_ok || die "MariaDB did not start (see /var/log/slurm/mariadb.log)"
    started mariadbd /run/mysqld/mysqld.pid
  fi
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" || die "could not create the slurm DB user"
  if put_conf /etc/slurm/slurmdbd.conf 0600 slurm "$(slurmdbd_conf)"; then stop_ours slurmdbd; fi
  if pidfile_alive slurmdbd /run/slurm/slurmdbd.pid; then
    log "slurmdbd already running"
  else
    slurmdbd
    started slurmdbd /run/slurm/slurmdbd.pid
  fi
  until_ok "$WAIT" sacctmgr -n show cluster || die "slurmdbd does not answer (see /var/log/slurm/slurmdbd.log)"
}

# -- 5. slurmctld and slurmd --------------------------------------------------------------------
ctld_up() { scontrol ping | grep -q 'is UP'; }
start_slurm() {  # start_slurm CHANGED: 1 if slurm.conf was just rewritten
  local other
  if [ "$1" = 1 ]; then stop_ours slurmd; stop_ours slurmctld; fi
  other=$(cat /var/spool/slurmctld/clustername 2>/dev/null || true)
  if [ -n "$other" ] && [ "$other" != "$CLUSTER" ] && ! pidfile_alive slurmctld /run/slurm/slurmctld.pid; then
    # slurmctld refuses to start on state saved under another ClusterName ("CLUSTER NAME MISMATCH").
    log "moving the saved state of cluster '$other' aside, to /var/spool/slurmctld.$other"
    rm -rf "/var/spool/slurmctld.$other"
    mv /var/spool/slurmctld "/var/spool/slurmctld.$other"
    install -d -o slurm -g slurm -m 0755 /var/spool/slurmctld
  fi
  if pidfile_alive slurmctld /run/slurm/slurmctld.pid; then
    log "slurmctld already running"
  else
    slurmctld
    started slurmctld /run/slurm/slurmctld.pid
  fi
  until_ok "$WAIT" ctld_up || die "slurmctld does not answer 'scontrol ping' (see /var/log/slurm/slurmctld.log)"
  if pidfile_alive slurmd /run/slurm/slurmd.pid; then
    log "slurmd already running"
  else
    slurmd
    started slurmd /run/slurm/slurmd.pid
  fi
}

# -- 6. the node idle, and a job step that runs on it ---------------------------------------------
wait_idle() {
  local end=$(( $(date +%s) + WAIT )) resumed=0 st
  while :; do
    st=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
    [ "$st" = idle ] && break
    case "$st" in  # a node that was down when slurmctld saved its state comes back down
      down*|drain*|fail*)
        [ $resumed = 1 ] || { scontrol update NodeName="$NODE" State=RESUME || true; resumed=1; } ;;
    esac
    if [ "$(date +%s)" -ge "$end" ]; then
      scontrol show node "$NODE" >&2 || true
      case "$st" in
        alloc*|mix*|comp*) die "node $NODE is '$st' after ${WAIT}s: jobs are still running (squeue)" ;;
        *) die "node $NODE is '$st', not idle, after ${WAIT}s (see /var/log/slurm/slurmd.log)" ;;
      esac
    fi
    sleep 0.3
  done
  # sinfo may say idle from the saved state before slurmd has registered: a job step proves it.
  timeout "$WAIT" srun -N1 -n1 -t 1 -J slurm-local-check /bin/true \
    || die "the node is idle but 'srun /bin/true' fails (see /var/log/slurm/slurmd.log)"
}

install_packages
for daemon in slurmctld slurmd; do
  if foreign "$daemon" "/run/slurm/$daemon.pid"; then
    # Someone else's cluster (another script, or an init system): used as it is, never rewritten.
    log "$daemon (pid $(pid_in "/run/slurm/$daemon.pid")) was not started by this script: using that cluster as it is"
    munge_ok || die "$daemon runs but munge does not answer"
    wait_idle
    log "cluster up (started elsewhere): $(sinfo -h -o 'partition %P, %D node(s) %T' | head -1)"
    exit 0
  fi
done
install -d -m 0755 /etc/slurm /var/spool/slurmd
install -d -o slurm -g slurm -m 0755 /var/spool/slurmctld /var/log/slurm /run/slurm
start_munge
conf=$(slurm_conf)  # every SLURM command reads it, sacctmgr in start_accounting too
changed=0
if put_conf /etc/slurm/slurm.conf 0644 root "$conf"; then changed=1; fi
[ "$ACCT" != 1 ] || start_accounting
start_slurm $changed
wait_idle
sinfo
log "cluster up: partition $PART on node $NODE, accounting=$ACCT"
