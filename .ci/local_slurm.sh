#!/usr/bin/env bash
# A real single-node SLURM on this machine for shardlab's SLURM tests (tests/test_slurm.py): munge, mariadb +
# slurmdbd (accounting: submitit learns from sacct that a job died; without it a killed job hangs the sweep),
# slurmctld and slurmd, started by hand (no systemd), loopback only. .ci/run starts it before `make test`.
#   bash .ci/local_slurm.sh [start]   # install the Debian packages if missing, write the conf, start, wait for idle
#   bash .ci/local_slurm.sh stop      # stop the daemons this script started (pid files under $STATE/pids)
#   bash .ci/local_slurm.sh status
# Idempotent; must run as root. Debian 12: slurm 22.05.8, munge 0.5.15, mariadb 10.11. About 25 s on a new
# machine (packages downloaded), 3 s once installed. Knobs: SLURM_NODE_CPUS (2), SLURM_NODE_MEM_MB,
# SLURM_WAIT_S (90), SLURM_STATE_DIR (/var/lib/shardlab-slurm).
set -euo pipefail

NODE=$(hostname -s)
CPUS=${SLURM_NODE_CPUS:-2}
ACCT=dbd
STATE=${SLURM_STATE_DIR:-/var/lib/shardlab-slurm}
CONF=/etc/slurm/slurm.conf           # Debian's compiled-in default: sbatch/srun/sacct find it without SLURM_CONF
DBDCONF=/etc/slurm/slurmdbd.conf
WAIT_S=${SLURM_WAIT_S:-90}
PIDS=$STATE/pids
MYRUN=$STATE/mysqlrun                # mariadbd's socket + pid file (owned by mysql)
DB_PORT=3307
DB_PASS=slurmlocal                   # loopback-only test database
CONF_CHANGED=0

