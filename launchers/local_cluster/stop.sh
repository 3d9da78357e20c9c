#!/usr/bin/env bash
# stop.sh - stop the daemons that start.sh started, by their PID files only.
#   --slurm-only : stop slurmd(s) and slurmctld, leave slurmdbd/mariadbd/munged running
#   --purge      : also delete cluster state (job ids, node state, accounting DB, logs)
set -uo pipefail
BASE=${DIST_CARDIO_SLURM_DIR:-/tmp/dist-cardio-slurm}
RUN=$BASE/run
only_slurm=0; purge=0
for a in "$@"; do
  case $a in --slurm-only) only_slurm=1 ;; --purge) purge=1 ;; *) echo "unknown arg $a" >&2; exit 2 ;; esac
done

# stop PIDFILE COMM: TERM, wait up to 15 s, then KILL (a slurmd stuck in its
# "Unable to register" retry loop may ignore TERM for minutes)
stop() {
  local f=$1 comm=$2 pid i
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if [ -n "$pid" ] && [ "$(cat /proc/$pid/comm 2>/dev/null)" = "$comm" ]; then
    kill -TERM "$pid" 2>/dev/null
    for i in $(seq 1 75); do [ "$(cat /proc/$pid/comm 2>/dev/null)" = "$comm" ] || break; sleep 0.2; done
    if [ "$(cat /proc/$pid/comm 2>/dev/null)" = "$comm" ]; then
      echo "[local-cluster] $comm ($pid) ignored TERM, sending KILL"; kill -KILL "$pid" 2>/dev/null; sleep 0.5
    fi
    echo "[local-cluster] stopped $comm ($pid)"
  fi
  rm -f "$f"
}

# cancel the jobs still queued/running on this private cluster, so that no job
# processes (slurmstepd + tasks) outlive the daemons
if [ -s "$RUN/slurmctld.pid" ] && [ "$(cat /proc/$(cat "$RUN/slurmctld.pid")/comm 2>/dev/null)" = slurmctld ]; then
  export SLURM_CONF=$BASE/etc/slurm.conf
  jobs=$(timeout 5 squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    echo "[local-cluster] cancelling jobs: $jobs"
    timeout 10 scancel $jobs 2>/dev/null
    for i in $(seq 1 50); do [ -z "$(timeout 5 squeue -h -t R,CG -o %A 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

for f in "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop "$f" slurmd & done
wait
stop "$RUN/slurmctld.pid" slurmctld
if [ "$only_slurm" = 0 ]; then
  stop "$RUN/slurmdbd.pid" slurmdbd
  stop "$RUN/mariadbd.pid" mariadbd
  stop "$RUN/munged.pid" munged       # only present if start.sh started munged
fi
if [ "$purge" = 1 ]; then
  rm -rf "$BASE/spool" "$BASE/mysql" "$BASE/log" "$BASE/run"
  echo "[local-cluster] purged state under $BASE"
fi
exit 0
