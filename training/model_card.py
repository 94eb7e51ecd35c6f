"""The model card written into every model directory (``model_card.md``)."""

from __future__ import annotations

import datetime
from pathlib import Path

from qsm_core.io.atomic import write_text

__all__ = ["write_model_card", "render_model_card"]

TEMPLATE = """# Model card: qsmrim rim CNN

*Generated {date} by qsmrim {version}. Edit the free-text sections; the numbers come from
`metrics.json`.*

## What it does
Scores each FLAIR lesion for a paramagnetic rim (PRL) from a {patch_mm:g} mm cube
({patch_voxels}^3 voxels) of {channels} centred on the lesion. Output: a calibrated rim
probability (`cnn_prob`) and a call (`cnn_call`, probability >= {threshold:.3f}).

## Model
- Architecture: `{arch}` from MONAI parts, widths {net_channels}, {n_params} parameters per
  fold network; lesion-type head: {types}; {shells}.
- Ensemble of {n_folds} fold networks (patient-grouped cross-validation), test-time augmentation
  `{tta}` (flips/rotations about B0), temperature scaling (T = {temperature:.3f}, offset
  {offset:+.3f}) fitted on out-of-fold logits.{distilled}
- Probabilities are for a cohort with {prevalence} of lesions with rims (the training
  data had {train_prevalence}; logit shift {shift:+.3f}); the call threshold is chosen for
  that cohort. Retrain with `--deploy-prevalence` for a cohort with a different share.

## Training data
- Label column `{label_column}`; {n_lesions} lesions ({n_positive} rims) from
  {n_participants} participants.
- Data fingerprint: table sha256 `{table_sha}`, patches sha256 `{patch_sha}`.
- Describe the data here (source, scanners, annotation protocol). For the shipped default
  model: simulated cohorts from `qsmrim simulate` (synthetic data only).

## Cross-validation (out-of-fold, pooled)
| metric | value |
|---|---|
| ROC AUC | {roc} |
| PR AUC | {pr} |
| mean fold ROC AUC | {mroc} |
| mean fold PR AUC | {mpr} |
| NLL before / after temperature scaling | {nll0} / {nll1} |
| sensitivity / specificity at threshold | {sens} / {spec} |
| Cohen's kappa of calls vs labels (training cohort's share of rims) | {kappa} |

Per fold:
{fold_rows}

Early stopping picks each fold's epoch on that fold's own validation PR AUC, so these
out-of-fold figures are slightly optimistic; judge the model on held-out data.

## Limits
- Not a medical device; not for clinical use.
- Trained on the data above only; a model trained on simulated data has not seen real scans.
  Check calibration and the threshold on your own data before relying on the calls.
- Expects QSM in ppm processed like qsmrim's pipeline and lesion masks from FLAIR.

## Recreate
```
{command}
```
"""


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def render_model_card(*, config, metrics: dict, fingerprint: dict, calibration: dict,
                      n_params: int, command: str | None) -> str:
    """Markdown text of the model card."""
    from qsm_core import __version__

    pooled = metrics["pooled"]
    rows = ["| fold | lesions | rims | ROC AUC | PR AUC |", "|---|---|---|---|---|"]
    rows += [f"| {f['fold']} | {f['n_lesions']} | {f['n_positive']} | {_fmt(f['roc_auc'])} | "
             f"{_fmt(f['pr_auc'])} |" for f in metrics["folds"]]
    return TEMPLATE.format(
        date=datetime.date.today().isoformat(), version=__version__,
        patch_mm=config.patch_mm, patch_voxels=config.patch_voxels,
        channels=", ".join(config.channels), threshold=calibration["threshold"],
        arch=config.arch, net_channels=config.net_channels, n_params=f"{n_params:,}",
        types=(f"{config.n_types} types ({config.type_column})" if config.n_types else "none"),
        shells=("lesion-edge shell features (`rimnet.shells`) fused into the head"
                + (", QSM centred on the ring around the lesion" if config.centre_qsm else "")
                if config.shell_features else "image features only"),
        n_folds=len(metrics["folds"]), tta=config.tta, temperature=calibration["temperature"],
        offset=calibration["offset"], label_column=config.label_column,
        prevalence=_share(calibration.get("deploy_prevalence")
                          or calibration.get("train_prevalence")),
        train_prevalence=_share(calibration.get("train_prevalence")),
        shift=float(calibration.get("prior_shift", 0.0)),
        n_lesions=fingerprint.get("n_lesions"), n_positive=fingerprint.get("n_positive"),
        n_participants=fingerprint.get("n_participants"),
        table_sha=fingerprint.get("table_sha256", "")[:16],
        patch_sha=fingerprint.get("patches_sha256", "")[:16],
        roc=_fmt(pooled["roc_auc"]), pr=_fmt(pooled["pr_auc"]),
        mroc=_fmt(metrics["mean_fold"]["roc_auc"]), mpr=_fmt(metrics["mean_fold"]["pr_auc"]),
        nll0=_fmt(pooled["nll_uncalibrated"]), nll1=_fmt(pooled["nll_calibrated"]),
        sens=_fmt(pooled["sensitivity"]), spec=_fmt(pooled["specificity"]),
        kappa=_fmt(pooled["kappa"]), fold_rows="\n".join(rows),
        command=command or "(command not recorded)", distilled=_distilled(config))


def _distilled(config) -> str:
    if not getattr(config, "teacher", None):
        return ""
    return (f"\n- Distilled from `{config.teacher}` (soft-target weight "
            f"{config.distill_weight:g}): each fold network also learned that ensemble's "
            "probabilities. The teacher's networks had seen every lesion, validation lesions "
            "included, so the out-of-fold figures below are optimistic.")


def _share(value) -> str:
    return "an unrecorded share" if value is None else f"{100 * float(value):.0f} %"


def write_model_card(model_dir, *, config, metrics: dict, fingerprint: dict,
                     command: str | None) -> Path:
    """Write ``model_dir/model_card.md`` (atomically)."""
    import json

    from rimnet.model import network_kwargs_from_config
    from rimnet.network import build_network, count_parameters

    model_dir = Path(model_dir)
    calib = json.loads((model_dir / "temperature.json").read_text())
    n_params = count_parameters(build_network(**network_kwargs_from_config(config.to_dict())))
    text = render_model_card(config=config, metrics=metrics, fingerprint=fingerprint,
                             calibration=calib, n_params=n_params, command=command)
    return write_text(model_dir / "model_card.md", text)
