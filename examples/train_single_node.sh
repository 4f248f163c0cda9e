#!/usr/bin/env bash
# Both stages of patch-level training on one node of 8 GPUs with torchrun.
#
#   MODEL=370m DATA=data/train_text_document TOKENIZER=tokenizers/spm32k.model \
#   SAVE=checkpoints/370m-patch bash examples/train_single_node.sh
#
# Token budget: TRAIN_TOKENS (default 360e9, the paper's), global batch 1024 x 2048 tokens
# (2M tokens per step in both stages); K=4, lambda=2/3. Re-running the same command resumes.
set -euo pipefail
MODEL=${MODEL:-370m}
GPUS=${GPUS:-8}
: "${DATA:?set DATA to a .bin/.idx prefix (tools/preprocess_data.py)}"
: "${TOKENIZER:?set TOKENIZER to the SentencePiece .model}"
: "${SAVE:?set SAVE to the checkpoint directory}"

# recommended layouts on 80 GB H100s (bf16, distributed optimizer); see README "Presets"
case "$MODEL" in
  370m) TP=1 PP=1 MBS=16 ;;
  780m) TP=1 PP=1 MBS=8 ;;
  1.3b) TP=1 PP=1 MBS=8 ;;
  2.7b) TP=1 PP=1 MBS=4 ;;
  6.7b) TP=1 PP=1 MBS=1 ;;
  13b)  TP=2 PP=1 MBS=1 ;;
  *) echo "unknown MODEL=$MODEL" >&2; exit 2 ;;
esac

mkdir -p "$SAVE"
exec torchrun --standalone --nproc_per_node="$GPUS" examples/pretrain_patch_gpt.py \
  --model "$MODEL" --bf16 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --micro-batch-size "$MBS" --global-batch-size 1024 --seq-length 2048 \
  --train-tokens "${TRAIN_TOKENS:-360000000000}" \
  --patch-size 4 --patch-data-fraction 0.6667 --stage both \
  --lr 3e-4 --min-lr 0 --lr-warmup-iters 2000 --lr-decay-style cosine \
  --weight-decay 0.1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 \
  --data-path "$DATA" --split 999,1,0 --tokenizer-model "$TOKENIZER" \
  --save "$SAVE" --load "$SAVE" --save-interval 1000 \
  --eval-interval 1000 --eval-iters 10 --log-interval 10 --num-workers 2 \
  --tensorboard-dir "$SAVE/tensorboard"
