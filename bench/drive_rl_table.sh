#!/bin/bash
set -ex
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$PWD/src
M="nice -n 5 /work/main/.venv/bin/python -m medtune.cli"
$M eval runs/drive-unet
$M train configs/drive_rl_recall.yaml rl.init_from=runs/drive-unet
$M eval runs/drive-rl-recall
$M train configs/drive_rl_multi.yaml rl.init_from=runs/drive-unet
$M eval runs/drive-rl-multi
$M compare runs/drive-unet runs/drive-rl-recall runs/drive-rl-multi --out runs/cmp-cal > runs/compare-cal.txt
$M compare runs/drive-unet runs/drive-rl-recall runs/drive-rl-multi --threshold 0.5 --out runs/cmp-t050 > runs/compare-t050.txt
echo DONE
