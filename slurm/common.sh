#!/usr/bin/env bash
# Shared body of slurm/stage{1,2,3}.sh: one `torchrun` per node, preemption → checkpoint → requeue.
#
#   sbatch slurm/stage2.sh [hydra overrides…]       e.g. sbatch slurm/stage2.sh +experiment=qwen2vl parallel.tp=4
#
# The stage script sets STAGE and sources this file inside the batch job. What happens:
#   1. cd to the repository (QVL_ROOT, default: the directory `sbatch` was run from), activate .venv if present.
#   2. output_dir = the `output_dir=` override if given, else $QVL_OUTPUT_ROOT/$SLURM_JOB_NAME
#      (outputs/qvl-stage2). Not the job id: a requeued job keeps its name and finds its own checkpoints
#      (checkpoint.resume=auto is the default), so it continues where it stopped.
#   3. `srun` one task per node; each task runs this file with `--node`, which starts torchrun with a c10d
#      rendezvous on the first node of the allocation (node ranks come from the rendezvous).
#      GPUs on the node → one process per GPU (NCCL). No GPUs → NPROC_PER_NODE CPU processes (default 2, gloo).
#   4. Preemption / time limit: `#SBATCH --signal=B:USR1@120` delivers SIGUSR1 to this batch shell
#      120 s before the limit (SIGTERM is handled the same way). The shell writes a stop file in output_dir
#      (shared by all nodes); each node task polls for it and sends SIGUSR1 to its training processes, the
#      children of torchrun, every 2 s until they exit (a worker still starting up ignores it; the next one
#      lands). Not `kill -USR1 srun`: SLURM would signal every process of the step, helper processes of
#      the workers included. torchrun itself runs with USR1 and TERM ignored, so a signal SLURM sends to the
#      whole step neither kills it nor makes it kill its workers 30 s later; it just waits. The workers
#      finish their step, agree to stop, save a checkpoint and exit 0. After SIGUSR1 the shell then
#      `scontrol requeue`s the job unless the run had already reached train.max_steps. After SIGTERM it does
#      not: a plain `scancel` sends SIGTERM too, and SLURM still accepts a requeue of a cancelled job, so
#      requeueing on TERM would make jobs uncancellable (QVL_REQUEUE_ON="USR1 TERM" if you want it anyway;
#      SLURM's own preemption with PreemptMode=REQUEUE requeues the job by itself).
#      The requeued job gets the same job id and SLURM_RESTART_COUNT+1, logged in the job output and in
#      output_dir/slurm_jobs.jsonl.
#
# Environment knobs (export before sbatch; sbatch passes the environment on):
#   NPROC_PER_NODE   processes per node (default: GPUs on the node, else 2)
#   MASTER_PORT      rendezvous port on the first node (default 20000 + job id % 20000)
#   QVL_ROOT         repository checkout to run (default $SLURM_SUBMIT_DIR)
#   QVL_VENV         virtual environment to activate (default $QVL_ROOT/.venv when it exists)
#   QVL_OUTPUT_ROOT  parent of the default output_dir (default outputs)
#   QVL_REQUEUE_ON   signals to the batch shell after which the job requeues itself (default USR1; "" never)

qvl_log() { echo "[qvl-slurm $(date '+%F %T')] $*"; }

# ---------------------------------------------------------------------------------------------------------
# NCCL / InfiniBand. Edit for your fabric (or export before sbatch: values already set are kept).
# Look up names with `ibv_devices` / `ibstat` (HCAs), `ip -br link` (interfaces), `show_gids` (RoCE GIDs).
# ---------------------------------------------------------------------------------------------------------
qvl_nccl_env() {
    # export NCCL_IB_HCA=${NCCL_IB_HCA:-mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7}
    #     HCAs NCCL may use; list the compute-fabric ports ('^mlx5_bond_0' excludes one instead).
    # export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-ib0}
    #     interface for NCCL's bootstrap and TCP fallback ('^lo,docker' excludes); must reach every node.
    # export NCCL_IB_GID_INDEX=${NCCL_IB_GID_INDEX:-3}
    #     RoCE v2 only (Ethernet with RDMA): the GID index of the RoCE v2 IPv4 address; leave unset on InfiniBand.
    # export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}       # larger on big or congested fabrics
    # export NCCL_IB_RETRY_CNT=${NCCL_IB_RETRY_CNT:-7}
    # export NCCL_NET_GDR_LEVEL=${NCCL_NET_GDR_LEVEL:-PHB} # GPUDirect RDMA when NIC and GPU share a PCIe host bridge
    # export NCCL_IB_DISABLE=1                            # no InfiniBand at all: TCP over NCCL_SOCKET_IFNAME
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}                 # INFO prints the chosen transport (NET/IB vs NET/Socket)
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a failed collective ends the job
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron-core's TP/SP comm overlap needs 1
}

