#!/usr/bin/env bash
# Stop the cluster started by slurm/start.sh, by recorded pid, newest daemon first.
set -uo pipefail
DIR=${GPTRAIN_SLURM_DIR:-/tmp/gptrain-slurm}
[ -f "$DIR/pids" ] || { echo "no cluster recorded in $DIR"; exit 0; }
scancel --state=RUNNING,PENDING --full 2>/dev/null || true
tac "$DIR/pids" | while read -r name pid; do
  kill -TERM "$pid" 2>/dev/null || continue
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null && echo "stop.sh: $name needed SIGKILL"
done
rm -f "$DIR/pids"
echo "slurm cluster stopped"
