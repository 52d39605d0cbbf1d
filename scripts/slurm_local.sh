#!/usr/bin/env bash
# A one-node SLURM cluster on localhost, from Debian's packages, running the README's sweep for real.
#
#   apt-get install slurm-wlm munge          # once (munge, slurmctld, slurmd, sbatch, srun)
#   scripts/slurm_local.sh [WORK_DIR]        # as root; WORK_DIR defaults to a fresh temporary directory
#
# 1. starts munged with its own key and socket, then slurmctld and slurmd with a minimal slurm.conf,
#    all of them in the foreground of this script and with every file under WORK_DIR;
# 2. runs `python train.py -m hydra/launcher=slurm trainer=ddp_cpu strategy=gradual_unfreeze,full_finetune`
#    with a tiny budget (one sbatch job per run, two tasks = two DDP processes on the CPU-only node);
# 3. checks that every run of the sweep wrote its metrics.json;
# 4. stops every daemon it started, by pid (also on failure or Ctrl-C).
# Extra arguments for train.py: SWEEP_ARGS="..." (appended to the sweep command).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/slurm_local.XXXXXX")}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
NODE=$(hostname -s)
PIDS=()

stop_daemons() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    done
    echo "stopped daemons (pids ${PIDS[*]:-none})"
}
trap stop_daemons EXIT

for tool in munged slurmctld slurmd sbatch sinfo; do
    command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install slurm-wlm munge" >&2; exit 2; }
done
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

mkdir -p "$WORK"/{munge,spool/ctld,spool/d,log,run}
WORK=$(cd "$WORK" && pwd)

# 1a. munge: a fresh key, socket and logs under WORK
head -c 1024 /dev/urandom > "$WORK/munge/munge.key"
chmod 400 "$WORK/munge/munge.key"
munged --foreground --force --key-file="$WORK/munge/munge.key" --socket="$WORK/munge/munge.socket" \
    --pid-file="$WORK/run/munged.pid" --log-file="$WORK/log/munged.log" --seed-file="$WORK/munge/seed" &
PIDS+=($!)

# 1b. slurm.conf: one node with this machine's CPUs and 80% of its memory, one partition
CPUS=$(nproc)
MEMORY_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
export SLURM_CONF="$WORK/slurm.conf"
cat > "$SLURM_CONF" <<EOF
ClusterName=local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$WORK/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$WORK/spool/ctld
SlurmdSpoolDir=$WORK/spool/d
SlurmctldPidFile=$WORK/run/slurmctld.pid
SlurmdPidFile=$WORK/run/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEMORY_MB State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -D -i -f "$SLURM_CONF" &
PIDS+=($!)
slurmd -D -f "$SLURM_CONF" &
PIDS+=($!)

for _ in $(seq 60); do
    state=$(sinfo -h -N -o %t 2>/dev/null || true)
    [[ "$state" == idle* ]] && break
    sleep 1
done
[[ "$state" == idle* ]] || { echo "node $NODE did not come up (state: '$state'); see $WORK/log" >&2; exit 1; }
echo "SLURM up: node $NODE, $CPUS CPUs, ${MEMORY_MB} MB, conf $SLURM_CONF"

# 2. the README's sweep, tiny budget, on the CPU-only node
cd "$REPO"
# shellcheck disable=SC2086
"$PYTHON" train.py -m hydra/launcher=slurm trainer=ddp_cpu strategy=gradual_unfreeze,full_finetune seed=0 \
    data.image_size=32 data.batch_size=16 trainer.max_epochs=1 trainer.limit_train_batches=2 trainer.limit_val_batches=1 \
    trainer.limit_test_batches=1 allow_short_schedule=true logger=none callbacks.rich_progress_bar=null \
    +trainer.enable_progress_bar=false +slurm.mem_gb=2 hydra.launcher.timeout_min=20 \
    hydra.sweep.dir="$WORK/multirun" ${SWEEP_ARGS:-}

# 3. every run of the sweep wrote its metrics.json
runs=$(find "$WORK/multirun" -mindepth 1 -maxdepth 1 -type d -name '[0-9]*' | sort)
missing=0
for run in $runs; do
    if [[ -f "$run/metrics.json" ]]; then
        echo "$run: $("$PYTHON" -c 'import json, sys; m = json.load(open(sys.argv[1])); print(m["strategy"], "global_step", m["global_step"], "test", m["test"])' "$run/metrics.json")"
    else
        echo "$run: no metrics.json" >&2
        missing=$((missing + 1))
    fi
done
count=$(echo "$runs" | grep -c . || true)
[[ $count -eq 2 && $missing -eq 0 ]] || { echo "expected 2 runs with metrics.json, got $count runs, $missing without" >&2; exit 1; }
echo "every run wrote metrics.json ($count runs under $WORK/multirun)"
