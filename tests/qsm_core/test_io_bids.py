import json

import nibabel as nib
import numpy as np
import pytest

from qsm_core.errors import InputError
from qsm_core.io.bids import discover_scans, load_mask, parse_entities, scan_from_files
from tests.qsm_core.bids_synth import random_scan, save, write_megre

TE = (0.005, 0.010)


def test_discovery_without_sessions(tmp_path, rng):
    for sub in ("02", "01"):
        mag, ph = random_scan(rng)
        write_megre(tmp_path, sub, magnitude=mag, phase=ph, te_s=TE)
    (tmp_path / "dataset_description.json").write_text("{}")
    scans = discover_scans(tmp_path)
    assert [s.participant_id for s in scans] == ["sub-01", "sub-02"]
    assert all(s.session_id is None for s in scans)
    assert scans[0].name == "sub-01" and scans[0].te_s == TE
    assert scans[0].field_strength_t == 3.0
    assert [f.name for f in scans[0].magnitude_files] == [
        "sub-01_echo-1_part-mag_MEGRE.nii.gz", "sub-01_echo-2_part-mag_MEGRE.nii.gz"]


def test_discovery_with_sessions_and_entities(tmp_path, rng):
    mag, ph = random_scan(rng)
    write_megre(tmp_path, "01", "2", magnitude=mag, phase=ph, te_s=TE)
    write_megre(tmp_path, "01", "1", magnitude=mag, phase=ph, te_s=TE)
    write_megre(tmp_path, "01", "1", magnitude=mag, phase=ph, te_s=TE, entities="_acq-fast_run-2")
    scans = discover_scans(tmp_path)
    assert [s.name for s in scans] == ["sub-01_ses-1", "sub-01_ses-1_acq-fast_run-2",
                                       "sub-01_ses-2"]
    assert scans[1].entities == {"acq": "fast", "run": "2"}
    assert scans[1].session_id == "ses-1"
    assert scans[0].source_names()[0] == \
        "sub-01/ses-1/anat/sub-01_ses-1_echo-1_part-mag_MEGRE.nii.gz"


def test_participant_filter_with_or_without_prefix(tmp_path, rng):
    for sub in ("01", "02", "03"):
        mag, ph = random_scan(rng)
        write_megre(tmp_path, sub, magnitude=mag, phase=ph, te_s=TE)
    assert [s.participant_id for s in discover_scans(tmp_path, participant_labels=["03", "sub-01"])
            ] == ["sub-01", "sub-03"]
    with pytest.raises(InputError, match=r"sub-09.*--participant-label"):
        discover_scans(tmp_path, participant_labels=["09"])


def test_echoes_sorted_numerically_and_data_follow(tmp_path, rng):
    mag, ph = random_scan(rng, n_echo=3)
    # echo-10 sorts before echo-2 as text; TE must follow the numeric order
    write_megre(tmp_path, "01", magnitude=mag, phase=ph, te_s=(0.004, 0.008, 0.012),
                echo_numbers=[1, 2, 10])
    scan = discover_scans(tmp_path)[0]
    assert scan.te_s == (0.004, 0.008, 0.012)
    assert [parse_entities(f.name)[0]["echo"] for f in scan.phase_files] == ["1", "2", "10"]
    np.testing.assert_allclose(scan.phase_rad, ph, atol=1e-6)
    np.testing.assert_allclose(scan.magnitude, mag, atol=1e-6)
    assert scan.magnitude.shape == (12, 10, 8, 3) and scan.magnitude.dtype == np.float32


def test_echo_times_must_increase(tmp_path, rng):
    mag, ph = random_scan(rng)
    write_megre(tmp_path, "01", magnitude=mag, phase=ph, te_s=(0.010, 0.005))
    scan = discover_scans(tmp_path)[0]
    with pytest.raises(InputError, match="not strictly increasing"):
        scan.load()


def test_four_d_series_and_single_echo(tmp_path, rng):
    mag, ph = random_scan(rng, n_echo=4)
    te = (0.0072, 0.0134, 0.0196, 0.0258)
    write_megre(tmp_path, "01", magnitude=mag, phase=ph, te_s=te, four_d=True)
    mag1, ph1 = random_scan(rng, n_echo=1)
    write_megre(tmp_path, "02", magnitude=mag1, phase=ph1, te_s=(0.02,))
    s4, s1 = discover_scans(tmp_path)
    assert s4.te_s == te and len(s4.magnitude_files) == 1
    np.testing.assert_allclose(s4.phase_rad, ph, atol=1e-6)
    assert s1.te_s == (0.02,) and s1.magnitude.shape == (12, 10, 8, 1)


