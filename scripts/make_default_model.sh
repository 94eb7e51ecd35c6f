#!/usr/bin/env bash
# Recreates the packaged default model (rimnet/default_model) from simulated data with the
# project's own commands. Usage: scripts/make_default_model.sh WORK_DIR [MODEL_DIR]
#
# Training data: 75 Siemens-preset scans at 1 mm, an MS-only cohort with more lesions and
# more rims per patient than a clinical cohort (so that many lesions come from few scans).
# Labels: the simulation's ground truth (truth_prl).
set -euo pipefail
work=${1:?usage: make_default_model.sh WORK_DIR [MODEL_DIR]}
model=${2:-rimnet/default_model}
mkdir -p "$work"
qsmrim simulate "$work/bids" --preset ms-only --subjects 75 --seed 101 --scanner siemens \
  --set MS.lesions_mean=24 --set MS.lesions_sd=5 --set MS.sessions_mean=1 \
  --set MS.lesion_prl_fraction=0.3 --set MS.patient_prl_fraction=0.9 --no-progress
qsmrim recon "$work/bids" "$work/qsm"
qsmrim extract "$work/bids" "$work/patches" --qsm "$work/qsm" \
  --lesions "$work/bids/derivatives/lesions" \
  --labels "$work/bids/derivatives/lesions/lesions.tsv"
qsmrim train --patches "$work/patches" --label-column truth_prl --folds 5 --seed 0 \
  --epochs 50 --patience 15 --out "$model"
# defaults used: resnet + lesion-edge shell features, 32 mm / 32 samples;
# see training/config.py
