#!/usr/bin/env bash
# Start a real single-machine Slurm cluster: munge, mariadb + slurmdbd (accounting),
# slurmctld and two slurmd "nodes" n1, n2 (2 CPUs each). No systemd needed.
# Every start is a fresh cluster: state dir and accounting database are wiped together
# (job ids restart at 1, and sacct must not report an old job under a new one's id).
# Needs root. Usage: slurm/start.sh   (then slurm/stop.sh)
set -euo pipefail
DIR=${GPTRAIN_SLURM_DIR:-/tmp/gptrain-slurm}
HERE=$(cd "$(dirname "$0")" && pwd)
MARKER="# gptrain local test cluster"

need_packages() {
  for cmd in slurmctld slurmd slurmdbd sbatch munged mariadbd; do
    command -v "$cmd" >/dev/null 2>&1 || return 0
  done
  return 1
}
if need_packages; then
  echo "installing slurm, munge, mariadb (apt)..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge slurmdbd mariadb-server >/dev/null
fi

for conf in /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf; do
  if [ -f "$conf" ] && ! grep -q "^$MARKER" "$conf"; then
    echo "start.sh: $conf exists and is not ours; refusing to overwrite a real cluster's config" >&2
    exit 1
  fi
done
if [ -f "$DIR/pids" ]; then "$HERE/stop.sh"; fi
rm -rf "$DIR"
mkdir -p "$DIR/state" "$DIR/log" "$DIR/spool/n1" "$DIR/spool/n2" /etc/slurm
: > "$DIR/pids"
grep -q " n1 n2" /etc/hosts || echo "127.0.0.1 n1 n2" >> /etc/hosts

sed "s|@DIR@|$DIR|g" "$HERE/slurm.conf.in" > /etc/slurm/slurm.conf
sed "s|@DIR@|$DIR|g" "$HERE/slurmdbd.conf.in" > /etc/slurm/slurmdbd.conf
chmod 600 /etc/slurm/slurmdbd.conf  # slurmdbd refuses a readable one

spawn() {  # name, command...: start in its own session, record its pid
  local name=$1; shift
  setsid "$@" >"$DIR/log/$name.out" 2>&1 < /dev/null &
  echo "$name $!" >> "$DIR/pids"
}
wait_for() {  # description, timeout_s, command...
  local what=$1 timeout_s=$2; shift 2
  for _ in $(seq "$((timeout_s * 5))"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "start.sh: $what did not come up within ${timeout_s}s; logs in $DIR/log" >&2
  exit 1
}

install -d -o munge -g munge -m 0755 /run/munge
spawn munged setpriv --reuid=munge --regid=munge --init-groups munged -F
wait_for munge 10 munge -n

install -d -o mysql -g mysql -m 0755 /run/mysqld
spawn mariadbd mariadbd --user=mysql
wait_for mariadb 30 mariadb-admin ping
mariadb -e "DROP DATABASE IF EXISTS slurm_acct_db; CREATE DATABASE slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'gptrain-slurm';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

spawn slurmdbd slurmdbd -D
wait_for slurmdbd 30 bash -c "exec 3<>/dev/tcp/127.0.0.1/6819"
spawn slurmctld slurmctld -D
wait_for slurmctld 30 scontrol ping
spawn slurmd-n1 slurmd -D -N n1
spawn slurmd-n2 slurmd -D -N n2
wait_for "nodes n1 n2" 60 bash -c '[ "$(sinfo -h -o %T | sort -u)" = idle ]'
echo "slurm cluster up: $(sinfo -h -o '%P %D %T' | tr '\n' ' ')(state in $DIR)"
