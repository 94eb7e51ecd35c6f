"""qsmrim unwrap / bgremove / invert on NIfTI files."""

import json

import nibabel as nib
import numpy as np
import pytest

from qsm_core import __version__, ppm_to_hz
from qsm_core.background import BGREMOVE_METHODS
from qsm_core.geometry import affine_from_rotation, b0_dir_from_affine, voxel_sizes_mm
from qsm_core.inversion import METHODS
from qsmrim.cli.main import main
from tests.orientation import stored_as
from tests.qsm_core.bids_synth import head_phantom, save


def _load(p):
    img = nib.load(str(p))
    return np.asarray(img.dataobj), img


def test_unwrap_phase_and_field(tmp_path):
    shape = (24, 20, 16)
    x = np.indices(shape).astype(np.float64)
    te = np.array([0.005, 0.010])
    field_hz = 150.0 * (x[0] - 11.5) / 12 + 40.0 * (x[1] - 9.5) / 10  # +-190 Hz: wraps
    phase = 0.4 + 2 * np.pi * field_hz[..., None] * te
    wrapped = np.angle(np.exp(1j * phase))
    assert np.abs(np.diff(phase[..., 1], axis=0)).max() < np.pi  # unwrappable
    assert np.ptp(phase[..., 1]) > 4 * np.pi                     # but really wrapped
    src = save(tmp_path / "phase.nii.gz", wrapped)
    out = tmp_path / "unwrapped.nii.gz"
    assert main(["unwrap", str(src), str(out)]) == 0
    unw, _ = _load(out)
    for e in range(2):
        d = unw[..., e] - phase[..., e]
        assert np.abs(d - d.mean()).max() < 1e-3  # exact up to a constant
    side = json.loads(out.with_name("unwrapped.json").read_text())
    assert side["Units"] == "rad" and side["GeneratedBy"][0]["Version"] == __version__
    assert side["Sources"] == [str(src.resolve())]

    out_hz = tmp_path / "field.nii.gz"
    assert main(["unwrap", str(src), str(out_hz), "--echo-time", "0.005", "0.010"]) == 0
    f, _ = _load(out_hz)
    d = f - field_hz
    assert np.abs(d - d.mean()).max() < 0.05  # Hz
    side = json.loads(out_hz.with_name("field.json").read_text())
    assert side["Units"] == "Hz" and side["EchoTime"] == [0.005, 0.01]
    assert side["GeneratedBy"][0]["Parameters"]["fit"] == "unweighted"
    assert main(["unwrap", str(src), str(out_hz), "--echo-time", "0.005", "0.010"]) == 2
    assert main(["unwrap", str(src), str(out_hz), "--echo-time", "0.005",
                 "--overwrite"]) == 2  # one TE for two echoes


def test_bgremove_removes_a_harmonic_field(tmp_path):
    ph = head_phantom(shape=(40, 40, 40))
    x = np.indices(ph["brain"].shape).astype(np.float32)
    background = 30.0 * (x[0] - 20) / 20 - 10.0 * (x[2] - 20) / 20 + 5.0  # harmonic (linear)
    total = ph["field_hz"] + background
    f = save(tmp_path / "total.nii.gz", total)
    m = save(tmp_path / "brain.nii.gz", ph["brain"].astype(np.uint8), dtype=np.uint8)
    out, out_mask = tmp_path / "local.nii.gz", tmp_path / "localmask.nii.gz"
    rc = main(["bgremove", str(f), str(m), str(out), "--out-mask", str(out_mask)])
    assert rc == 0
    local, _ = _load(out)
    mask, img = _load(out_mask)
    assert img.get_data_dtype() == np.uint8 and 0 < mask.sum() <= ph["brain"].sum()
    inside = mask > 0
    assert np.all(local[~inside] == 0)
    # the CLI is the API on the file's data and geometry ...
    expect, expect_mask = BGREMOVE_METHODS["vsharp"](total.astype(np.float32), ph["brain"],
                                                     voxel_size_mm=(1.0, 1.0, 1.0))
    np.testing.assert_allclose(local, np.where(expect_mask, expect, 0), atol=1e-4)
    np.testing.assert_array_equal(mask, expect_mask)
    # ... and the background (up to 35 Hz, harmonic) is gone: the result is that of the
    # tissue field alone (what remains of the phantom's own field is a few Hz)
    alone, _ = BGREMOVE_METHODS["vsharp"](ph["field_hz"].astype(np.float32), ph["brain"],
                                          voxel_size_mm=(1.0, 1.0, 1.0))
    err = local[inside] - alone[inside]
    assert np.sqrt(np.mean(err**2)) < 0.02 * np.sqrt(np.mean(alone[inside] ** 2))
    assert np.abs(background[inside]).max() > 20
    side = json.loads((tmp_path / "local.json").read_text())
    assert side["GeneratedBy"][0]["Parameters"] == {"step": "bgremove", "bgremove": "vsharp",
                                                    "device": "cpu"}


