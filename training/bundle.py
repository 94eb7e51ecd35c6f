"""Export a model directory as a MONAI bundle.

Layout written::

    BUNDLE/configs/metadata.json   MONAI bundle metadata (versions, input/output formats)
    BUNDLE/configs/inference.json  network definition (``rimnet.network.build_ensemble``)
    BUNDLE/models/model.pt         state dict of the calibrated fold ensemble
    BUNDLE/docs/README.md          the model card

The exported network is a :class:`rimnet.network.FoldEnsemble`: input (N, C, P, P, P)
patches from :func:`rimnet.patches.extract_patches`, output (N, 1) calibrated rim logits
(``sigmoid`` gives the probability). Test-time augmentation is not part of the bundle
network; :class:`rimnet.model.RimCNN` adds it. Load it with MONAI::

    from monai.bundle import ConfigParser
    parser = ConfigParser(); parser.read_config("BUNDLE/configs/inference.json")
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load("BUNDLE/models/model.pt", weights_only=True))
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

from qsm_core.errors import InputError
from qsm_core.io.atomic import atomic_path, write_json
from rimnet.model import RimCNN, network_kwargs_from_config
from rimnet.network import FoldEnsemble

__all__ = ["export_bundle", "bundle_network_kwargs"]


def bundle_network_kwargs(model: RimCNN) -> dict:
    """Arguments of :func:`rimnet.network.build_ensemble` for a loaded model."""
    kw = network_kwargs_from_config(model.config)
    kw["channels"] = list(kw["channels"])
    return {"n_folds": len(model.networks), "temperature": model.temperature,
            "offset": model.offset, "prior_shift": model.prior_shift, "spatial_dims": 3,
            **kw}


def export_bundle(model_dir, bundle_dir, *, overwrite: bool = True) -> Path:
    """Write a MONAI bundle of the model in ``model_dir`` into ``bundle_dir``.

    Parameters
    ----------
    model_dir : str or Path
        A trained model directory.
    bundle_dir : str or Path
        Output folder (created).
    overwrite : bool
        Replace existing bundle files.

    Returns
    -------
    Path
        ``bundle_dir``.
    """
    import monai
    import numpy as np
    import torch

    from qsm_core import __version__

    model = RimCNN.load(model_dir)
    bundle_dir = Path(bundle_dir)
    if (bundle_dir / "configs" / "metadata.json").exists() and not overwrite:
        raise InputError(f"{bundle_dir}: a bundle exists already; choose another folder")
    ens = FoldEnsemble(model.networks, temperature=model.temperature, offset=model.offset,
                       prior_shift=model.prior_shift)
    state = {k: v.detach().cpu() for k, v in ens.state_dict().items()}
    with atomic_path(bundle_dir / "models" / "model.pt") as tmp:
        torch.save(state, tmp)
    p = model.patch_voxels
    chans = {str(i): name for i, name in enumerate(model.channels)}
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
                  "0.8.1/meta_schema_20220324.json",
        "version": __version__,
        "changelog": {__version__: f"exported {datetime.date.today().isoformat()}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"qsmrim": __version__},
        "task": "Paramagnetic rim lesion classification from QSM/FLAIR lesion patches",
        "description": "qsmrim rim CNN: calibrated fold ensemble (see docs/README.md)",
        "authors": "qsmrim developers",
        "copyright": "Apache-2.0",
        "intended_use": "research only; not for clinical use",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "QSM+FLAIR",
                "num_channels": len(model.channels), "spatial_shape": [p, p, p],
                "dtype": "float32", "value_range": [-5, 5], "is_patch_data": True,
                "channel_def": chans, "patch_mm": model.patch_mm}},
            "outputs": {"pred": {
                "type": "probabilities", "format": "logits", "num_channels": 1,
                "spatial_shape": [1], "dtype": "float32", "value_range": [],
                "is_patch_data": False, "channel_def": {"0": "rim (calibrated logit)"},
                "threshold": model.threshold}},
        },
    }
    inference = {
        "imports": ["$import torch", "$import rimnet.network"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": "rimnet.network.build_ensemble",
                        **bundle_network_kwargs(model)},
        "network": "$@network_def.to(@device)",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "threshold": model.threshold,
        "tta": model.tta,
    }
    write_json(bundle_dir / "configs" / "metadata.json", metadata)
    write_json(bundle_dir / "configs" / "inference.json", inference)
    card = Path(model_dir) / "model_card.md"
    if card.exists():
        (bundle_dir / "docs").mkdir(parents=True, exist_ok=True)
        with atomic_path(bundle_dir / "docs" / "README.md") as tmp:
            shutil.copyfile(card, tmp)
    return bundle_dir
