# The trainer flags of both launch scripts (examples/train_single_node.sh and
# examples/train_multi_node.sbatch), in one place. The scripts source it (from their own folder) after
# setting:
#
#   MODEL TP PP MBS      preset and its layout (tensor, pipeline parallel sizes, micro-batch)
#   DATA TOKENIZER SAVE  .bin/.idx prefix, SentencePiece .model, checkpoint directory
#   GBS SEQ_LENGTH       optional: global batch (token-stage sequences, default 1024) and
#                        sequence length (default 2048): 2M tokens per step in both stages
#   TRAIN_TOKENS         optional: token budget of both stages (default 360000000000, the paper's 360B)
#
# It defines the bash array TRAIN_ARGS; the scripts pass "${TRAIN_ARGS[@]}" and then their own
# command-line arguments, so a flag with a value given there overrides the one here (argparse keeps
# the last value). Not the budget: --train-tokens is always passed and the trainer refuses
# --train-iters beside it, so set TRAIN_TOKENS instead.
: "${MODEL:?}" "${TP:?}" "${PP:?}" "${MBS:?}"
: "${DATA:?set DATA to a .bin/.idx prefix (tools/preprocess_data.py)}"
: "${TOKENIZER:?set TOKENIZER to the SentencePiece .model}"
: "${SAVE:?set SAVE to the checkpoint directory}"
GBS=${GBS:-1024}
SEQ_LENGTH=${SEQ_LENGTH:-2048}
TRAIN_ARGS=(
  --model "$MODEL" --bf16 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --micro-batch-size "$MBS" --global-batch-size "$GBS" --seq-length "$SEQ_LENGTH"
  --train-tokens "${TRAIN_TOKENS:-360000000000}"
  --patch-size 4 --patch-data-fraction 0.6667 --stage both
  --lr 3e-4 --min-lr 0 --lr-warmup-iters 2000 --lr-decay-style cosine
  --weight-decay 0.1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95
  --data-path "$DATA" --split 999,1,0 --tokenizer-model "$TOKENIZER"
  --save "$SAVE" --load "$SAVE" --save-interval 1000
  --eval-interval 1000 --eval-iters 10 --log-interval 10 --num-workers 2
  --tensorboard-dir "$SAVE/tensorboard"
)
# with tensor parallelism, sequence parallelism too (Megatron-LM's practice; the memory plans assume it)
if (( TP > 1 )); then TRAIN_ARGS+=(--sequence-parallel); fi
