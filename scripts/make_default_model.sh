#!/usr/bin/env bash
# Recreates the packaged default model (rimnet/default_model) from simulated data with the
# project's own commands. Usage: scripts/make_default_model.sh WORK_DIR [MODEL_DIR]
#
# Training data: three cohorts of Siemens-preset scans, MS only, with more lesions and more
# rims per patient than a clinical cohort (so that many lesions come from few scans):
#   cohort1 (seed 101, 75 scans): template anatomy, 1 mm, PRLs drawn size-biased (the
#     simulator's default, as in real cohorts);
#   cohort2 (seed 202, 75 scans): the same with PRLs drawn size-blind (MS.style.prl_size_bias=0).
#     With 30 % PRLs and a size bias, almost every large lesion is a PRL; the size-blind cohort
#     keeps the network from learning "large = rim" (see docs/simulator.md);
#   c4 (seed 404, 60 scans): procedural anatomy, head tilt up to 20 deg, FLAIR at 1x1x3 mm,
#     somewhat larger lesions: what real scans vary in and the template cohorts do not.
# The folder names matter: participant ids are qualified by them, and so are the splits.
# Labels: the simulation's ground truth (truth_prl). Patches are snapped to the voxel grid
# (the default of `qsmrim extract`).
# Background blur: the packaged model (v8, session 14) was trained on cohorts simulated with
# the corrected forward model (--background-blur 1, qsmrim's default; docs/simulator.md,
# "Background field and head tilt"). BACKGROUND_BLUR=0 recreates the cohorts of the models
# up to v7, whose forward model point-sampled the air edges.
# SIM_WORKERS (default 2) is the number of simulator processes, RECON_JOBS (default 2) the
# number of scans reconstructed at once (qsmrim recon --jobs); neither changes the data beyond
# float rounding (the simulator's scans are identical; recon's differ in the last bits).
set -euo pipefail
work=${1:?usage: make_default_model.sh WORK_DIR [MODEL_DIR]}
model=${2:-rimnet/default_model}
mkdir -p "$work"
common=(--preset ms-only --scanner siemens --set MS.lesions_mean=24
        --set MS.lesions_sd=5 --set MS.sessions_mean=1 --set MS.lesion_prl_fraction=0.3
        --set MS.patient_prl_fraction=0.9 --background-blur "${BACKGROUND_BLUR:-1}"
        --workers "${SIM_WORKERS:-2}" --no-progress)
qsmrim simulate "$work/cohort1/bids" "${common[@]}" --subjects 75 --seed 101
qsmrim simulate "$work/cohort2/bids" "${common[@]}" --subjects 75 --seed 202 --set MS.style.prl_size_bias=0
qsmrim simulate "$work/c4/bids" "${common[@]}" --subjects 60 --seed 404 --anatomy procedural \
  --max-tilt 20 --flair-voxel-size 1 1 3 --set MS.style.long_axis_median_mm=8
for c in cohort1 cohort2 c4; do
  qsmrim recon "$work/$c/bids" "$work/$c/qsm" --jobs "${RECON_JOBS:-2}" --no-progress
  qsmrim extract "$work/$c/bids" "$work/$c/patches" --qsm "$work/$c/qsm" \
    --lesions "$work/$c/bids/derivatives/lesions" \
    --labels "$work/$c/bids/derivatives/lesions/lesions.tsv"
done
qsmrim train --patches "$work/cohort1/patches" "$work/cohort2/patches" "$work/c4/patches" \
  --label-column truth_prl --folds 5 --seed 0 --epochs 40 --patience 10 --jobs 2 \
  --out "$model"
# other settings are the defaults (training/config.py): lesion-edge shell features,
# 32 mm / 32 samples, deploy prevalence 0.11
