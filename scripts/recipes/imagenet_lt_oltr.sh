#!/usr/bin/env bash
# ImageNet-LT with OLTR (Liu et al. 2019): plain OLTR vs OLTR + the frozen CMW-Net meta-trained on CIFAR-10.
#
#   DATA=/data/imagenet NET=runs/cifar10/cmwnet-sl-cifar10-pmd bash scripts/recipes/imagenet_lt_oltr.sh
#   (DATA holds ImageNet_LT_train.txt, ImageNet_LT_test.txt, ImageNet_LT_open.txt and the image folders)
#
# Paper numbers (CMW-Net, ImageNet-LT, ResNet-10 backbone): OLTR 35.6 overall top-1 (few-shot 18.5)
#   ->  OLTR + transferred CMW-Net 39.5 (few-shot 19.7).
# OLTR's official schedule: stage 1 90 epochs (plain classifier), stage 2 60 epochs (meta-embedding, step lr,
# backbone at 0.1x lr), batch 256, SGD lr 0.1. ImageNet_LT_open.txt is picked up for the open-set F-measure.
# timm has no ResNet-10; resnet10t is the closest small ResNet.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:?set DATA to the ImageNet-LT root}
NET=${NET:?set NET to the meta-trained net (directory or hub:ORG/NAME)}
OUT=${OUT:-runs/imagenet-lt}
GPUS=${GPUS:-8}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}

common=(--dataset imagenet-lt --data-dir "$DATA" --trainer oltr --model resnet10t --img-size 224
        --oltr-stage1-epochs 90 --oltr-stage2-epochs 60 --batch-size $((256 / GPUS)) --lr 0.1 --sched multistep
        --decay-milestones 30,60
        --workers 8 --amp)
$TORCHRUN --nproc_per_node "$GPUS" -m cmw_transfer apply --weighting none "${common[@]}" --out "$OUT/oltr"
$TORCHRUN --nproc_per_node "$GPUS" -m cmw_transfer apply --weights "$NET" --warmup-epochs 10 "${common[@]}" \
    --out "$OUT/oltr-cmw"
cat "$OUT/oltr/summary.json" "$OUT/oltr-cmw/summary.json"