qvl_gpus_on_node() {
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    echo "${n:-0}"
}

# ---------------------------------------------------------------------------------------------------------
# Per node (the srun task): torchrun with signals relayed to its workers.
# ---------------------------------------------------------------------------------------------------------
qvl_node() {
    local torchrun_pid rc stop=""
    qvl_stop_workers() {  # the workers treat TERM and USR1 alike: finish the step, save, exit 0
        [[ -z $stop ]] && echo "[qvl-slurm] node ${SLURM_NODEID:-?} ($(hostname -s)): $1 → training processes" >&2
        stop=$1
        pkill -USR1 -P "$torchrun_pid" 2>/dev/null || true
    }
    trap 'qvl_stop_workers SIGUSR1' USR1
    trap 'qvl_stop_workers SIGTERM' TERM
    # USR1 and TERM ignored in torchrun (an inherited SIG_IGN survives exec): torchrun's own TERM handler would
    # kill the workers 30 s later (--signals-to-handle leaves TERM out), and USR1 would kill torchrun itself.
    # The workers install their own handlers (qvl_train/signals.py) once training starts.
    (
        trap '' USR1 TERM
        exec python -m torch.distributed.run \
            --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC_PER_NODE" \
            --rdzv_backend=c10d --rdzv_endpoint="$QVL_HEAD:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" \
            --signals-to-handle=SIGINT,SIGHUP,SIGQUIT \
            "$@"
    ) &
    torchrun_pid=$!
    while kill -0 "$torchrun_pid" 2>/dev/null; do
        if [[ -n $stop ]] || [[ -e $QVL_STOP_FILE ]]; then
            qvl_stop_workers "${stop:-stop file}"
        fi
        sleep 2 & wait $!
    done
    wait "$torchrun_pid"; rc=$?
    [[ $rc == 127 ]] && rc=1
    exit "$rc"
}

if [[ ${1:-} == --node ]]; then
    shift
    qvl_node "$@"
fi

# ---------------------------------------------------------------------------------------------------------
# The batch script.
# ---------------------------------------------------------------------------------------------------------
: "${STAGE:?slurm/common.sh is sourced by slurm/stage{1,2,3}.sh, which set STAGE}"
if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "submit with sbatch: sbatch slurm/${STAGE%%_*}.sh [overrides…]" >&2
    exit 2
fi
set -uo pipefail

QVL_ROOT=${QVL_ROOT:-$SLURM_SUBMIT_DIR}
if [[ ! -f $QVL_ROOT/launch/train.py ]]; then
    echo "QVL_ROOT=$QVL_ROOT is not a qvl-train checkout: run sbatch from the repository or export QVL_ROOT" >&2
    exit 2
fi
cd "$QVL_ROOT" || exit 2
QVL_VENV=${QVL_VENV:-$QVL_ROOT/.venv}
# shellcheck disable=SC1091
[[ -f $QVL_VENV/bin/activate ]] && . "$QVL_VENV/bin/activate"

# Hydra overrides: ours first, the user's after (a user's `stage=` or `output_dir=` replaces ours).
OVERRIDES=("$@")
OUTPUT_DIR="${QVL_OUTPUT_ROOT:-outputs}/$SLURM_JOB_NAME"
own_output_dir=1 own_stage=1
for arg in "${OVERRIDES[@]}"; do
    case $arg in
        output_dir=* | +output_dir=* | ++output_dir=*) OUTPUT_DIR=${arg#*output_dir=}; own_output_dir=0 ;;
        stage=* | +stage=* | ++stage=*) own_stage=0 ;;
    esac
done
(( own_stage )) && OVERRIDES=("stage=$STAGE" "${OVERRIDES[@]}")
(( own_output_dir )) && OVERRIDES=("output_dir=$OUTPUT_DIR" "${OVERRIDES[@]}")

