#!/usr/bin/env bash
# The cluster of tests/test_slurm.py (.ci/run starts it): a single-node SLURM 22.05 cluster on this machine
# (Debian 12, as root, no systemd), named resnet-cifar-tests so that the tests never submit to another cluster:
# munge, MariaDB + slurmdbd (accounting: sacct works as on a real cluster), slurmctld, slurmd. Two partitions:
# `debug` (default) and `high` (higher PriorityTier: a job there pre-empts `debug` jobs by requeue).
# AuthInfo=cred_expire=10 makes a requeued job eligible again after about 11 s instead of about 2 minutes.
# Usage: start.sh [STATE_DIR]   (default /tmp/slurm-tests: the cluster's state, spool, logs and pids); writes
# STATE_DIR/pids; stop.sh STATE_DIR stops it. The configuration goes to /etc/slurm (where the client commands
# read it). About 17 s to install the packages the first time, 40 s to start.
set -eu
S=${1:-/tmp/slurm-tests}; mkdir -p "$S"
need=(); for p in slurm-wlm munge slurmdbd mariadb-server; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if ((${#need[@]})); then
  (apt-get update -qq || true) >/dev/null 2>&1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
host=$(hostname -s); cpus=$(nproc); mem=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
S=$(cd "$S" && pwd); chmod 755 "$S"
su -s /bin/sh slurm -c "test -x '$S'" 2>/dev/null || { echo "start.sh: the slurm user cannot reach $S (a parent folder's mode): use a folder such as /tmp/slurm-local" >&2; exit 2; }
mkdir -p /run/munge /var/log/munge /var/lib/munge /run/mysqld /etc/slurm "$S/ctld" "$S/d" "$S/log"
chown munge:munge /run/munge /var/log/munge /var/lib/munge; chown mysql:mysql /run/mysqld
chown slurm:slurm "$S/ctld" "$S/log"
[[ -f /etc/munge/munge.key ]] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key; }
munge -n >/dev/null 2>&1 || su -s /bin/sh munge -c /usr/sbin/munged
nohup /usr/sbin/mariadbd --user=mysql >"$S/mariadb.log" 2>&1 &
echo "mariadbd $!" >"$S/pids"
for i in $(seq 1 30); do mysql -e "select 1" >/dev/null 2>&1 && break; sleep 1; done
mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db; CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
cat >/etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=$S/log/slurmdbd.log
PidFile=$S/log/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
CONF
chown slurm:slurm /etc/slurm/slurmdbd.conf; chmod 600 /etc/slurm/slurmdbd.conf
cat >/etc/slurm/slurm.conf <<CONF
ClusterName=resnet-cifar-tests
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$S/ctld
SlurmdSpoolDir=$S/d
SlurmctldPidFile=$S/log/slurmctld.pid
SlurmdPidFile=$S/d/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/d/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=30
MinJobAge=300
Waittime=0
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=high Nodes=ALL Default=NO MaxTime=INFINITE State=UP PriorityTier=10
CONF
slurmdbd; sleep 2
slurmctld -c; slurmd -c
for i in $(seq 1 30); do sinfo -h -o %t 2>/dev/null | grep -q idle && break; sleep 1; done
for f in /run/munge/munged.pid "$S/log/slurmdbd.pid" "$S/log/slurmctld.pid" "$S/d/slurmd.pid"; do
  [[ -f $f ]] && echo "$(basename "$f" .pid) $(cat "$f")" >>"$S/pids"
done
sinfo -h -o "%P %t %c" | head -2