def test_four_d_with_wrong_number_of_echo_times(tmp_path, rng):
    mag, ph = random_scan(rng, n_echo=3)
    write_megre(tmp_path, "01", magnitude=mag, phase=ph, te_s=(0.01, 0.02), four_d=True)
    with pytest.raises(InputError, match=r"2 echo time\(s\) for 3 echo"):
        discover_scans(tmp_path)[0].load()


def test_discovery_is_lazy(tmp_path, rng):
    mag, ph = random_scan(rng)
    mags, _ = write_megre(tmp_path, "01", magnitude=mag, phase=ph, te_s=TE)
    mags[1].write_bytes(b"not a nifti")
    scan = discover_scans(tmp_path)[0]  # no image is read here
    assert scan.te_s == TE
    with pytest.raises(InputError, match="echo-2_part-mag_MEGRE.nii.gz: not a readable NIfTI"):
        scan.load()


def test_sidecar_inheritance(tmp_path, rng):
    mag, ph = random_scan(rng)
    write_megre(tmp_path, "01", magnitude=mag, phase=ph, te_s=TE, b0_t=None, units=None,
                mag_meta={}, phase_meta={})
    for f in tmp_path.rglob("*.json"):  # drop field strength and units from the images
        meta = json.loads(f.read_text())
        meta.pop("MagneticFieldStrength")
        f.write_text(json.dumps(meta))
    (tmp_path / "MEGRE.json").write_text(json.dumps({"MagneticFieldStrength": 7.0}))
    (tmp_path / "part-phase_MEGRE.json").write_text(json.dumps({"Units": "rad"}))
    scan = discover_scans(tmp_path)[0]
    assert scan.field_strength_t == 7.0
    assert scan.phase_meta[0]["Units"] == "rad" and "Units" not in scan.magnitude_meta[0]


def test_missing_echo_time_names_the_file(tmp_path, rng):
    mag, ph = random_scan(rng)
    mags, _ = write_megre(tmp_path, "01", magnitude=mag, phase=ph, te_s=TE)
    for f in tmp_path.rglob("*echo-2_part-*.json"):
        f.write_text(json.dumps({"MagneticFieldStrength": 3}))
    with pytest.raises(InputError, match=r"echo-2_part-mag_MEGRE.nii.gz: .*no EchoTime"):
        discover_scans(tmp_path)[0].load()


def test_phase_without_magnitude_is_kept_as_a_problem(tmp_path, rng):
    mag, ph = random_scan(rng)
    write_megre(tmp_path, "01", magnitude=mag, phase=ph, te_s=TE)
    write_megre(tmp_path, "02", magnitude=mag, phase=ph, te_s=TE)
    next(tmp_path.rglob("sub-02_echo-2_part-mag_MEGRE.nii.gz")).unlink()
    s1, s2 = discover_scans(tmp_path)
    s1.load()
    with pytest.raises(InputError, match="sub-02_echo-2_part-phase.*no matching magnitude"):
        s2.load()


def test_vendor_scaled_phase_loaded_in_radians(tmp_path, rng):
    mag, _ = random_scan(rng)
    ints = rng.integers(-4096, 4096, size=mag.shape).astype(np.int16)
    write_megre(tmp_path, "01", magnitude=mag, phase=ints, te_s=TE, units="arbitrary",
                phase_dtype=np.int16)
    scan = discover_scans(tmp_path)[0]
    np.testing.assert_allclose(scan.phase_rad, ints * np.pi / 4096, atol=1e-6)
    assert any("pi/4096" in n for n in scan.notes)


def test_explicit_files_with_echo_times(tmp_path, rng):
    mag, ph = random_scan(rng)
    m = [save(tmp_path / f"m{e}.nii.gz", mag[..., e]) for e in range(2)]
    p = [save(tmp_path / f"p{e}.nii", ph[..., e]) for e in range(2)]
    scan = scan_from_files(m, p, te_s=[0.004, 0.009], field_strength_t=1.5, participant_id="7")
    assert scan.name == "sub-7" and scan.te_s == (0.004, 0.009) and scan.field_strength_t == 1.5
    np.testing.assert_allclose(scan.phase_rad, ph, atol=1e-6)
    with pytest.raises(InputError, match="--participant-label"):
        scan_from_files(m, p, te_s=[0.004, 0.009], field_strength_t=3)
    with pytest.raises(InputError, match="look like milliseconds"):
        scan_from_files(m, p, te_s=[4, 9], field_strength_t=3, participant_id="7").load()
    with pytest.raises(InputError, match="no MagneticFieldStrength.*--field-strength"):
        _ = scan_from_files(m, p, te_s=[0.004, 0.009], participant_id="7").field_strength_t


