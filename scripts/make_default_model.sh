#!/usr/bin/env bash
# Recreates the packaged default model (rimnet/default_model) from simulated data with the
# project's own commands. Usage: scripts/make_default_model.sh WORK_DIR [MODEL_DIR]
#
# Training data: two cohorts of 75 Siemens-preset scans at 1 mm, MS only, with more lesions
# and more rims per patient than a clinical cohort (so that many lesions come from few scans):
#   cohort1 (seed 101): PRLs drawn size-biased (the simulator's default, as in real cohorts);
#   cohort2 (seed 202): PRLs drawn size-blind (MS.style.prl_size_bias=0).
# With 30 % PRLs and a size bias, almost every large lesion is a PRL; the size-blind cohort
# keeps the network from learning "large = rim" (see docs/simulator.md).
# Labels: the simulation's ground truth (truth_prl). Patches are snapped to the voxel grid
# (the default of `qsmrim extract`).
set -euo pipefail
work=${1:?usage: make_default_model.sh WORK_DIR [MODEL_DIR]}
model=${2:-rimnet/default_model}
mkdir -p "$work"
common=(--preset ms-only --subjects 75 --scanner siemens --set MS.lesions_mean=24
        --set MS.lesions_sd=5 --set MS.sessions_mean=1 --set MS.lesion_prl_fraction=0.3
        --set MS.patient_prl_fraction=0.9 --no-progress)
qsmrim simulate "$work/cohort1/bids" "${common[@]}" --seed 101
qsmrim simulate "$work/cohort2/bids" "${common[@]}" --seed 202 --set MS.style.prl_size_bias=0
for c in cohort1 cohort2; do
  qsmrim recon "$work/$c/bids" "$work/$c/qsm"
  qsmrim extract "$work/$c/bids" "$work/$c/patches" --qsm "$work/$c/qsm" \
    --lesions "$work/$c/bids/derivatives/lesions" \
    --labels "$work/$c/bids/derivatives/lesions/lesions.tsv"
done
qsmrim train --patches "$work/cohort1/patches" "$work/cohort2/patches" \
  --label-column truth_prl --folds 5 --seed 0 --epochs 40 --patience 10 --jobs 2 \
  --out "$model"
# other settings are the defaults (training/config.py): lesion-edge shell features,
# 32 mm / 32 samples, deploy prevalence 0.11
