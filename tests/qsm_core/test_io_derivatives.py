import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsm_core import __version__
from qsm_core.errors import InputError
from qsm_core.io.bids import discover_scans
from qsm_core.io.derivatives import (
    OUTPUTS,
    derivative_path,
    find_derivative,
    find_derivatives,
    write_dataset_description,
    write_recon_outputs,
)
from tests.qsm_core.bids_synth import random_scan, write_megre

DESCRIPTION = ("qsmrim classical QSM: Laplacian unwrapping, multi-echo fit, brain mask, "
               "background field removal, dipole inversion")


@dataclass
class FakeResult:
    chi_ppm: np.ndarray
    mask: np.ndarray
    local_field_hz: np.ndarray
    total_field_hz: np.ndarray
    swi: np.ndarray
    mip: np.ndarray
    parameters: dict = field(default_factory=dict)


def fake_result(shape, rng):
    mask = np.zeros(shape, bool)
    mask[2:-2, 2:-2, 2:-2] = True
    return FakeResult(chi_ppm=rng.normal(0, 0.05, shape) * mask, mask=mask,
                      local_field_hz=rng.normal(0, 3, shape) * mask,
                      total_field_hz=rng.normal(0, 30, shape), swi=rng.uniform(0, 1, shape),
                      mip=rng.uniform(0, 1, shape),
                      parameters={"method": "ilsqr", "bgremove": "vsharp", "tol": 0.01,
                                  "radii_mm": np.array([12.0, 6.0, 1.0])})


def test_derivative_names():
    assert derivative_path("d", "sub-01", None, "Chimap") == Path(
        "d/sub-01/anat/sub-01_Chimap.nii.gz")
    assert derivative_path("d", "01", "n/a", "localfield") == Path(
        "d/sub-01/anat/sub-01_desc-local_fieldmap.nii.gz")
    assert derivative_path("d", "01", "ses-2", "desc-brain_mask",
                           entities={"acq": "x", "run": "1"}) == Path(
        "d/sub-01/ses-2/anat/sub-01_ses-2_acq-x_run-1_desc-brain_mask.nii.gz")
    assert [s.tail for s in OUTPUTS.values()][-1] == "Chimap"  # written last (resume marker)
    with pytest.raises(InputError, match="unknown derivative"):
        derivative_path("d", "01", None, "T1w")


def test_write_recon_outputs_files_dtypes_and_provenance(tmp_path, rng):
    raw = tmp_path / "raw"
    mag, ph = random_scan(rng)
    write_megre(raw, "01", "1", magnitude=mag, phase=ph, te_s=(0.005, 0.01))
    scan = discover_scans(raw)[0].load()
    res = fake_result(mag.shape[:3], rng)
    out = tmp_path / "deriv"
    write_dataset_description(out, parameters={"method": "ilsqr"}, source_dataset=raw)
    paths = write_recon_outputs(out, scan, res, extra_parameters={"device": "cpu"})
    assert sorted(paths) == sorted(OUTPUTS)
    anat = out / "sub-01" / "ses-1" / "anat"
    assert sorted(p.name for p in anat.iterdir()) == sorted(
        f"sub-01_ses-1_{t}.{e}" for t in ("Chimap", "desc-brain_mask", "desc-local_fieldmap",
                                          "swi", "minIP") for e in ("nii.gz", "json"))
    chi = nib.load(str(paths["Chimap"]))
    assert chi.get_data_dtype() == np.float32
    np.testing.assert_allclose(chi.get_fdata(), res.chi_ppm, atol=1e-6)
    np.testing.assert_allclose(chi.affine, scan.affine)
    mask = nib.load(str(paths["mask"]))
    assert mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(mask.dataobj), res.mask.astype(np.uint8))
    side = json.loads((anat / "sub-01_ses-1_Chimap.json").read_text())
    sources = [f"bids:raw:sub-01/ses-1/anat/sub-01_ses-1_echo-{e}_part-{p}_MEGRE.nii.gz"
               for p in ("mag", "phase") for e in (1, 2)]
    assert side == {
        "Description": "Magnetic susceptibility (chi) in ppm, positive = paramagnetic",
        "Units": "ppm",
        "GeneratedBy": [{"Name": "qsmrim", "Version": __version__, "Description": DESCRIPTION,
                         "Parameters": {"device": "cpu", "method": "ilsqr", "bgremove": "vsharp",
                                        "tol": 0.01, "radii_mm": [12.0, 6.0, 1.0]}}],
        "Sources": sources,
        "EchoTime": [0.005, 0.01],
        "MagneticFieldStrength": 3.0,
        "InputNotes": ["phase in radians (Units 'rad')"],
    }
    mside = json.loads((anat / "sub-01_ses-1_desc-brain_mask.json").read_text())
    assert mside["Type"] == "Brain" and "Units" not in mside
    assert json.loads((anat / "sub-01_ses-1_desc-local_fieldmap.json").read_text())[
        "Units"] == "Hz"
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc == {
        "Name": "qsmrim QSM derivatives", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "qsmrim", "Version": __version__, "Description": DESCRIPTION,
                         "Parameters": {"method": "ilsqr"}}],
        "SourceDatasets": [{"URL": raw.resolve().as_uri()}],
        "DatasetLinks": {"raw": raw.resolve().as_uri()},
    }
    # found again by participant/session/kind, as other packages do
    assert find_derivative(out, "01", "ses-1", "Chimap") == paths["Chimap"]
    assert find_derivative(out, "sub-01", "1", "mask") == paths["mask"]
    assert [d["participant_id"] for d in find_derivatives(out)] == ["sub-01"]
    assert find_derivatives(out, "mask")[0]["session_id"] == "ses-1"


def test_dataset_description_refuses_other_parameters(tmp_path):
    write_dataset_description(tmp_path, parameters={"method": "ilsqr"})
    write_dataset_description(tmp_path, parameters={"method": "ilsqr"})  # same: fine
    with pytest.raises(InputError, match="other parameters.*--overwrite"):
        write_dataset_description(tmp_path, parameters={"method": "tkd"})
    write_dataset_description(tmp_path, parameters={"method": "tkd"}, overwrite=True)
    desc = json.loads((tmp_path / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Parameters"] == {"method": "tkd"}


def test_find_derivative_missing_and_ambiguous(tmp_path):
    with pytest.raises(InputError, match=r"sub-01_Chimap.nii.gz: no such Chimap.*qsmrim recon"):
        find_derivative(tmp_path, "01", None, "Chimap")
    for acq in ("a", "b"):
        p = derivative_path(tmp_path, "01", None, "Chimap", entities={"acq": acq})
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    with pytest.raises(InputError, match="several Chimap images"):
        find_derivative(tmp_path, "01", None, "Chimap")
    assert find_derivative(tmp_path, "01", None, "Chimap", entities={"acq": "b"}).name == \
        "sub-01_acq-b_Chimap.nii.gz"
    found = find_derivatives(tmp_path, "Chimap")
    assert [d["entities"] for d in found] == [{"acq": "a"}, {"acq": "b"}]