@pytest.mark.parametrize("units", ["hz", "ppm"])
def test_invert_matches_the_api_on_an_oblique_affine(tmp_path, units):
    rot = np.linalg.qr(np.array([[1.0, 0.2, 0.1], [-0.15, 1.0, 0.05], [0.1, -0.1, 1.0]]))[0]
    affine = affine_from_rotation(rot, (1.0, 1.0, 1.5))
    ph = head_phantom(shape=(40, 40, 32), affine=affine)
    field = ph["field_hz"] if units == "hz" else ph["field_hz"] / ppm_to_hz(3.0)
    f = save(tmp_path / "local.nii.gz", field, affine)
    m = save(tmp_path / "brain.nii.gz", ph["brain"].astype(np.uint8), affine, dtype=np.uint8)
    out = tmp_path / "chi.nii.gz"
    args = ["invert", str(f), str(m), str(out), "--method", "tkd", "--field-units", units]
    if units == "hz":
        args += ["--field-strength", "3"]
    assert main(args) == 0
    chi, img = _load(out)
    expect = METHODS["tkd"]((ph["field_hz"] / ppm_to_hz(3.0)).astype(np.float32), ph["brain"],
                            voxel_size_mm=voxel_sizes_mm(affine),
                            b0_dir=b0_dir_from_affine(affine))
    np.testing.assert_allclose(chi, expect, atol=2e-5)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    brain = ph["brain"]
    sphere_mean = chi[ph["sphere"]].mean() - chi[brain & ~ph["sphere"]].mean()
    truth = ph["chi_ppm"][ph["sphere"]].mean() - ph["chi_ppm"][brain & ~ph["sphere"]].mean()
    assert abs(sphere_mean - truth) < 0.35 * truth
    side = json.loads((tmp_path / "chi.json").read_text())
    assert side["Units"] == "ppm"
    params = side["GeneratedBy"][0]["Parameters"]
    assert params["method"] == "tkd" and params["field_units"] == units


def test_invert_does_not_depend_on_how_the_axes_are_stored(tmp_path):
    """iLSQR of a copy stored (S, R, A) with one axis reversed: the same chi, voxel by voxel."""
    ph = head_phantom(shape=(40, 36, 32))
    perm, flip = (2, 0, 1), 1
    chis = []
    for name, p, f in (("ras", (0, 1, 2), None), ("other", perm, flip)):
        if f is None:
            field, affine, brain = ph["field_hz"], ph["affine"], ph["brain"]
        else:
            field, affine = stored_as(ph["field_hz"], ph["affine"], p, f)
            brain, _ = stored_as(ph["brain"], ph["affine"], p, f)
        loc = save(tmp_path / f"{name}_local.nii.gz", field, affine)
        m = save(tmp_path / f"{name}_brain.nii.gz", brain.astype(np.uint8), affine,
                 dtype=np.uint8)
        out = tmp_path / f"{name}_chi.nii.gz"
        assert main(["invert", str(loc), str(m), str(out), "--field-strength", "3"]) == 0
        chis.append(_load(out)[0])
        side = json.loads((tmp_path / f"{name}_chi.json").read_text())
        orientation = side["GeneratedBy"][0]["Parameters"]["orientation"]
    assert orientation == {"stored": "SLA", "processed": "RAS"}
    back = np.flip(chis[1], axis=flip).transpose(np.argsort(perm))
    np.testing.assert_allclose(back, chis[0], atol=1e-6 * np.abs(chis[0]).max())


def test_unwrap_noise_map_and_noise_weighted_invert(tmp_path, rng):
    te = (0.006, 0.012, 0.018, 0.024)
    ph = head_phantom(shape=(40, 40, 32), te_s=te, noise=0.02, rng=rng)
    affine, brain = ph["affine"], ph["brain"]
    pha = save(tmp_path / "phase.nii.gz", ph["phase_rad"].astype(np.float32), affine)
    mag = save(tmp_path / "mag.nii.gz", ph["magnitude"].astype(np.float32), affine)
    m = save(tmp_path / "brain.nii.gz", brain.astype(np.uint8), affine, dtype=np.uint8)
    field, noise = tmp_path / "field.nii.gz", tmp_path / "noise.nii.gz"
    tes = [str(t) for t in te]
    assert main(["unwrap", str(pha), str(field), "--magnitude", str(mag), "--echo-time", *tes,
                 "--mask", str(m), "--out-noise", str(noise)]) == 0
    f, _ = _load(field)
    sd, _ = _load(noise)
    inner = brain & (np.indices(brain.shape)[2] > 4)  # away from the faces
    # the written noise level matches the actual high-frequency error of the field
    err = f - np.asarray(ph["field_hz"])
    hf = err - 0.5 * (np.roll(err, 1, 0) + np.roll(err, -1, 0))
    ratio = float(np.std(hf[inner]) / np.sqrt(1.5) / np.sqrt(np.mean(sd[inner] ** 2)))
    assert 0.7 < ratio < 1.4, ratio
    assert json.loads((tmp_path / "noise.json").read_text())["Units"] == "Hz"
    # invert --noise = ilsqr with weights 1/noise
    local = save(tmp_path / "local.nii.gz", np.where(brain, f - f[brain].mean(), 0), affine)
    out = tmp_path / "chi.nii.gz"
    assert main(["invert", str(local), str(m), str(out), "--field-strength", "3",
                 "--noise", str(noise)]) == 0
    from qsm_core.inversion.weights import noise_weights

    local_arr, _ = _load(local)
    expect = METHODS["ilsqr"]((local_arr / ppm_to_hz(3.0)).astype(np.float32), brain,
                              voxel_size_mm=voxel_sizes_mm(affine),
                              b0_dir=b0_dir_from_affine(affine),
                              weights=noise_weights(sd, brain))
    chi, _ = _load(out)
    np.testing.assert_allclose(chi, expect, atol=1e-5)
    params = json.loads((tmp_path / "chi.json").read_text())["GeneratedBy"][0]["Parameters"]
    assert params["weights"] == "noise"
    # closed-form methods have no weights; --weights and --noise together are ambiguous
    base = ["invert", str(local), str(m), str(tmp_path / "x.nii.gz"), "--field-strength", "3"]
    assert main(base + ["--method", "tkd", "--noise", str(noise)]) == 2
    assert main(base + ["--weights", str(noise), "--noise", str(noise)]) == 2
    assert not (tmp_path / "x.nii.gz").exists()
