#!/usr/bin/env bash
# Both stages of patch-level training on one node with torchrun: one worker per GPU of
# CUDA_VISIBLE_DEVICES (8 when it is not set; GPUS=N wins).
#
#   MODEL=370m DATA=data/train_text_document TOKENIZER=tokenizers/spm32k.model \
#   SAVE=checkpoints/370m-patch bash examples/train_single_node.sh [more trainer flags]
#
# Token budget: TRAIN_TOKENS (default 360000000000, the paper's 360B), global batch 1024 x 2048 tokens
# (2M tokens per step in both stages); K=4, lambda=2/3. The flags are in examples/train_args.sh;
# trainer flags after the script name override them. Re-running the same command resumes.
# It runs from any working directory: train_args.sh and the trainer are found beside the script, and
# DATA, TOKENIZER, SAVE and the paths in trainer flags are read relative to the caller's directory.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODEL=${MODEL:-370m}
if [[ -z ${GPUS:-} && -n ${CUDA_VISIBLE_DEVICES+set} ]]; then  # e.g. a SLURM allocation of fewer GPUs
  if [[ -z $CUDA_VISIBLE_DEVICES ]]; then
    echo "CUDA_VISIBLE_DEVICES is set but empty, so no GPU is visible: unset it, list the GPUs, or set GPUS=N" >&2
    exit 2
  fi
  visible_commas=${CUDA_VISIBLE_DEVICES//[^,]/}
  GPUS=$(( ${#visible_commas} + 1 ))
fi
GPUS=${GPUS:-8}
if [[ ! $GPUS =~ ^[1-9][0-9]*$ ]]; then
  echo "GPUS=$GPUS must be a positive whole number" >&2
  exit 2
fi

# recommended layouts on 80 GB H100s (bf16, distributed optimizer; see README "Presets"); TP, PP
# and MBS set in the environment win
case "$MODEL" in
  370m) TP=${TP:-1} PP=${PP:-1} MBS=${MBS:-16} ;;
  780m) TP=${TP:-1} PP=${PP:-1} MBS=${MBS:-8} ;;
  1.3b) TP=${TP:-1} PP=${PP:-1} MBS=${MBS:-8} ;;
  2.7b) TP=${TP:-1} PP=${PP:-1} MBS=${MBS:-4} ;;
  6.7b) TP=${TP:-1} PP=${PP:-1} MBS=${MBS:-1} ;;
  13b)  TP=${TP:-2} PP=${PP:-1} MBS=${MBS:-1} ;;
  *) : "${TP:?MODEL=$MODEL has no layout here: set TP, PP and MBS}" "${PP:?set PP}" "${MBS:?set MBS}" ;;
esac
source "$here/train_args.sh"

# a SIGTERM to torchrun gives the workers this long to save before it kills them. Under sbatch, ask
# for it before the time limit with #SBATCH --signal=B:TERM@300 (B: the batch shell, which exec made
# torchrun), or by hand with scancel --signal=TERM --full JOB; a time limit or a plain scancel
# without it kills everything SLURM's KillWait (30 s) after its SIGTERM
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-270}
mkdir -p "$SAVE"
exec torchrun --standalone --nproc_per_node="$GPUS" "$here/pretrain_patch_gpt.py" \
  "${TRAIN_ARGS[@]}" "$@"
