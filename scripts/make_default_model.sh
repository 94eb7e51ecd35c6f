#!/usr/bin/env bash
# Recreates the packaged default model (rimnet/default_model) from simulated data with the
# project's own commands. Usage: scripts/make_default_model.sh WORK_DIR
# Training data: Siemens-preset scans only (1 mm and 1.5 mm isotropic), an MS-only cohort
# with more lesions and more rims per patient than a clinical cohort, so that ~1,000+
# lesions come from few scans. Labels: the simulation's ground truth (truth_prl).
set -euo pipefail
work=${1:?usage: make_default_model.sh WORK_DIR}
mkdir -p "$work"
sets=(--set MS.lesions_mean=24 --set MS.lesions_sd=5 --set MS.sessions_mean=1
      --set MS.lesion_prl_fraction=0.3 --set MS.patient_prl_fraction=0.9)
for spec in "1mm 1 101 ${N1:-24}" "15mm 1.5 202 ${N15:-30}"; do
  read -r name vox seed n <<<"$spec"
  qsmrim simulate "$work/$name/bids" --preset ms-only --subjects "$n" --seed "$seed" \
    --scanner siemens --voxel-size "$vox" "$vox" "$vox" "${sets[@]}" --no-progress
  qsmrim recon "$work/$name/bids" "$work/$name/qsm"
  qsmrim extract "$work/$name/bids" "$work/$name/patches" --qsm "$work/$name/qsm" \
    --lesions "$work/$name/bids/derivatives/lesions" \
    --labels "$work/$name/bids/derivatives/lesions/lesions.tsv"
done
