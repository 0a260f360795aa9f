#!/usr/bin/env bash
# Stops what start.sh started, by the PIDs it recorded (slurmd first, munged last): SIGTERM, then SIGKILL after 10 s.
S=${1:-/tmp/slurm-tests}
[[ -f $S/pids ]] || exit 0
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  pid=$(awk -v n="$name" '$1 == n {print $2}' "$S/pids" | tail -1)
  [[ -n $pid ]] || continue
  kill "$pid" 2>/dev/null
  for i in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
done
rm -f "$S/pids"
