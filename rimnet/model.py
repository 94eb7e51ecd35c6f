"""``RimCNN``: the trained rim classifier (fold ensemble, test-time augmentation, calibration).

A model directory (written by :mod:`training.trainer`, layout in ``docs/training.md``) holds
one network per cross-validation fold (``fold_K/model.pt``, plain state dicts loaded with
``torch.load(..., weights_only=True)``), the resolved ``config.json`` and ``temperature.json``
(calibration and decision threshold). :class:`RimCNN` loads it and scores patches:

1. every patch is seen in ``V`` orientations (test-time augmentation; each view of a batch
   of patches is one batched forward pass per fold network): ``"none"`` (1), ``"flip"``
   (identity + flips of the in-plane axes, 4), ``"d4"`` (the 8 in-plane rotations and
   reflections) or ``"d4z"`` (those times a flip of the slice axis, 16); all are symmetries
   of the susceptibility dipole about B0;
2. the rim logits are averaged over views and fold networks;
3. calibrated: ``logit_cal = (logit + offset) / temperature + prior_shift`` (``offset``
   undoes the prior shift of class-weighted training; the temperature is fitted on
   out-of-fold logits; ``prior_shift`` moves the probabilities from the training cohort's
   share of rims to the share the model is deployed on);
4. ``predict_proba`` returns ``[1 - p, p]`` with ``p = sigmoid(logit_cal)``, columns in the
   order of ``classes_ = [0, 1]``; ``predict`` thresholds ``p`` at ``threshold``.

It follows scikit-learn's estimator conventions where they make sense (``classes_``,
``predict_proba``, ``predict``, ``decision_function``); fitting is done by
:func:`training.trainer.train_model`, which writes the model directory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qsm_core.errors import InputError
from qsm_core.io.atomic import atomic_path, write_json
from rimnet.fast_ensemble import PRECISIONS
from rimnet.network import build_network, shared_shell_features

__all__ = ["TTA_MODES", "RimCNN", "tta_views", "iter_tta_views", "n_tta_views",
           "ensemble_logits",
           "network_kwargs_from_config", "load_state_dict_file", "save_state_dict", "fold_dirs"]

log = logging.getLogger(__name__)

TTA_MODES = ("none", "flip", "d4", "d4z")
CONFIG_FILE = "config.json"
CALIBRATION_FILE = "temperature.json"
WEIGHTS_FILE = "model.pt"


def n_tta_views(tta: str) -> int:
    """Number of views of a test-time augmentation mode."""
    if tta not in TTA_MODES:
        raise InputError(f"unknown test-time augmentation {tta!r}; choose one of "
                         f"{list(TTA_MODES)}")
    return {"none": 1, "flip": 4, "d4": 8, "d4z": 16}[tta]


def tta_views(x: torch.Tensor, tta: str) -> torch.Tensor:
    """Stack the test-time views of a batch along the batch axis.

    Parameters
    ----------
    x : Tensor, shape (B, C, X, Y, Z)
        Patches; axes X, Y are in-plane, Z the slice axis (close to B0).
    tta : {'none', 'flip', 'd4', 'd4z'}

    Returns
    -------
    Tensor, shape (V * B, C, X, Y, Z)
        View ``v`` of patch ``b`` is row ``v * B + b``. X and Y must be equal for rotations.
    """
    n_tta_views(tta)
    if tta == "none":
        return x
    if tta == "flip":
        views = [x, x.flip(2), x.flip(3), x.flip((2, 3))]
    else:
        views = []
        for base in (x, x.flip(2)):
            views += [torch.rot90(base, k, dims=(2, 3)) for k in range(4)]
        if tta == "d4z":
            views += [v.flip(4) for v in views]
    return torch.cat(views, dim=0)


def iter_tta_views(x: torch.Tensor, tta: str):
    """Yield the test-time views of a batch one at a time (same order as :func:`tta_views`).

    Producing views lazily avoids materialising all ``V`` copies of a batch at once (the
    copies, not the convolutions, dominate CPU time for cheap networks).
    """
    n_tta_views(tta)
    if tta == "none":
        yield x
        return
    if tta == "flip":
        yield x
        yield x.flip(2)
        yield x.flip(3)
        yield x.flip((2, 3))
        return
    bases = (x, x.flip(2))
    for base in bases:
        for k in range(4):
            yield torch.rot90(base, k, dims=(2, 3)) if k else base
    if tta == "d4z":
        for base in bases:
            for k in range(4):
                v = torch.rot90(base, k, dims=(2, 3)) if k else base
                yield v.flip(4)


@torch.inference_mode()
def ensemble_logits(nets: Sequence[nn.Module], patches, *, tta: str = "flip",
                    batch_size: int = 64, device="cpu", with_types: bool = False,
                    stacked=None):
    """Rim logits averaged over test-time views and networks (uncalibrated).

    Parameters
    ----------
    nets : sequence of nn.Module
        Networks in eval mode, on ``device``.
    patches : ndarray or Tensor, shape (N, C, P, P, P)
        Any float dtype (converted to float32 per batch; memory-maps are read lazily).
    tta : str
        Test-time augmentation mode (see :func:`tta_views`).
    batch_size : int
        Patches per forward pass; every view of a batch goes through each network as one
        batched forward pass.
    device : str or torch.device
    with_types : bool
        Also return the lesion-type logits of the second head, averaged the same way.
    stacked : rimnet.fast_ensemble.StackedEnsemble, optional
        ``nets`` evaluated as one batched network (the same logits to float rounding,
        several times faster on CPU); used instead of the loop over ``nets``.

    Returns
    -------
    logits : ndarray, shape (N,), float64
    type_logits : ndarray, shape (N, n_types)
        Only if ``with_types``.

    Raises
    ------
    InputError
        If a patch holds NaN or Inf values.
    """
    v = n_tta_views(tta)
    n = len(patches)
    out = np.zeros(n, dtype=np.float64)
    types = None
    order = _size_order(nets, patches, batch_size)
    for start in range(0, n, batch_size):
        rows = None if order is None else order[start:start + batch_size]
        chunk = patches[start:start + batch_size] if rows is None else patches[rows]
        # a read-only chunk (a memory-mapped patch cache) is copied: torch would warn
        x = torch.as_tensor(np.require(chunk, np.float32, ["W"]) if not torch.is_tensor(chunk)
                            else chunk.float())
        # NaN/Inf propagate through a sum: one cheap reduction instead of an elementwise test
        sums = x.reshape(x.shape[0], -1).sum(dim=1)
        if not torch.isfinite(sums).all():
            bad = int(start + torch.nonzero(~torch.isfinite(sums))[0, 0])
            raise InputError(f"patch {bad} has NaN/Inf values; check the QSM/FLAIR inputs")
        x = x.to(device)
        acc = None
        # shell features are invariant to the views and shared by the folds: computed once
        sh = (shared_shell_features(nets, x) if stacked is None
              else stacked.shell_features(x))
        for view in iter_tta_views(x, tta):
            if stacked is not None:  # the sum over nets in one batched call
                y = (stacked.sum(view, sh) if sh is not None else stacked.sum(view)).float()
                acc = y if acc is None else acc + y
                continue
            for net in nets:
                y = (net(view, sh) if sh is not None else net(view)).float()
                acc = y if acc is None else acc + y
        acc = (acc / (v * len(nets))).cpu().double().numpy()
        b = acc.shape[0]
        dst = slice(start, start + b) if rows is None else rows
        out[dst] = acc[:, 0]
        if with_types and acc.shape[1] > 1:
            if types is None:
                types = np.zeros((n, acc.shape[1] - 1))
            types[dst] = acc[:, 1:]
    if with_types:
        return out, (types if types is not None else np.zeros((n, 0)))
    return out


def _size_order(nets, patches, batch_size: int):
    """Patch order by lesion size when the nets compute shell features, else None.

    Shell features are computed on the union bounding box of a batch's lesions, so batches
    of similar sizes are cheaper; the scores do not depend on the order.
    """
    sh = getattr(nets[0], "shells", None) if len(nets) else None
    n = len(patches)
    if sh is None or n <= batch_size:
        return None
    ch = sh.lesion_channel
    sizes = np.concatenate([
        (np.asarray(patches[s:s + 1024][:, ch]) > 0.5).reshape(-1, int(np.prod(
            np.shape(patches)[2:]))).sum(axis=1) for s in range(0, n, 1024)])
    return np.argsort(sizes, kind="stable")


def network_kwargs_from_config(config: dict) -> dict:
    """Keyword arguments of :func:`rimnet.network.build_network` from a model config."""
    try:
        return {"in_channels": len(config["channels"]), "out_channels": 1,
                "n_types": int(config.get("n_types", 0)), "arch": config["arch"],
                "channels": tuple(config["net_channels"]),
                "dropout": float(config.get("dropout", 0.0)),
                "norm": config.get("norm", "batch"),
                "shell_channels": shell_channels_from_config(config),
                "centre_qsm": bool(config.get("centre_qsm", False))}
    except (KeyError, TypeError) as exc:
        raise InputError(f"model config lacks network settings ({exc}); it must name "
                         "'channels', 'arch' and 'net_channels'") from None


def shell_channels_from_config(config: dict) -> dict | None:
    """Channel indices for :class:`rimnet.shells.ShellFeatures`, or None.

    None when the model has no shell features (``config["shell_features"]`` false or absent,
    as in models trained before shell features existed).
    """
    if not config.get("shell_features", False):
        return None
    names = list(config["channels"])
    missing = [c for c in ("qsm", "lesion") if c not in names]
    if missing:
        raise InputError(f"shell features need the channels {missing}; the model's channels "
                         f"are {names}")
    out = {"qsm": names.index("qsm"), "lesion": names.index("lesion")}
    if "others" in names:
        out["others"] = names.index("others")
    return out


def load_state_dict_file(path, *, device="cpu") -> dict:
    """``torch.load(path, weights_only=True)`` with a clear error for missing/corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing network weights; retrain the model or restore "
                         "the model directory")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise InputError(f"{path}: corrupted or unreadable weights ({type(exc).__name__}: "
                         f"{exc}); retrain the model or restore the file") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def fold_dirs(model_dir) -> list[Path]:
    """``fold_K`` folders of a model directory that hold weights, sorted by K."""
    model_dir = Path(model_dir)
    found = []
    for d in model_dir.glob("fold_*"):
        suffix = d.name[5:]
        if d.is_dir() and suffix.isdigit() and (d / WEIGHTS_FILE).is_file():
            found.append((int(suffix), d))
    return [d for _, d in sorted(found)]


