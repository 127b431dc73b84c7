#!/usr/bin/env bash
# Finetuning on a Slurm cluster, or on this machine's local ranks without Slurm, launched like pretraining.
#
#   INIT=runs/multimodal-base/export CONFIG=finetune/configs/nlu_multitask.yaml sbatch slurm/finetune.sh
#   INIT=... CONFIG=... OUT=/ckpt/ft ARGS="train.steps=2000" sbatch --nodes=1 slurm/finetune.sh
#   INIT=... CONFIG=... bash slurm/finetune.sh                             # no Slurm: NPROC local ranks
#
# Environment: INIT (the model to start from: an export of pretraining, default runs/tiny/export, where
# slurm/pretrain_multimodal.sh exports), CONFIG (a finetuning YAML or a shipped config's name), OUT (the
# output folder, default runs/finetune/<config name>), DATA (the folder the tasks' relative data paths are
# read from, the config's `data_root`), ARGS (key=value overrides), PYTHON; without Slurm
# also NPROC (local ranks, default 1) and MASTER_PORT.
#
# Slurm sends SIGUSR1 five minutes before the time limit; every rank checkpoints, rank 0 requeues the job,
# and the requeued job resumes from that checkpoint by itself (checkpoint.resume=auto). A plain `scancel`
# (SIGTERM) checkpoints and stops without requeueing.
#SBATCH --job-name=skillnet-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

if [ -n "${SLURM_SUBMIT_DIR:-}" ]; then cd "$SLURM_SUBMIT_DIR"; else cd "$(dirname "$0")/.."; fi
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
CONFIG=${CONFIG:-finetune/configs/sentiment_analysis.yaml}
INIT=${INIT:-runs/tiny/export}
OUT=${OUT:-runs/finetune/$(basename "$CONFIG" .yaml)}
read -r -a EXTRA <<< "${ARGS:-}"
ARGV=(--config "$CONFIG" --init "$INIT" "output_dir=$OUT" ${DATA:+"data_root=$DATA"} "${EXTRA[@]}")

if [ -n "${SLURM_JOB_ID:-}" ]; then
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  MASTER_ADDR=$(scontrol show node "$first" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')  # the address Slurm reaches it at
  export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  # srun does not inherit sbatch's --cpus-per-task (Slurm 22.05+): pass it on, or each rank gets one CPU
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
  srun --kill-on-bad-exit=1 "$PYTHON" -m finetune "${ARGV[@]}"
else
  "$PYTHON" -m torch.distributed.run --nproc_per_node "${NPROC:-1}" --master_port "${MASTER_PORT:-29500}" \
    -m finetune "${ARGV[@]}"
fi
echo "finetuned:   $OUT   (SkillNetForMultiTask.from_pretrained; python -m finetune.predict --model $OUT ...)"
echo "tensorboard: $OUT/tensorboard"