log() { echo "[local-slurm $(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# pidfile [expected comm] -> 0 if that pid is alive (and is the expected program)
pid_alive() {
    local pf=$1 want=${2:-} pid
    [[ -s $pf ]] || return 1
    pid=$(cat "$pf")
    kill -0 "$pid" 2>/dev/null || return 1
    [[ -z $want ]] || [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$want" ]]
}

stop_one() {  # name pidfile comm
    local name=$1 pf=$2 comm=$3 pid i
    if pid_alive "$pf" "$comm"; then
        pid=$(cat "$pf")
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then log "$name still up after 20 s: SIGKILL $pid"; kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$pf"
}

do_stop() {
    stop_one slurmd "$PIDS/slurmd.pid" slurmd
    stop_one slurmctld "$PIDS/slurmctld.pid" slurmctld
    stop_one slurmdbd "$PIDS/slurmdbd.pid" slurmdbd
    stop_one mariadbd "$MYRUN/mariadbd.pid" mariadbd
    stop_one munged "$PIDS/munged.pid" munged   # only present if this script started munged
    log "stopped"
}

do_status() {
    local d pf
    for d in munged:$PIDS/munged.pid mariadbd:$MYRUN/mariadbd.pid slurmdbd:$PIDS/slurmdbd.pid \
             slurmctld:$PIDS/slurmctld.pid slurmd:$PIDS/slurmd.pid; do
        pf=${d#*:}; d=${d%%:*}
        if pid_alive "$pf" "$d"; then echo "$d: running (pid $(cat "$pf"))"; else echo "$d: not running"; fi
    done
    sinfo 2>&1 || true
}

install_pkgs() {
    local want=(slurmctld slurmd slurm-client munge) missing=() p
    [[ $ACCT == dbd ]] && want+=(slurmdbd mariadb-server)
    for p in "${want[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
    (( ${#missing[@]} == 0 )) && return
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # postinst scripts try to start the services; in a container policy-rc.d denies that (harmless)
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_if_changed() {  # src dst mode -> sets CONF_CHANGED=1 if dst changed
    if ! cmp -s "$1" "$2"; then install -m "$3" "$1" "$2"; CONF_CHANGED=1; fi
    rm -f "$1"
}

write_conf() {
    local mem tmp acct_lines
    mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
    mem=${mem:-4000}; (( mem > 16000 )) && mem=16000
    mem=${SLURM_NODE_MEM_MB:-$mem}
    mkdir -p /etc/slurm "$STATE"/spool/ctld "$STATE"/spool/d "$STATE"/log "$PIDS"
    if [[ $ACCT == dbd ]]; then
        acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
    else
        acct_lines="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
    fi
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# written by local_slurm.sh: single-node test cluster, loopback only
ClusterName=localtest
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=${STATE}/spool/ctld
SlurmdSpoolDir=${STATE}/spool/d
SlurmctldPidFile=${PIDS}/slurmctld.pid
SlurmdPidFile=${PIDS}/slurmd.pid
SlurmctldLogFile=${STATE}/log/slurmctld.log
SlurmdLogFile=${STATE}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# no cgroups, no systemd (container/VM): track job processes through /proc, no CPU binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
${acct_lines}
# a plain-text record of every finished job, in any accounting mode
JobCompType=jobcomp/filetxt
JobCompLoc=${STATE}/log/jobcomp.log
# finished jobs stay visible to squeue/scontrol for 10 min
MinJobAge=600
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=5
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=${NODE} NodeAddr=127.0.0.1 NodeHostname=${NODE} CPUs=${CPUS} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    [[ -f $CONF && ! -f $CONF.orig && ! $(head -1 "$CONF") =~ local_slurm ]] && cp "$CONF" "$CONF.orig"
    write_if_changed "$tmp" "$CONF" 0644
    if [[ $ACCT == dbd ]]; then
        tmp=$(mktemp)
        cat >"$tmp" <<EOF
# written by local_slurm.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=${PIDS}/slurmdbd.pid
LogFile=${STATE}/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=${DB_PORT}
StorageUser=slurm
StoragePass=${DB_PASS}
StorageLoc=slurm_acct_db
EOF
        write_if_changed "$tmp" "$DBDCONF" 0600   # slurmdbd refuses a conf readable by others
    fi
}

start_munge() {
    if pid_alive "$PIDS/munged.pid" munged; then return 0; fi
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then log "munged already running (not ours): using it"; return; fi
    [[ -s /etc/munge/munge.key ]] || { log "creating munge key"; mungekey --create --force; }
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge /etc/munge/munge.key
    chmod 0755 /run/munge; chmod 0700 /etc/munge /var/log/munge; chmod 0400 /etc/munge/munge.key
    rm -f /run/munge/munged.pid
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid   # forks, writes its pid file
    local i
    for i in $(seq 1 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$PIDS/munged.pid"
    munge -n | unmunge >/dev/null || die "munge self-test failed"
}

start_mariadb() {
    local i
    mkdir -p "$MYRUN" "$STATE/mysql" "$STATE/log"
    touch "$STATE/log/mariadbd.log"
    chown mysql:mysql "$MYRUN" "$STATE/mysql" "$STATE/log/mariadbd.log"
    cat >"$STATE/my.cnf" <<EOF
[mariadbd]
user=mysql
datadir=$STATE/mysql
socket=$MYRUN/mysqld.sock
pid-file=$MYRUN/mariadbd.pid
log-error=$STATE/log/mariadbd.log
bind-address=127.0.0.1
port=$DB_PORT
skip-name-resolve
innodb_buffer_pool_size=64M
innodb_use_native_aio=0
innodb_log_file_size=48M
innodb_lock_wait_timeout=900
EOF
    if ! pid_alive "$MYRUN/mariadbd.pid" mariadbd; then
        if [[ ! -d $STATE/mysql/mysql ]]; then
            log "initialising mariadb datadir $STATE/mysql"
            mariadb-install-db --user=mysql --datadir="$STATE/mysql" --auth-root-authentication-method=socket \
                --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $STATE/log/mariadb-install.log"
        fi
        log "starting mariadbd (127.0.0.1:$DB_PORT)"
        rm -f "$MYRUN/mysqld.sock"
        setsid /usr/sbin/mariadbd --defaults-file="$STATE/my.cnf" </dev/null >/dev/null 2>&1 &
        for i in $(seq 1 150); do [[ -S $MYRUN/mysqld.sock ]] && pid_alive "$MYRUN/mariadbd.pid" mariadbd && break; sleep 0.2; done
        [[ -S $MYRUN/mysqld.sock ]] || { tail -20 "$STATE/log/mariadbd.log" >&2; die "mariadbd did not start"; }
    fi
    mariadb --socket="$MYRUN/mysqld.sock" -u root -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;" || die "mariadb grant failed"
}

start_dbd() {
    local i
    if pid_alive "$PIDS/slurmdbd.pid" slurmdbd; then
        (( CONF_CHANGED )) || return 0
        stop_one slurmdbd "$PIDS/slurmdbd.pid" slurmdbd
    fi
    log "starting slurmdbd"
    /usr/sbin/slurmdbd
    for i in $(seq 1 $((WAIT_S * 2))); do sacctmgr -n -P list cluster >/dev/null 2>&1 && return; sleep 0.5; done
    tail -20 "$STATE/log/slurmdbd.log" >&2; die "slurmdbd not answering"
}

start_ctld() {
    local i
    if pid_alive "$PIDS/slurmctld.pid" slurmctld; then
        (( CONF_CHANGED )) || return 0
        log "conf changed: restarting slurmctld and slurmd"
        stop_one slurmd "$PIDS/slurmd.pid" slurmd
        stop_one slurmctld "$PIDS/slurmctld.pid" slurmctld
    fi
    log "starting slurmctld"
    /usr/sbin/slurmctld -i            # keeps job state (job ids keep rising: sacct ids stay unique)
    for i in $(seq 1 $((WAIT_S * 2))); do
        pid_alive "$PIDS/slurmctld.pid" slurmctld && scontrol ping >/dev/null 2>&1 && return; sleep 0.5
    done
    tail -20 "$STATE/log/slurmctld.log" >&2; die "slurmctld did not come up"
}

start_slurmd() {
    local i
    if pid_alive "$PIDS/slurmd.pid" slurmd; then return 0; fi
    log "starting slurmd"
    /usr/sbin/slurmd
    for i in $(seq 1 50); do pid_alive "$PIDS/slurmd.pid" slurmd && return; sleep 0.2; done
    tail -20 "$STATE/log/slurmd.log" >&2; die "slurmd did not come up"
}

wait_idle() {
    local t0=$SECONDS st=
    while (( SECONDS - t0 < WAIT_S )); do
        st=$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null | head -1 || true)
        case "$st" in
            idle|mix|alloc|comp) log "node $NODE is $st"; sinfo; return 0 ;;
            down*|drain*|fail*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    sinfo -R >&2 || true; tail -20 "$STATE/log/slurmd.log" >&2
    die "node $NODE not idle after ${WAIT_S}s (state: ${st:-?})"
}

case "${1:-start}" in
    stop) do_stop ;;
    status) do_status ;;
    restart) do_stop; exec bash "$0" start ;;
    start)
        [[ $(id -u) == 0 ]] || die "run as root"
        install_pkgs
        write_conf
        start_munge
        if [[ $ACCT == dbd ]]; then start_mariadb; start_dbd; fi
        start_ctld
        start_slurmd
        wait_idle
        ;;
    *) echo "usage: $0 [start|stop|status|restart]" >&2; exit 2 ;;
esac
