#!/usr/bin/env bash
# Transfer to full WebVision (Google + Flickr, 1000 classes, 2.4M images) on 8 GPUs with torchrun:
# ERM vs the frozen CMW-Net-SL meta-trained on CIFAR-10 (scripts/recipes/cifar10_pmd_metatrain.sh).
#
#   DATA=/data/webvision NET=runs/cifar10/cmwnet-sl-cifar10-pmd bash scripts/recipes/webvision_transfer.sh
#   (NET may also be hub:ORG/cmwnet-sl-cifar10-pmd)
#
# Paper numbers (CMW-Net, Table 10; InceptionResNetV2 from scratch, 90 epochs):
#   ERM 69.7 top-1 (WebVision val)   ->   ERM + transferred CMW-Net-SL 77.9 top-1 (ILSVRC12 val, 92.6 top-5),
#   69.6 / 88.5 on WebVision val.
# The paper's recipe: global batch 256, SGD lr 0.2, momentum 0.9, wd 5e-5, x0.1 at epochs 30 and 60, 10 CE warm-up
# epochs, EMA teacher 0.997, mixup Beta(0.2, 0.2). ILSVRC12 val is an --extra-eval list with WebVision class ids.
# Multi-node: add --nnodes N --node_rank R --master_addr HOST --master_port 29500 to torchrun (docs/apply.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:?set DATA to the WebVision root (info/train_filelist_google.txt, ...)}
NET=${NET:?set NET to the meta-trained net (directory or hub:ORG/NAME)}
OUT=${OUT:-runs/webvision}
GPUS=${GPUS:-8}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
EXTRA=()
[ -n "${ILSVRC_VAL_LIST:-}" ] && EXTRA=(--extra-eval "ilsvrc12=list:$ILSVRC_VAL_LIST")

common=(--dataset webvision-full --data-dir "$DATA" --model inception_resnet_v2 --img-size 299 --epochs 90
        --batch-size $((256 / GPUS)) --lr 0.2 --weight-decay 5e-5 --sched multistep --decay-milestones 30,60
        --warmup-epochs 10
        --workers 8 --amp "${EXTRA[@]}")
$TORCHRUN --nproc_per_node "$GPUS" -m cmw_transfer apply --weighting none "${common[@]}" --out "$OUT/erm"
$TORCHRUN --nproc_per_node "$GPUS" -m cmw_transfer apply --weights "$NET" --soft-labels --mixup-alpha 0.2 \
    --teacher-decay 0.997 "${common[@]}" --out "$OUT/cmwnet-sl"
cat "$OUT/erm/summary.json" "$OUT/cmwnet-sl/summary.json"
