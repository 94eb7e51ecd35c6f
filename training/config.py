"""Training configuration: one dataclass, saved resolved as ``config.json`` in the model dir.

Every field has a documented default; ``TrainConfig.from_dict`` rejects unknown keys so a typo
in a config file is an error, not a silently ignored setting. The same file is what
:class:`rimnet.model.RimCNN` reads to rebuild the networks (``channels``, ``patch_mm``,
``patch_voxels``, ``arch``, ``net_channels``, ``n_types``, ``dropout``, ``norm``, ``tta``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from qsm_core.errors import InputError
from qsm_core.io.atomic import write_json
from rimnet.model import TTA_MODES
from rimnet.network import ARCHS
from rimnet.patches import PATCH_MM, PATCH_VOXELS

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Settings of a training run (see ``docs/training.md`` for guidance).

    Attributes
    ----------
    channels : list of str
        Patch channels, in order (``qsm``, ``flair``, ``lesion``, ``others``, ``swi``).
    patch_mm, patch_voxels : float, int
        Patch side (mm) and samples per side (default 32 mm at 32 samples, 1 mm). On
        simulated scans (429 lesions, 5-fold CV) 1 mm sampling with ``resnet`` reached an
        out-of-fold ROC AUC of 0.71 where 24 samples with ``fastresnet`` reached 0.51.
    snap_to_voxels : bool
        Patches centred on the nearest voxel-grid position, so that 1 mm samples of a 1 mm
        scan are a crop, not an interpolation (:func:`rimnet.patches.snap_centres`).
        Training from a patch cache takes the cache's setting; ``predict`` cuts patches
        the way the model's were.
    arch : str
        Network architecture (:data:`rimnet.network.ARCHS`).
    net_channels : list of int
        Network widths.
    n_types : int
        Outputs of the lesion-type head (0: none; 5 with a ``type_column``).
    type_column : str or None
        Table column with the lesion type (integer 0..n_types-1 or a type name).
    type_weight : float
        Weight of the type loss next to the rim loss.
    dropout : float
        Dropout before the heads.
    norm : str
        Normalisation layers (``batch`` or ``instance``).
    shell_features : bool
        Fuse the lesion-edge shell features of :mod:`rimnet.shells` into the network's head
        (QSMRim-Net-style radiomics; needs ``qsm`` and ``lesion`` channels).
    centre_qsm : bool
        With ``shell_features``: the trunk sees QSM relative to the ring around the lesion.
    label_column : str
        Table column with the 0/1 rim label (``consensus``, ``truth_prl``, ``reader_1`` ...).
    n_folds : int
        Cross-validation folds (one network per fold).
    epochs : int
        Maximum epochs per fold.
    min_epochs : int
        Epochs before early stopping may stop a fold.
    patience : int
        Stop after this many epochs without a better validation PR AUC.
    batch_size : int
        Global batch size (split over DDP processes).
    lr, weight_decay : float
        AdamW settings (cosine learning-rate decay over ``epochs``, warm-up of 1 epoch).
    weight_ema : float
        Decay per optimiser step of an exponential moving average of the weights and the
        batch-norm statistics (e.g. 0.995: a memory of ~200 steps); validation, early
        stopping and the saved network then use the averaged weights. 0 (default): off.
    teacher : str or None
        Model directory of a trained fold ensemble to distil (knowledge distillation): each
        fold network also learns the teacher's ensemble probability of every training
        patch, so that one network might stand in for the whole ensemble (on CPU one network
        costs about half the five-network CNN stage). The teacher must use the same channels
        and patch geometry.
        ``None`` (default): labels only.
    distill_weight : float
        With a ``teacher``: weight w of the teacher's soft target in the rim loss,
        ``(1 - w) * BCE(label) + w * BCE(teacher probability)``.
    imbalance : str
        ``pos_weight`` (BCE weight sqrt(n_neg/n_pos) on positives, undone by the
        calibration offset), ``sampler`` (class-balanced sampling with replacement; one
        process only) or ``none``.
    flip_prob, rot90_prob, affine_prob, intensity_prob, gain, offset, noise_std,
    slice_blur_prob : float
        Augmentation (see :func:`rimnet.transforms.build_train_transforms`).
    tta : str
        Test-time augmentation of the out-of-fold predictions and the model's default for
        inference (``none`` for speed; ``flip``, ``d4``, ``d4z`` cost 4, 8, 16 passes).
    threshold_rule : str
        Rule for the decision threshold (:func:`training.calibration.choose_threshold`).
    deploy_prevalence : float or None
        Share of rims among the lesions the model is meant to score. Calibrated
        probabilities are moved from the training cohort's share to this one
        (:func:`training.calibration.prior_shift`) and the threshold is chosen for it;
        ``None`` keeps the training cohort's share. Default 0.11, the middle of the
        10-12 % of general MS cohorts (the seed study: 0.54).
    seed : int
        Seed of splits, initialisation, sampling and augmentation.
    num_workers : int
        DataLoader worker processes (0: augment in the main process).
    threads : int
        Torch intra-op threads per process (0: leave torch's default).
    device : str
        ``cpu``, ``cuda`` or ``cuda:N``.
    progress : bool
        Show tqdm progress bars.
    """

    channels: list[str] = field(default_factory=lambda: ["qsm", "flair", "lesion", "others"])
    patch_mm: float = PATCH_MM
    patch_voxels: int = PATCH_VOXELS
    snap_to_voxels: bool = True
    arch: str = "resnet"
    net_channels: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    n_types: int = 0
    type_column: str | None = None
    type_weight: float = 0.3
    dropout: float = 0.1
    norm: str = "batch"
    shell_features: bool = True
    centre_qsm: bool = True
    label_column: str = "consensus"
    n_folds: int = 5
    epochs: int = 30
    min_epochs: int = 5
    patience: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    weight_ema: float = 0.0
    teacher: str | None = None
    distill_weight: float = 0.7
    imbalance: str = "pos_weight"
    flip_prob: float = 0.5
    rot90_prob: float = 0.75
    affine_prob: float = 0.1
    intensity_prob: float = 0.8
    gain: float = 1.3
    offset: float = 0.05
    noise_std: float = 0.05
    slice_blur_prob: float = 0.25
    tta: str = "none"
    threshold_rule: str = "kappa"
    deploy_prevalence: float | None = 0.11
    seed: int = 0
    num_workers: int = 0
    threads: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> TrainConfig:
        """Check values; raise :class:`InputError` naming the bad field."""
        def bad(name, why):
            raise InputError(f"training config: {name}={getattr(self, name)!r} {why}")

        self.channels = [str(c) for c in self.channels]
        self.net_channels = [int(c) for c in self.net_channels]
        if not self.channels:
            bad("channels", "must name at least one channel")
        if self.arch not in ARCHS:
            bad("arch", f"is not one of {list(ARCHS)}")
        if self.tta not in TTA_MODES:
            bad("tta", f"is not one of {list(TTA_MODES)}")
        if self.imbalance not in ("pos_weight", "sampler", "none"):
            bad("imbalance", "must be pos_weight, sampler or none")
        if self.threshold_rule not in ("kappa", "youden", "f1", "half"):
            bad("threshold_rule", "must be kappa, youden, f1 or half")
        if self.deploy_prevalence is not None and not 0.0 < self.deploy_prevalence < 1.0:
            bad("deploy_prevalence", "must be a fraction in (0, 1) or None")
        if self.n_folds < 2:
            bad("n_folds", "must be >= 2")
        for name in ("epochs", "batch_size", "patch_voxels"):
            if int(getattr(self, name)) < 1:
                bad(name, "must be >= 1")
        if self.patience < 1 or self.min_epochs < 0:
            bad("patience", "and min_epochs must be >= 1 and >= 0")
        if not self.lr > 0 or self.weight_decay < 0:
            bad("lr", "must be > 0 (and weight_decay >= 0)")
        if not 0.0 <= self.weight_ema < 1.0:
            bad("weight_ema", "must be in [0, 1) (0: no weight averaging)")
        if not 0.0 <= self.distill_weight <= 1.0:
            bad("distill_weight", "must be in [0, 1]")
        if self.teacher is not None:
            self.teacher = str(self.teacher)
        if self.n_types < 0 or (self.n_types > 0 and not self.type_column):
            bad("n_types", "needs a type_column (and must be >= 0)")
        if not self.patch_mm > 0:
            bad("patch_mm", "must be > 0")
        for name in ("flip_prob", "rot90_prob", "affine_prob", "intensity_prob",
                     "slice_blur_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(name, "must be a probability in [0, 1]")
        return self

    def to_dict(self) -> dict:
        """Plain-JSON dictionary of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config") -> TrainConfig:
        """Build from a dictionary; unknown keys are an error (typos are not ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"{source}: unknown training setting(s) {unknown}; valid: "
                             f"{sorted(names)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"{source}: invalid training settings ({exc})") from None

    def replace(self, **changes) -> TrainConfig:
        """A copy with some fields changed (``None`` values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def save(self, path) -> Path:
        """Write as indented JSON (atomically)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> TrainConfig:
        """Read a JSON config file (unknown keys are an error)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: unreadable config ({exc})") from None
        if not isinstance(d, dict):
            raise InputError(f"{path}: config must be a JSON object")
        return cls.from_dict(d, source=str(path))