@pytest.mark.parametrize("case", ["shape", "affine", "echo_shape", "nan", "2d"])
def test_inconsistent_images_name_the_file(tmp_path, rng, case):
    mag, ph = random_scan(rng)
    mags, phs = write_megre(tmp_path, "01", magnitude=mag, phase=ph, te_s=TE)
    if case == "shape":
        save(phs[1], ph[:-1, ..., 1])
        match = "echo-2_part-phase_MEGRE.nii.gz: phase shape"
    elif case == "affine":
        save(phs[0], ph[..., 0], affine=np.diag([1, 1, 2.0, 1]))
        match = "echo-1_part-phase_MEGRE.nii.gz: its affine differs"
    elif case == "echo_shape":
        save(mags[1], mag[:-2, ..., 1])
        save(phs[1], ph[:-2, ..., 1])
        match = "echo-2_part-mag_MEGRE.nii.gz: echo shape"
    elif case == "nan":
        bad = mag[..., 0].copy()
        bad[3, 3, 3] = np.nan
        save(mags[0], bad)
        match = "echo-1_part-mag_MEGRE.nii.gz: 1 voxel"
    else:
        save(mags[0], mag[:, :, :1, 0])
        match = "echo-1_part-mag_MEGRE.nii.gz: 2D image"
    with pytest.raises(InputError, match=match):
        discover_scans(tmp_path)[0].load()


def test_no_dataset_and_no_scans(tmp_path):
    with pytest.raises(InputError, match="no such BIDS folder"):
        discover_scans(tmp_path / "missing")
    with pytest.raises(InputError, match="no multi-echo GRE found"):
        discover_scans(tmp_path)


def test_load_mask_checks(tmp_path):
    aff = np.eye(4)
    save(tmp_path / "empty.nii.gz", np.zeros((4, 5, 6)), aff)
    save(tmp_path / "small.nii.gz", np.ones((4, 5, 5)), aff)
    good = np.zeros((4, 5, 6))
    good[1:3, 1:3, 1:3] = 1
    save(tmp_path / "good.nii.gz", good, aff)
    with pytest.raises(InputError, match=r"empty\.nii\.gz: the mask is empty"):
        load_mask(tmp_path / "empty.nii.gz", shape=(4, 5, 6), affine=aff)
    with pytest.raises(InputError, match=r"small\.nii\.gz: mask shape \(4, 5, 5\)"):
        load_mask(tmp_path / "small.nii.gz", shape=(4, 5, 6), affine=aff)
    m = load_mask(tmp_path / "good.nii.gz", shape=(4, 5, 6), affine=aff)
    assert m.dtype == bool and m.sum() == 8
    assert nib.load(str(tmp_path / "good.nii.gz")).shape == (4, 5, 6)


@pytest.mark.parametrize("four_d", [False, True])
def test_write_megre_round_trips_through_discovery(tmp_path, rng, four_d):
    from qsm_core.io.bids import write_megre

    mag, _ = random_scan(rng, n_echo=3)
    phase = rng.uniform(-3 * np.pi, 3 * np.pi, mag.shape)  # unwrapped: written wrapped
    aff = np.diag([0.9, 0.9, 2.0, 1.0])
    write_megre(tmp_path, "01", "2", mag, phase, (0.004, 0.008, 0.012), aff,
                field_strength_t=3.0, entities={"acq": "sim"}, four_d=four_d,
                metadata={"Manufacturer": "qsmrim-sim"})
    scan = discover_scans(tmp_path)[0]
    assert scan.name == "sub-01_ses-2_acq-sim"
    assert len(scan.magnitude_files) == (1 if four_d else 3)
    assert scan.te_s == (0.004, 0.008, 0.012) and scan.field_strength_t == 3.0
    np.testing.assert_allclose(scan.magnitude, mag, atol=1e-6)
    np.testing.assert_allclose(np.exp(1j * scan.phase_rad), np.exp(1j * phase), atol=1e-5)
    np.testing.assert_allclose(scan.affine, aff)
    assert scan.magnitude_meta[0]["Manufacturer"] == "qsmrim-sim"
