#!/bin/bash
# Start a throw-away Slurm cluster for the tests (adapted from the team notes on running Slurm in CI).
# without systemd and without using cgroups. Config, state, logs and pid files live under $BASE.
#
# usage: start.sh [--nodes N] [--dbd]
#   --nodes 1 (default): one node named $(hostname -s), slurmd on 127.0.0.1:6818
#   --nodes N (N>=2)   : N slurmd "nodes" n1..nN on this machine, each slurmd in its own UTS+mount
#                        namespace (hostname n<i>, private bind-mounted /etc/hosts copy that maps
#                        n<i> -> 127.0.1.<i>), port 6820+i, started with `slurmd -N n<i>`.
#                        Jobs see hostname()==n<i>, and n1..nN resolve inside jobs.
#   --dbd              : also start MariaDB + slurmdbd so that `sacct` works (submitit polls sacct).
# Afterwards: export SLURM_CONF=$BASE/etc/slurm.conf   (all clients: sbatch/srun/squeue/sacct/submitit)
set -euo pipefail
BASE=${BASE:-/tmp/slurm-local}
NODES=1; DBD=0
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES=$2; shift 2;;
    --dbd) DBD=1; shift;;
    *) echo "unknown argument: $1" >&2; exit 2;;
  esac
done
ETC=$BASE/etc; RUN=$BASE/run; LOG=$BASE/log; STATE=$BASE/state
mkdir -p "$ETC" "$RUN" "$LOG"
rm -rf "$STATE"; mkdir -p "$STATE/ctld"          # fresh cluster: job ids restart at 1
rm -f "$LOG/jobcomp.txt"                           # old records would carry the same job ids
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 ))
REALMEM=$(( MEM_MB / 2 < 8000 ? MEM_MB / 2 : 8000 ))
export SLURM_CONF=$ETC/slurm.conf
T0=$(date +%s.%N)
say() { printf "[start.sh %6.2fs] %s\n" "$(awk "BEGIN{print $(date +%s.%N) - $T0}")" "$*"; }
waitfor() { # waitfor SECONDS CMD...
  local n=$(( $1 * 5 )); shift
  for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "timed out waiting for: $*" >&2; return 1
}

# ---------------------------------------------------------------- munge
if munge -n >/dev/null 2>&1; then
  say "munged already running, reusing it"
else
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  waitfor 10 munge -n
  cp /run/munge/munged.pid "$RUN/munged.pid"        # marks: started by us, stop.sh stops it
  say "munged started (pid $(cat "$RUN/munged.pid"))"
fi

# ---------------------------------------------------------------- configs
if [ "$DBD" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
else
  ACCT="AccountingStorageType=accounting_storage/none"
fi
if [ "$NODES" -le 1 ]; then
  NODELINES="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REALMEM State=UNKNOWN"
else
  NODELINES=""
  cp /etc/hosts "$ETC/hosts"
  for i in $(seq 1 "$NODES"); do
    NODELINES+="NodeName=n$i NodeHostname=n$i NodeAddr=127.0.1.$i Port=$((6820 + i)) CPUs=$CPUS RealMemory=$REALMEM State=UNKNOWN"$'\n'
    echo "127.0.1.$i n$i" >> "$ETC/hosts"
  done
fi

cat > "$ETC/slurm.conf" <<EOF
# Minimal Slurm 22.05 config for a sandbox/CI machine: no systemd, no cgroup enforcement.
ClusterName=ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job must wait before it may start again (default 120 s)
AuthInfo=cred_expire=10
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$ACCT
# finished jobs also go to a text file; 'sacct --completion' reads it even without slurmdbd
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# start pending/requeued jobs within ~2 s instead of 30-60 s
SchedulerParameters=bf_interval=2,sched_interval=2
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=6817
SlurmdPort=6818
MinJobAge=600
InactiveLimit=0
# SIGTERM -> SIGKILL delay of scancel and the time limit (SLURM's default is 30 s): 5 s was too short
# for a training to checkpoint and its batch script to report on a loaded 2-core CI machine
KillWait=15
$NODELINES
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# slurmd always initialises a cgroup plugin; pinning v1 skips the autodetection, which fails
# ("can't stat /sys/fs/cgroup/systemd/") when /sys/fs/cgroup is missing or unusual.
# Nothing uses cgroups here (proctrack/linuxproc, task/none, jobacct_gather/none).
echo "CgroupPlugin=cgroup/v1" > "$ETC/cgroup.conf"

# ---------------------------------------------------------------- slurmdbd (optional)
if [ "$DBD" = 1 ]; then
  if mariadb-admin ping >/dev/null 2>&1; then
    say "MariaDB already running, reusing it"
  else
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$LOG/mariadb-install-db.log" 2>&1
    nohup /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 >"$LOG/mariadbd.log" 2>&1 &
    echo $! > "$RUN/mariadbd.pid"
    waitfor 60 mariadb-admin ping
    say "MariaDB started (pid $(cat "$RUN/mariadbd.pid"))"
  fi
  mariadb -e "DROP DATABASE IF EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat > "$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
DebugLevel=info
EOF
  chmod 600 "$ETC/slurmdbd.conf"     # slurmdbd refuses a world-readable slurmdbd.conf
  slurmdbd
  waitfor 30 sacctmgr -n show cluster
  say "slurmdbd started (pid $(cat "$RUN/slurmdbd.pid"))"
fi

# ---------------------------------------------------------------- slurmctld + slurmd(s)
slurmctld
waitfor 30 scontrol ping
# a controller that answers is not necessarily ours (a stale one holding the port): check our pid file
waitfor 10 test -s "$RUN/slurmctld.pid"
kill -0 "$(cat "$RUN/slurmctld.pid")" 2>/dev/null || { echo "slurmctld did not stay up (port 6817 in use?): see $LOG/slurmctld.log" >&2; exit 1; }
say "slurmctld started (pid $(cat "$RUN/slurmctld.pid"))"
if [ "$NODES" -le 1 ]; then
  mkdir -p "$STATE/slurmd-$HOST"
  slurmd
else
  for i in $(seq 1 "$NODES"); do
    mkdir -p "$STATE/slurmd-n$i"
    unshare --uts --mount --propagation private \
      sh -c "hostname n$i && mount --bind '$ETC/hosts' /etc/hosts && exec slurmd -N n$i"
  done
fi
want=$NODES
idle() { [ "$(sinfo -h -N -t idle -o %N | sort -u | wc -l)" -ge "$want" ]; }
waitfor 60 idle
say "cluster ready: $(sinfo -h -N -o '%N=%T' | sort -u | tr '\n' ' ')"
echo "export SLURM_CONF=$SLURM_CONF"
