#!/bin/sh
# spark-me container entrypoint.
#   docker run ... spark-me [pretrain flags]            -> spark-me pretrain (one process per GPU)
#   docker run ... spark-me export|finetune-det|bench|reconstruct|smoke ...  -> that subcommand
# NPROC_PER_NODE (default: every visible GPU) processes via torchrun; multi-node: set NNODES,
# NODE_RANK, MASTER_ADDR, MASTER_PORT as torchrun documents.
set -eu

case "${1:-}" in
    export|import-timm|finetune-det|bench|reconstruct|smoke|--help|-h)
        exec spark-me "$@" ;;
    pretrain)
        shift ;;
esac

gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
nproc="${NPROC_PER_NODE:-$gpus}"
if [ "${nproc}" -gt 1 ] || [ "${NNODES:-1}" -gt 1 ]; then
    exec torchrun --nproc_per_node "${nproc}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
        --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
        -m spark_me.cli pretrain "$@"
fi
exec spark-me pretrain "$@"