class RimCNN:
    """Fold ensemble of rim CNNs with test-time augmentation and temperature scaling.

    Parameters
    ----------
    networks : sequence of nn.Module
        One trained network per fold (any number >= 1).
    config : dict
        Model configuration: ``channels`` (patch channel names), ``patch_mm``,
        ``patch_voxels``, ``arch``, ``net_channels``, ``n_types``, ``dropout``, ``norm``
        (see :class:`training.config.TrainConfig`); other keys are kept.
    temperature : float
        Calibration temperature (> 0).
    offset : float
        Logit offset added before the temperature.
    threshold : float
        Probability at or above which :meth:`predict` calls a rim.
    prior_shift : float
        Logit shift added after the temperature (training to deployment prevalence).
    tta : str, optional
        Test-time augmentation mode (default: ``config["tta"]`` or ``"none"``).
    batch_size : int
        Patches per forward pass.
    device : str
        Torch device of the networks.
    precision : {"fp32", "bf16"}
        Arithmetic of the networks at inference. ``bf16`` (bfloat16) runs the grouped
        networks about 2.5x faster on CPUs with AMX tile units and moves logits by a few
        hundredths; float32 is the reference (and the default).

    Attributes
    ----------
    classes_ : ndarray, shape (2,)
        ``[0, 1]`` (no rim, rim); the column order of :meth:`predict_proba`.
    channels : tuple of str
    patch_mm : float
    patch_voxels : int
    snap_to_voxels : bool
        Whether patches are cut centred on the voxel grid
        (:func:`rimnet.patches.snap_centres`), as the training patches were.
    """

    def __init__(self, networks: Sequence[nn.Module], *, config: dict,
                 temperature: float = 1.0, offset: float = 0.0, threshold: float = 0.5,
                 prior_shift: float = 0.0, tta: str | None = None, batch_size: int = 64,
                 device: str = "cpu", precision: str = "fp32"):
        if not networks:
            raise InputError("RimCNN needs at least one network")
        if not (np.isfinite(temperature) and temperature > 0):
            raise InputError(f"temperature must be a positive number, got {temperature}")
        if not 0.0 <= threshold <= 1.0:
            raise InputError(f"threshold must be in [0, 1], got {threshold}")
        self.config = dict(config)
        self.networks = [net.to(device).eval() for net in networks]
        self.temperature = float(temperature)
        self.offset = float(offset)
        self.threshold = float(threshold)
        if not np.isfinite(prior_shift):
            raise InputError(f"prior_shift must be a finite number, got {prior_shift}")
        self.prior_shift = float(prior_shift)
        self.tta = tta or self.config.get("tta", "none")
        n_tta_views(self.tta)
        self.batch_size = int(batch_size)
        self.device = device
        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {precision!r}")
        self.precision = precision
        if precision == "bf16" and torch.device(device).type == "cpu" and not cpu_has_bf16_units():
            log.warning("precision bf16: this CPU has neither AMX nor AVX512-BF16 units, so "
                        "the CNN will run slower than in fp32 (the default)")
        self.classes_ = np.array([0, 1])
        self.channels = tuple(self.config["channels"])
        self.patch_mm = float(self.config["patch_mm"])
        self.patch_voxels = int(self.config["patch_voxels"])
        # models trained before the option existed were trained on interpolated patches
        self.snap_to_voxels = bool(self.config.get("snap_to_voxels", False))
        self.n_types = int(self.config.get("n_types", 0))

    # ------------------------------------------------------------------ I/O
    @classmethod
    def load(cls, model_dir, *, device: str = "cpu", tta: str | None = None,
             folds: Sequence[int] | None = None, batch_size: int = 64,
             precision: str = "fp32") -> RimCNN:
        """Load a model directory.

        Parameters
        ----------
        model_dir : str or Path
        device : str
            Torch device (``"cpu"``, ``"cuda"``).
        tta : str, optional
            Override the test-time augmentation mode of the config.
        folds : sequence of int, optional
            Use only these folds (default: every ``fold_K/model.pt`` present).
        batch_size : int
            Patches per forward pass.
        precision : {"fp32", "bf16"}
            Inference arithmetic (see the class parameters).

        Raises
        ------
        InputError
            Missing folder, missing or invalid ``config.json``/``temperature.json``, no fold
            weights, corrupted weights, or weights that do not fit the configured network.
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise InputError(f"model directory {model_dir} does not exist; train one with "
                             "`qsmrim train` or give the right --model path")
        config = _read_json(model_dir / CONFIG_FILE, what="model config")
        calib = (_read_json(model_dir / CALIBRATION_FILE, what="calibration")
                 if (model_dir / CALIBRATION_FILE).exists() else {})
        dirs = fold_dirs(model_dir)
        if folds is not None:
            wanted = {int(f) for f in folds}
            dirs = [d for d in dirs if int(d.name[5:]) in wanted]
        if not dirs:
            raise InputError(f"{model_dir}: no fold_K/{WEIGHTS_FILE} weights found; the model "
                             "directory is incomplete (did training finish?)")
        kwargs = network_kwargs_from_config(config)
        nets = []
        for d in dirs:
            net = build_network(**kwargs)
            state = load_state_dict_file(d / WEIGHTS_FILE, device=device)
            try:
                net.load_state_dict(state)
            except RuntimeError as exc:
                raise InputError(f"{d / WEIGHTS_FILE}: weights do not match the network in "
                                 f"{model_dir / CONFIG_FILE} ({str(exc).splitlines()[0]})"
                                 ) from None
            nets.append(net)
        try:
            return cls(nets, config=config, temperature=float(calib.get("temperature", 1.0)),
                       offset=float(calib.get("offset", 0.0)),
                       threshold=float(calib.get("threshold", 0.5)),
                       prior_shift=float(calib.get("prior_shift", 0.0)), tta=tta,
                       batch_size=batch_size, device=device, precision=precision)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"{model_dir}: invalid model config or calibration ({exc})"
                             ) from None

    def save(self, model_dir) -> Path:
        """Write ``config.json``, ``temperature.json`` and ``fold_K/model.pt`` (atomically).

        Other files of an existing model directory (logs, metrics) are left alone.
        """
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        for k, net in enumerate(self.networks):
            save_state_dict(net, model_dir / f"fold_{k}" / WEIGHTS_FILE)
        write_json(model_dir / CALIBRATION_FILE, self.calibration_dict())
        write_json(model_dir / CONFIG_FILE, self.config)
        return model_dir

    def calibration_dict(self) -> dict:
        """Contents of ``temperature.json``."""
        return {"temperature": self.temperature, "offset": self.offset,
                "prior_shift": self.prior_shift, "threshold": self.threshold}

    # ------------------------------------------------------------ scoring
    def _check(self, patches) -> None:
        shape = tuple(getattr(patches, "shape", ()))
        p = self.patch_voxels
        expected = (len(self.channels), p, p, p)
        if len(shape) != 5 or shape[1:] != expected:
            raise InputError(f"patches must have shape (N, {', '.join(map(str, expected))}) "
                             f"for this model (channels {list(self.channels)}, "
                             f"{self.patch_mm:g} mm / {p} voxels); got {shape}")

    def decision_function(self, patches) -> np.ndarray:
        """Calibrated rim logits, shape (N,)."""
        return (self.raw_logits(patches) + self.offset) / self.temperature + self.prior_shift

    def raw_logits(self, patches, *, tta: str | None = None) -> np.ndarray:
        """Uncalibrated ensemble rim logits, shape (N,)."""
        self._check(patches)
        stacked = self._stacked_ensemble()
        # bfloat16 without the grouped CPU form (CUDA, other architectures): autocast
        low = self.precision == "bf16" and stacked is None
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16,
                            enabled=low):
            return ensemble_logits(self.networks, patches, tta=tta or self.tta,
                                   batch_size=self.batch_size, device=self.device,
                                   stacked=stacked)

    def _stacked_ensemble(self):
        """The fold networks as one batched network on CPU (rimnet.fast_ensemble), or None.

        Built on first use, checked against the networks, rebuilt if they change.
        """
        if str(self.device) != "cpu":
            return None
        from rimnet.fast_ensemble import checked_stacked_ensemble, fingerprint

        key = (fingerprint(self.networks), self.precision)
        if getattr(self, "_stacked_key", None) != key:
            p = self.patch_voxels
            example = torch.rand((2, len(self.channels), p, p, p),
                                 generator=torch.Generator().manual_seed(0))
            self._stacked = checked_stacked_ensemble(self.networks, example,
                                                     precision=self.precision)
            self._stacked_key = key
        return self._stacked

    def predict_proba(self, patches) -> np.ndarray:
        """Rim probabilities.

        Parameters
        ----------
        patches : ndarray, shape (N, C, P, P, P)
            Patches from :func:`rimnet.patches.extract_patches` with this model's
            ``channels``, ``patch_mm`` and ``patch_voxels``.

        Returns
        -------
        ndarray, shape (N, 2), float64
            Columns ``[P(no rim), P(rim)]`` in the order of ``classes_``.
        """
        p = _sigmoid(self.decision_function(patches))
        return np.stack([1.0 - p, p], axis=1)

    def predict(self, patches) -> np.ndarray:
        """Rim calls (0/1), shape (N,): ``P(rim) >= threshold``."""
        return (self.predict_proba(patches)[:, 1] >= self.threshold).astype(int)

    def predict_types(self, patches) -> np.ndarray:
        """Lesion-type probabilities of the second head, shape (N, n_types).

        Raises
        ------
        InputError
            If the model has no type head.
        """
        if self.n_types == 0:
            raise InputError("this model has no lesion-type head (trained with n_types=0)")
        self._check(patches)
        _, t = ensemble_logits(self.networks, patches, tta=self.tta,
                               batch_size=self.batch_size, device=self.device,
                               with_types=True)
        e = np.exp(t - t.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def __repr__(self) -> str:
        return (f"RimCNN(folds={len(self.networks)}, arch={self.config.get('arch')!r}, "
                f"channels={self.channels}, tta={self.tta!r}, "
                f"temperature={self.temperature:.3g}, threshold={self.threshold:.3g}, "
                f"precision={self.precision!r})")


def cpu_has_bf16_units() -> bool:
    """Whether this CPU has bfloat16 matrix units (AMX tiles or AVX512-BF16).

    Read from torch's own CPU feature checks (``torch.cpu``); False where torch does not
    provide them.
    """
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def save_state_dict(net: nn.Module, path) -> Path:
    """Save a network's state dict (CPU tensors) atomically."""
    net = getattr(net, "module", net)  # unwrap DistributedDataParallel
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def _read_json(path: Path, *, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: missing {what}; the model directory is incomplete "
                         "(retrain with `qsmrim train`)")
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: corrupted {what} ({exc}); restore or retrain") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: {what} must be a JSON object")
    return obj
