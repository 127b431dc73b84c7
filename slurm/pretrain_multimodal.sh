#!/usr/bin/env bash
# Sparse multimodal pretraining on a Slurm cluster, or on this machine's local ranks without Slurm.
#
#   sbatch slurm/pretrain_multimodal.sh                                  # defaults below
#   sbatch --nodes=4 --time=48:00:00 slurm/pretrain_multimodal.sh        # any #SBATCH line, overridden
#   CONFIG=pretrain/configs/multimodal-base.yaml DATA=/data/corpus RUN_DIR=/ckpt/mm \
#     ARGS="train.steps=100000" sbatch slurm/pretrain_multimodal.sh
#   bash slurm/pretrain_multimodal.sh                                    # no Slurm: tiny config, sample corpus
#
# Environment: CONFIG, DATA (a corpus folder laid out like the sample), RUN_DIR, EXPORT_DIR, ARGS (key=value
# overrides), PYTHON; without Slurm also NPROC (local ranks, default 2), MASTER_PORT, SAMPLE (where the
# sample corpus is written when DATA is not given).
#
# `--mem=0` asks for each node's whole memory. With --gpus-per-node every rank sees the node's GPUs and takes
# the one of its local rank; with --gpus-per-task or --gpu-bind it sees one and takes that. A job given GPUs
# whose torch has no CUDA stops with an error instead of training on the CPU.
#
# Slurm sends SIGUSR1 five minutes before the time limit; every rank checkpoints, rank 0 requeues the job,
# and the requeued job resumes from that checkpoint by itself (checkpoint.resume=auto).
#SBATCH --job-name=skillnet-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

if [ -n "${SLURM_SUBMIT_DIR:-}" ]; then cd "$SLURM_SUBMIT_DIR"; else cd "$(dirname "$0")/.."; fi
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
CONFIG=${CONFIG:-pretrain/configs/tiny.yaml}
RUN_DIR=${RUN_DIR:-runs/$(basename "$CONFIG" .yaml)}
EXPORT_DIR=${EXPORT_DIR:-$RUN_DIR/export}
read -r -a EXTRA <<< "${ARGS:-}"
OVERRIDES=("run_dir=$RUN_DIR" "${EXTRA[@]}")
if [ -n "${DATA:-}" ]; then
  OVERRIDES+=("data_root=$DATA")
else
  SAMPLE=${SAMPLE:-data/sample}
  "$PYTHON" -m pretrain.prepare_sample --out "$SAMPLE"  # writes the sample corpus and its tokenizer once
  OVERRIDES+=("data_root=$SAMPLE")
fi

if [ -n "${SLURM_JOB_ID:-}" ]; then
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  MASTER_ADDR=$(scontrol show node "$first" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')  # the address Slurm reaches it at
  export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  # srun does not inherit sbatch's --cpus-per-task (Slurm 22.05+): pass it on, or each rank gets one CPU
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
  srun --kill-on-bad-exit=1 "$PYTHON" -m pretrain --config "$CONFIG" "${OVERRIDES[@]}"
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # torchrun's own default, set here so it need not print a banner
  "$PYTHON" -m torch.distributed.run --nproc_per_node "${NPROC:-2}" --master_port "${MASTER_PORT:-29500}" \
    -m pretrain --config "$CONFIG" "${OVERRIDES[@]}"
fi

# Training exits non-zero when a signal stopped it early (the requeued job carries on), so reaching
# this line means it finished: export the newest checkpoint.
"$PYTHON" -m pretrain.export "$RUN_DIR" "$EXPORT_DIR"
echo "checkpoints: $RUN_DIR/checkpoints"
echo "tensorboard: $RUN_DIR/tensorboard   (tensorboard --logdir $RUN_DIR/tensorboard)"
echo "exported:    $EXPORT_DIR   (SkillNetForPreTraining.from_pretrained, AutoModel.from_pretrained)"
