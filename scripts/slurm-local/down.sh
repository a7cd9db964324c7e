#!/usr/bin/env bash
# Stop the daemons that scripts/slurm-local/up.sh started, each by the PID it recorded in
# /run/stepwise-slurm-local/pids (never by name: a cluster that something else started is left
# alone). The jobs still queued are cancelled first, so that no slurmstepd is left behind.
# Packages, config and saved state stay: the next up.sh starts from them in a few seconds.
set -uo pipefail
PIDS=/run/stepwise-slurm-local/pids
log() { echo "slurm-local-down: $*"; }
[ "$(id -u)" = 0 ] || { echo "slurm-local-down: ERROR: must run as root" >&2; exit 1; }
if [ ! -s "$PIDS" ]; then log "no daemon recorded in $PIDS: nothing to stop"; exit 0; fi

alive() { [ -n "${2:-}" ] && [ "$(cat "/proc/$2/comm" 2>/dev/null)" = "$1" ]; }
ours() { awk -v n="$1" '$1 == n { print $2 }' "$PIDS"; }

# 1. Cancel what is left in the queue, while slurmctld and slurmd can still end the jobs.
if alive slurmctld "$(ours slurmctld)"; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086  # one argument per job id
    scancel $jobs || true
    for _ in $(seq 1 75); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

# 2. Stop the daemons, each by its recorded PID, the ones that depend on others first.
rc=0
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  pid=$(ours "$name")
  [ -n "$pid" ] || continue
  if ! alive "$name" "$pid"; then log "$name (pid $pid) is not running"; continue; fi
  kill -TERM "$pid"
  for _ in $(seq 1 150); do alive "$name" "$pid" || break; sleep 0.2; done
  if alive "$name" "$pid"; then
    log "$name (pid $pid) ignored SIGTERM for 30 s: sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 25); do alive "$name" "$pid" || break; sleep 0.2; done
  fi
  if alive "$name" "$pid"; then log "could not stop $name (pid $pid)"; rc=1; else log "stopped $name (pid $pid)"; fi
done
[ $rc != 0 ] || rm -f "$PIDS"

# 3. Report (never kill) a job step process left behind.
left=$(ps -eo pid=,comm= | awk '$2 == "slurmstepd" { print $1 }' | tr '\n' ' ')
[ -z "${left// /}" ] || log "WARNING: slurmstepd processes still running (pids: $left)"
exit $rc
