#!/usr/bin/env bash
# Recreates the held-out evaluation of the packaged default model (the tables of
# rimnet/default_model/model_card.md and docs/benchmarks.md) with the project's own commands.
# Usage: scripts/heldout_cohorts.sh WORK_DIR [MODEL_DIR] [COHORT ...]
#
# Cohorts (none of their seeds is used in training; scripts/make_default_model.sh):
#   siemens, philips, aniso  one cohort plan (seed 7777, 10 patients, ~16 lesions each)
#                            acquired with the Siemens and Philips echo presets at 1 mm and
#                            with the Siemens preset at 0.9 x 0.9 x 2 mm: the cross-scanner test
#   heldout2                 a second, larger cohort (seed 8888, 20 patients, Siemens 1 mm)
#   stress, stress2          harder scans (seeds 4242 and 5151, 12 patients): procedural
#                            anatomy, head tilt up to 15 deg, FLAIR at 1 x 1 x 3 mm, larger lesions
#   irregular                the siemens plan with lobulated, irregular lesion outlines
#                            (boundary noise 0.3-0.5 instead of 0.08-0.22); not run by default
#   discrete                 the siemens plan with fields from the finite-difference dipole
#                            kernel, which the inversion does not share (no "inverse crime");
#                            not run by default
#   lowsnr                   the siemens plan at half the SNR (20 instead of 40); not run by
#                            default
#   singleecho               the siemens plan acquired with one echo (TE 20 ms, the
#                            single-echo preset); not run by default
#   7t, 1.5t                 the siemens plan on a 7 T or a 1.5 T magnet (phase and R2* scale
#                            with B0; same echo times and SNR); not run by default
#   sagittal, coronal        the siemens plan stored with permuted, flipped voxel axes (P,I,R
#                            and the left-handed R,S,A): the same scans, so their scores should
#                            match siemens'; not run by default
# BACKGROUND_BLUR=0 in the environment simulates the cohorts as qsmrim did before 2026-11-22,
# with point-sampled air edges in the forward model (qsmrim simulate --background-blur): the
# model card's tables up to session 11 were made that way.
# SIM_WORKERS (default 2): simulator processes (the scans do not depend on it); RECON_JOBS
# (default 2): scans reconstructed at once (qsmrim recon --jobs).
# Each: qsmrim simulate -> recon -> predict (--qsm, no montages) -> evaluate (--scored-only);
# the summary of each report is WORK_DIR/<cohort>/report/report.md. About 5-10 min per
# cohort on 2 cores, mostly reconstruction.
set -euo pipefail
work=${1:?usage: heldout_cohorts.sh WORK_DIR [MODEL_DIR] [COHORT ...]}
known=" siemens philips aniso heldout2 stress stress2 irregular discrete lowsnr singleecho "
known+="7t 1.5t sagittal coronal "
model=${2:-}
if [ -n "$model" ] && [ ! -d "$model" ] && [[ $known == *" $model "* ]]; then
  model=""  # a cohort name in the MODEL_DIR slot: the packaged model, cohorts from $2 on
  shift 1
else
  shift $(( $# >= 2 ? 2 : 1 ))
fi
if [ -n "$model" ] && [ ! -d "$model" ]; then
  echo "heldout_cohorts.sh: MODEL_DIR '$model' is not a folder (give a model directory, or" \
       "leave it out for the packaged model)" >&2
  exit 2
fi
cohorts=("$@")
[ ${#cohorts[@]} -eq 0 ] && cohorts=(siemens philips aniso heldout2 stress stress2)
mkdir -p "$work"
general=(--preset general-ms --set MS.sessions_mean=1 --workers "${SIM_WORKERS:-2}" --no-progress
         ${BACKGROUND_BLUR:+--background-blur "$BACKGROUND_BLUR"})
plan=(--subjects 10 --seed 7777 --set MS.lesions_mean=16)  # the seed-7777 cohort plan
stress=(--subjects 12 --anatomy procedural --max-tilt 15 --flair-voxel-size 1 1 3
        --set MS.lesions_mean=20 --set MS.style.long_axis_median_mm=8.5)
for c in "${cohorts[@]}"; do
  d="$work/$c"
  case $c in
    siemens) opts=("${plan[@]}" --scanner siemens) ;;
    philips) opts=("${plan[@]}" --scanner philips) ;;
    aniso) opts=("${plan[@]}" --scanner siemens --voxel-size 0.9 0.9 2) ;;
    heldout2) opts=(--subjects 20 --seed 8888 --scanner siemens --set MS.lesions_mean=16) ;;
    stress) opts=(--seed 4242 "${stress[@]}") ;;
    stress2) opts=(--seed 5151 "${stress[@]}") ;;
    irregular) opts=("${plan[@]}" --scanner siemens --set MS.style.irregularity_min=0.3
                     --set MS.style.irregularity_max=0.5) ;;
    discrete) opts=("${plan[@]}" --scanner siemens --forward-kernel discrete) ;;
    lowsnr) opts=("${plan[@]}" --scanner siemens --snr 20) ;;
    singleecho) opts=("${plan[@]}" --scanner single-echo) ;;
    7t) opts=("${plan[@]}" --scanner siemens --field-strength 7) ;;
    1.5t) opts=("${plan[@]}" --scanner siemens --field-strength 1.5) ;;
    sagittal) opts=("${plan[@]}" --scanner siemens --orientation sagittal) ;;
    coronal) opts=("${plan[@]}" --scanner siemens --orientation coronal) ;;
    *) echo "heldout_cohorts.sh: unknown cohort '$c' (known:${known% })" >&2; exit 2 ;;
  esac
  [ -f "$d/bids/participants.tsv" ] || qsmrim simulate "$d/bids" "${general[@]}" "${opts[@]}"
  qsmrim recon "$d/bids" "$d/qsm" --jobs "${RECON_JOBS:-2}" --no-progress
  qsmrim predict "$d/bids" "$d/pred" --lesions "$d/bids/derivatives/lesions" --qsm "$d/qsm" \
    --no-review --no-progress ${model:+--model "$model"}
  qsmrim evaluate --participants "$d/bids/participants.tsv" \
    --lesions "$d/bids/derivatives/lesions/lesions.tsv" --predictions "$d/pred/predictions.tsv" \
    --out "$d/report" --scored-only --no-figures
done