GPUS=$(qvl_gpus_on_node)
if (( GPUS > 0 )); then
    export NPROC_PER_NODE=${NPROC_PER_NODE:-$GPUS}
    qvl_nccl_env
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-$(nproc)} / NPROC_PER_NODE > 0 ? ${SLURM_CPUS_PER_TASK:-$(nproc)} / NPROC_PER_NODE : 1 ))}
    DEVICE="$GPUS GPU(s)/node, NCCL"
else
    export NPROC_PER_NODE=${NPROC_PER_NODE:-2}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    DEVICE="no GPU: CPU processes, gloo"
fi
QVL_HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export QVL_HEAD
export MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
export WANDB_SILENT=${WANDB_SILENT:-true}
RESTARTS=${SLURM_RESTART_COUNT:-0}

qvl_log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) SLURM_RESTART_COUNT=$RESTARTS on $SLURM_NNODES node(s) [$SLURM_JOB_NODELIST]"
qvl_log "stage $STAGE; $NPROC_PER_NODE processes/node ($DEVICE); rendezvous $QVL_HEAD:$MASTER_PORT"
qvl_log "output_dir $OUTPUT_DIR; overrides: ${OVERRIDES[*]}"
mkdir -p "$OUTPUT_DIR"
QVL_STOP_FILE="$(cd "$OUTPUT_DIR" && pwd)/.slurm_stop.$SLURM_JOB_ID.$RESTARTS"
export QVL_STOP_FILE
rm -f "$QVL_STOP_FILE"
printf '{"job_id": %s, "restart_count": %s, "nodes": "%s", "nnodes": %s, "nproc_per_node": %s, "start": "%s"}\n' \
    "$SLURM_JOB_ID" "$RESTARTS" "$SLURM_JOB_NODELIST" "$SLURM_NNODES" "$NPROC_PER_NODE" "$(date -Is)" \
    >>"$OUTPUT_DIR/slurm_jobs.jsonl"

STOP_SIGNAL=""
qvl_on_signal() {
    STOP_SIGNAL=$1
    qvl_log "SIG$1 received: stopping after the current step with a checkpoint"
    date -Is >"$QVL_STOP_FILE"  # the node tasks poll for it (see the header)
}
trap 'qvl_on_signal USR1' USR1
trap 'qvl_on_signal TERM' TERM

# One task per node; the step gets the job's CPUs (srun does not inherit --cpus-per-task in every SLURM version).
SRUN_ARGS=(--nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && SRUN_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
srun "${SRUN_ARGS[@]}" bash "$QVL_ROOT/slurm/common.sh" --node launch/train.py "${OVERRIDES[@]}" &
SRUN_PID=$!
while :; do
    wait "$SRUN_PID"; rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
(( rc > 128 )) && [[ -n $STOP_SIGNAL ]] && { wait "$SRUN_PID"; rc=$?; }
qvl_log "training exited with status $rc"
rm -f "$QVL_STOP_FILE"

if [[ -n $STOP_SIGNAL && " ${QVL_REQUEUE_ON-USR1} " != *" $STOP_SIGNAL "* ]]; then
    qvl_log "stopped on SIG$STOP_SIGNAL: not requeued (QVL_REQUEUE_ON=\"${QVL_REQUEUE_ON-USR1}\"); resubmit the same command to resume"
elif [[ -n $STOP_SIGNAL ]]; then
    done_steps=$(python - "$OUTPUT_DIR" <<'PY'
import sys, pathlib, yaml
out = pathlib.Path(sys.argv[1])
latest = out / "checkpoints" / "latest"
step = int(latest.read_text().strip().split("_")[-1]) if latest.exists() else 0
max_steps = yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"]
print("yes" if step >= max_steps else f"no {step}/{max_steps}")
PY
)
    if [[ $done_steps == yes ]]; then
        qvl_log "the run had already finished: not requeued"
    else
        qvl_log "checkpoint at step ${done_steps#no }: requeueing job $SLURM_JOB_ID (restart $((RESTARTS + 1)))"
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        qvl_log "scontrol requeue failed (job cancelled?): resubmit the same command to resume"
    fi
fi
exit "$rc"
