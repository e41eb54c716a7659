#!/usr/bin/env bash
# Stage 2, multitask pretraining: ViT, projector and LLM all train.
#
#   sbatch slurm/stage2.sh [hydra overrides…]     e.g.  sbatch slurm/stage2.sh +experiment=qwen2vl parallel.tp=4
#
# Edit the #SBATCH lines for your cluster (or override them on the command line: sbatch --nodes=8 …).
# Everything else (torchrun per node, NCCL settings, preemption → checkpoint → requeue) is slurm/common.sh;
# docs/slurm.md explains it.
#SBATCH --job-name=qvl-stage2
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
##SBATCH --partition=gpu
##SBATCH --account=my-account
##SBATCH --exclusive
##SBATCH --dependency=afterok:<job id of the previous stage>

STAGE=stage2_multitask
if [[ -z "${SLURM_JOB_ID:-}" ]]; then  # run with bash, not submitted: say how to submit it
  args=""; (($#)) && args=$(printf ' %q' "$@")
  {
    echo "$0 is a SLURM batch script: submit it with sbatch (it runs torchrun on every node of the job):"
    echo "  sbatch $0$args"
    echo "Without SLURM, on this machine: torchrun --nproc_per_node=2 launch/train.py stage=$STAGE$args"
  } >&2
  exit 2
fi
# sbatch runs a copy of this file from its spool directory: find the checkout from where sbatch was run.
# shellcheck source=slurm/common.sh
source "${QVL_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh" "$@"
