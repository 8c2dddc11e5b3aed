#!/bin/bash
# The RL table of bench/RESULTS.md. Run from the repository root after training the parent:
#   medtune train configs/drive_unet.yaml     (-> runs/drive-unet)
set -ex
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
M="nice -n 5 .venv/bin/medtune"
$M eval runs/drive-unet
$M train configs/drive_rl_recall.yaml rl.init_from=runs/drive-unet
$M eval runs/drive-rl-recall
$M train configs/drive_rl_multi.yaml rl.init_from=runs/drive-unet
$M eval runs/drive-rl-multi
$M compare runs/drive-unet runs/drive-rl-recall runs/drive-rl-multi --out runs/cmp-cal
$M compare runs/drive-unet runs/drive-rl-recall runs/drive-rl-multi --threshold 0.5 --out runs/cmp-t050
