"""Cohort planning, presets, readers, the BIDS writer and `qsmrim simulate`."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from qsm_core.errors import InputError
from qsm_core.io import load_nifti
from qsm_core.io.tables import read_table
from qsmrim.cli.main import main
from training.simulate import acquisition as acq
from training.simulate.cohort import plan_cohort, simulate_cohort, simulate_scan
from training.simulate.presets import get_preset
from training.simulate.readers import default_readers, read_lesions
from training.simulate.report import calibration_report, cohen_kappa

PROC = dict(source="procedural", anatomy_shape=(64, 64, 64), voxel_size_mm=(3, 3, 3))


@pytest.fixture(scope="module")
def seed_plan():
    # procedural head for placement, readers judging a 1 mm isotropic protocol
    return plan_cohort("seed-study", n_subjects=53, seed=11, source="procedural",
                       anatomy_shape=(64, 64, 64), anatomy_voxel_mm=(3, 3, 3),
                       voxel_size_mm=(1, 1, 1))


def test_plan_is_deterministic():
    a = plan_cohort("seed-study", n_subjects=6, seed=5, **PROC)
    b = plan_cohort("seed-study", n_subjects=6, seed=5, **PROC)
    c = plan_cohort("seed-study", n_subjects=6, seed=6, **PROC)
    pd.testing.assert_frame_equal(a.lesions, b.lesions)
    pd.testing.assert_frame_equal(a.participants, b.participants)
    assert not a.lesions.equals(c.lesions)


def test_seed_study_calibration(seed_plan):
    rep = calibration_report(seed_plan)
    ms, nm = rep["groups"]["MS"], rep["groups"]["NMOSD"]
    assert (ms["n_patients"], nm["n_patients"]) == (32, 21)
    for g in (ms, nm):
        assert abs(g["lesion_prl_fraction_truth"] - g["lesion_prl_fraction_target"]) <= 0.05
        assert abs(g["patient_prl_fraction_truth"] - g["patient_prl_fraction_target"]) <= 0.05
        m, _ = g["lesions_per_patient_target"]
        assert abs(g["lesions_per_patient_mean"] - m) <= 0.2 * m
    assert abs(nm["patients_without_lesions"] - 0.38) <= 0.06
    kappas = list(rep["pairwise_kappa"].values())
    assert len(kappas) == 3 and all(0.5 <= k <= 0.85 for k in kappas)
    assert rep["consensus_vs_truth"]["accuracy"] > 0.75


def test_lesion_table_contents(seed_plan):
    df = seed_plan.lesions
    assert df.groupby(["participant_id", "session_id"]).lesion_id.apply(
        lambda s: s.is_unique).all()
    # no rims below the tentorium; PRL means a complete or layered paramagnetic rim
    infra = df[df.location == "infratentorial"]
    assert (infra.truth_type != "rim").all() and (infra.truth_prl == 0).all()
    prl = df[df.truth_prl == 1]
    assert (prl.truth_type == "rim").all()
    assert prl.truth_rim_variant.isin(["complete", "layered"]).all()
    assert (prl.truth_rim_coverage >= 2 / 3).all()
    assert prl.truth_rim_chi_ppm.between(0.01, 0.06).all()
    # PRLs are larger than rimless lesions (size-biased choice, room for a core)
    rimless = df[(df.truth_prl == 0) & (df.diagnosis == "MS")]
    assert prl.volume_mm3.median() > 1.3 * rimless.volume_mm3.median()
    inc = df[df.truth_rim_variant == "incomplete"]
    assert len(inc) and (inc.truth_rim_coverage < 2 / 3).all()
    assert set(df.truth_type) == {"iso", "hypo", "hyper", "hypo_rim", "rim"}
    # follow-up: multi-session MS patients, new lesions and new rims
    assert (seed_plan.participants.n_sessions > 1).any()
    assert df.new_lesion.sum() > 0 and df.new_rim.sum() > 0
    # the same lesion keeps its id (and place) across sessions
    s = seed_plan.subjects[int(np.argmax(seed_plan.participants.n_sessions))]
    c0 = {les.lesion_id: les.centre_mm for les in s.sessions[0].lesions}
    c1 = {les.lesion_id: les.centre_mm for les in s.sessions[1].lesions}
    for lid in c0:
        np.testing.assert_allclose(c0[lid], c1[lid])


def test_readers_follow_rim_conspicuity(rng):
    n = 4000
    df = pd.DataFrame({
        "truth_rim_chi_ppm": rng.uniform(0.01, 0.06, n), "truth_rim_thickness_mm": 1.5,
        "truth_rim_coverage": 0.9, "long_axis_mm": 8.0, "truth_type": "rim", "truth_prl": 1,
        "vein_at_edge": 0, "central_vein": 0, "deposit": "none", "truth_core_chi_ppm": 0.0,
        "confluent": 0})
    out = read_lesions(df, rng, readers=default_readers(3), sigma_ppm=0.009,
                       voxel_size_mm=(1, 1, 1))
    faint = out[df.truth_rim_chi_ppm < 0.02].consensus.mean()
    bright = out[df.truth_rim_chi_ppm > 0.045].consensus.mean()
    assert bright > 0.85 and faint < bright - 0.3
    # the same rims are harder in thick clinical slices and at lower SNR
    worse = read_lesions(df, rng, readers=default_readers(3), sigma_ppm=0.015,
                         voxel_size_mm=(0.9, 0.9, 2.0))
    assert worse.consensus.mean() < out.consensus.mean() - 0.1
    # veins at the edge of non-rim lesions cause false positives (per reader call)
    neg = df.assign(truth_type="iso", truth_prl=0, truth_rim_chi_ppm=0.0)
    cols = ["reader_1", "reader_2", "reader_3"]
    fp_plain = read_lesions(neg, rng, readers=default_readers(3), sigma_ppm=0.009,
                            voxel_size_mm=(1, 1, 1))[cols].to_numpy().mean()
    fp_vein = read_lesions(neg.assign(vein_at_edge=1), rng, readers=default_readers(3),
                           sigma_ppm=0.009, voxel_size_mm=(1, 1, 1))[cols].to_numpy().mean()
    assert fp_plain < 0.005 and fp_vein > 0.015


def test_cohen_kappa_matches_sklearn(rng):
    from sklearn.metrics import cohen_kappa_score

    a, b = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    b[:120] = a[:120]
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))


def test_bad_presets_are_clear_errors():
    with pytest.raises(InputError, match="unknown preset"):
        get_preset("nope")
    with pytest.raises(InputError, match="lesion_prl_fraction"):
        get_preset("general-ms", {"lesion_prl_fraction": "1.5"})
    with pytest.raises(InputError, match="unknown preset key"):
        get_preset("general-ms", {"MS.bogus": 1})
    with pytest.raises(InputError, match="no group"):
        get_preset("general-ms", {"NMOSD.lesions_mean": 3})
    with pytest.raises(InputError, match="cannot read"):
        get_preset("general-ms", {"lesions_mean": "many"})
    p = get_preset("seed-study", {"MS.lesions_mean": "8", "n_readers": "5"})
    assert p.groups[0].lesions_mean == 8.0 and p.n_readers == 5
    # lesion-style fields: one group's, or every group's
    p = get_preset("seed-study", {"MS.style.prl_size_bias": "0"})
    assert p.groups[0].style.prl_size_bias == 0.0
    assert p.groups[1].style == get_preset("seed-study").groups[1].style
    p = get_preset("seed-study", {"style.central_vein_prob": "0.1"})
    assert [g.style.central_vein_prob for g in p.groups] == [0.1, 0.1]
    with pytest.raises(InputError, match="unknown lesion-style key 'MS.style.bogus'"):
        get_preset("general-ms", {"MS.style.bogus": 1})
    with pytest.raises(InputError, match="n_subjects"):
        plan_cohort("general-ms", n_subjects=0, **PROC)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "ds"
    simulate_cohort(out, preset="general-ms", n_subjects=2, seed=3, progress=False,
                    report=True, **PROC)
    return out


def test_dataset_layout_and_ground_truth(small_dataset):
    out = small_dataset
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw"
    part = read_table(out / "participants.tsv", "participants")
    assert list(part.columns[:5]) == ["participant_id", "diagnosis", "age", "sex", "n_sessions"]
    les = read_table(out / "derivatives" / "lesions" / "lesions.tsv", "lesions")
    assert {"reader_1", "reader_2", "reader_3", "consensus", "truth_prl", "truth_type",
            "truth_rim_chi_ppm", "truth_rim_coverage", "location", "enhancing",
            "central_vein"} <= set(les.columns)
    pid = part.participant_id[0]
    anat = out / pid / "ses-01" / "anat"
    side = json.loads((anat / f"{pid}_ses-01_echo-1_part-phase_MEGRE.json").read_text())
    assert side["EchoTime"] == pytest.approx(0.0072) and side["Units"] == "rad"
    assert side["MagneticFieldStrength"] == 3.0 and side["Manufacturer"] == "Siemens"
    assert len(list(anat.glob("*_MEGRE.nii.gz"))) == 8
    mask, maff = load_nifti(out / "derivatives" / "lesions" / pid / "ses-01" / "anat"
                            / f"{pid}_ses-01_desc-lesion_mask.nii.gz")
    flair, faff = load_nifti(anat / f"{pid}_ses-01_FLAIR.nii.gz")
    assert mask.shape == flair.shape and np.allclose(maff, faff)
    ids = set(np.unique(mask).astype(int)) - {0}
    rows = les[(les.participant_id == pid) & (les.session_id == "ses-01")]
    assert ids == set(rows.lesion_id)
    # table centroids are the label centroids in world mm
    r = rows.iloc[0]
    idx = np.argwhere(mask == r.lesion_id).mean(0)
    world = maff[:3, :3] @ idx + maff[:3, 3]
    np.testing.assert_allclose(world, r[["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]]
                               .to_numpy(float), atol=1e-2)
    sim = out / "derivatives" / "simulation" / pid / "ses-01" / "anat"
    chi, caff = load_nifti(sim / f"{pid}_ses-01_Chimap.nii.gz")
    brain, _ = load_nifti(sim / f"{pid}_ses-01_desc-brain_mask.nii.gz")
    assert np.all(chi[brain == 0] == 0) and np.abs(chi).max() < 2.0
    assert (out / "derivatives" / "simulation" / "calibration.json").is_file()


def test_arrays_identical_for_same_seed_and_any_worker_count(small_dataset, tmp_path):
    out2 = tmp_path / "again"
    simulate_cohort(out2, preset="general-ms", n_subjects=2, seed=3, progress=False,
                    workers=2, **PROC)
    a = (small_dataset / "derivatives" / "lesions" / "lesions.tsv").read_text()
    b = (out2 / "derivatives" / "lesions" / "lesions.tsv").read_text()
    assert a == b
    for f in sorted(small_dataset.rglob("*.nii.gz")):
        g = out2 / f.relative_to(small_dataset)
        x, _ = load_nifti(f)
        y, _ = load_nifti(g)
        np.testing.assert_array_equal(x, y)


def test_cli_refuses_non_empty_dir_and_writes_tables_only(tmp_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["simulate", str(out), "--anatomy", "procedural", "--voxel-size", "3", "3", "3",
            "--subjects", "3", "--tables-only", "--no-progress"]
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert main(args + ["--overwrite", "--report", "--field-strength", "7",
                        "--orientation", "sagittal"]) == 0
    assert (out / "participants.tsv").is_file() and not (out / "keep.txt").exists()
    assert not list(out.rglob("*.nii.gz"))
    settings = json.loads((out / "derivatives/simulation/simulation.json").read_text())
    assert settings["field_strength_t"] == 7.0 and settings["orientation"] == "sagittal"
    assert main(["simulate", str(tmp_path / "y"), "--field-strength", "30",
                 "--tables-only"]) == 2
    assert "field strength" in capsys.readouterr().err
    assert main(["simulate", str(tmp_path / "x"), "--set", "lesions_mean=-3",
                 "--tables-only"]) == 2
    assert "lesions_mean" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_clinical_voxels_and_separate_flair_grid_share_world_coordinates():
    plan = plan_cohort("general-ms", n_subjects=1, seed=2, source="procedural",
                       anatomy_shape=(64, 64, 64), anatomy_voxel_mm=(1.5, 1.5, 1.5),
                       voxel_size_mm=(0.9, 0.9, 2.0), max_tilt_deg=10.0)
    from qsm_core.geometry import b0_dir_from_affine, voxel_sizes_mm
    from training.simulate.cohort import simulate_scan

    r = simulate_scan(plan, 0, 0, flair_voxel_size_mm=(1.5, 1.5, 1.5))
    np.testing.assert_allclose(voxel_sizes_mm(r.gre_affine), [0.9, 0.9, 2.0], atol=1e-9)
    np.testing.assert_allclose(voxel_sizes_mm(r.flair_affine), [1.5, 1.5, 1.5], atol=1e-9)
    assert r.magnitude.shape[:3] == r.chi_ppm.shape and r.flair.shape == r.lesion_labels.shape
    # the head tilt is in the affine: B0 is off the slice axis by the planned angle
    tilt = np.degrees(np.arccos(b0_dir_from_affine(r.gre_affine)[2]))
    assert tilt == pytest.approx(plan.subjects[0].sessions[0].tilt_deg, abs=1e-6)

    def centroid(mask, aff):
        return aff[:3, :3] @ np.argwhere(mask).mean(0) + aff[:3, 3]

    # FLAIR grid: the largest lesion sits where it was planned (head frame -> world)
    big = max(r.stats, key=lambda k: r.stats[k]["volume_mm3"])
    ses = plan.subjects[0].sessions[0]
    planned = {les.lesion_id: ses.rotation @ les.centre_mm for les in ses.lesions}
    np.testing.assert_allclose(centroid(r.lesion_labels == big, r.flair_affine), planned[big],
                               atol=2.5)
    np.testing.assert_allclose(r.stats[big]["centroid_mm"],
                               centroid(r.lesion_labels == big, r.flair_affine), atol=1e-6)
    # GRE grid: the brain mask sits where the simulation grid's brain mask is
    from training.simulate import acquisition as acq
    from training.simulate.anatomy import build_anatomy

    anat = build_anatomy(source="procedural", voxel_size_mm=(1.5, 1.5, 1.5),
                         shape=(64, 64, 64), veins=False)
    w = acq.world_affine(anat, plan.subjects[0].sessions[0].rotation)
    np.testing.assert_allclose(centroid(r.brain_mask > 0, r.gre_affine),
                               centroid(anat.brain_mask > 0, w), atol=0.5)


@pytest.mark.parametrize("scanner,n_echoes", [("philips", 6), ("single-echo", 1)])
def test_scanner_presets_render(scanner, n_echoes):
    from training.simulate.cohort import simulate_scan

    plan = plan_cohort("general-ms", n_subjects=1, seed=4, scanner=scanner, **PROC)
    r = simulate_scan(plan, 0, 0)
    assert r.magnitude.shape[-1] == n_echoes == len(r.echo_times_s)
    assert np.all(np.isfinite(r.magnitude)) and np.abs(r.phase_rad).max() <= np.pi


def test_rim_leaves_room_for_a_core():
    from training.simulate.lesions import Lesion, with_rim_core
    les = Lesion(lesion_id=1, centre_mm=np.zeros(3), rotation=np.eye(3),
                 blobs=[(np.zeros(3), np.array([5.0, 2.0, 1.5]))], location="deep_wm",
                 shape_seed=0)
    wide, t = with_rim_core(les, 1.5, min_core_mm=1.5, min_thickness_mm=0.5)
    np.testing.assert_allclose(wide.blobs[0][1], [5.0, 3.0, 3.0])  # minor axes widened
    assert t == 1.5 and les.blobs[0][1][1] == 2.0  # the input is not modified
    small = les.evolve(blobs=[(np.zeros(3), np.array([2.5, 2.0, 1.5]))])
    thin, t = with_rim_core(small, 2.0, min_core_mm=1.5, min_thickness_mm=0.5)
    assert t == 1.0  # rim thinned so a 1.5 mm core fits inside the 2.5 mm long semi-axis
    np.testing.assert_allclose(thin.blobs[0][1], [2.5, 2.5, 2.5])  # never beyond the long one
    big = les.evolve(blobs=[(np.zeros(3), np.array([6.0, 5.0, 4.0]))])
    same, t = with_rim_core(big, 2.0, min_core_mm=1.5, min_thickness_mm=0.5)
    assert same is big and t == 2.0


def test_forward_kernel_choice_changes_only_the_fine_field():
    from training.simulate.cohort import simulate_scan

    kw = dict(n_subjects=1, seed=4, source="procedural", anatomy_shape=(48, 48, 48),
              anatomy_voxel_mm=(1.5, 1.5, 1.5), voxel_size_mm=(1.5, 1.5, 1.5), snr=1e6)
    cont = plan_cohort("general-ms", **kw)
    disc = plan_cohort("general-ms", forward_kernel="discrete", **kw)
    assert disc.settings["forward_kernel"] == "discrete"
    assert cont.settings["forward_kernel"] == "continuous"
    a, b = simulate_scan(cont, 0, 0), simulate_scan(disc, 0, 0)
    brain = a.brain_mask > 0
    fa, fb = a.local_field_ppm[brain], b.local_field_ppm[brain]
    # the same sources: fields agree closely, but not exactly
    assert np.corrcoef(fa, fb)[0, 1] > 0.95
    assert 0.01 < np.linalg.norm(fa - fb) / np.linalg.norm(fa) < 0.5
    np.testing.assert_array_equal(a.chi_ppm, b.chi_ppm)
    with pytest.raises(InputError, match="forward_kernel"):
        plan_cohort("general-ms", forward_kernel="spatial", **kw)


def test_background_blur_setting_recorded_and_checked():
    kw = dict(n_subjects=1, seed=4, source="procedural", anatomy_shape=(48, 48, 48),
              anatomy_voxel_mm=(1.5, 1.5, 1.5), voxel_size_mm=(1.5, 1.5, 1.5))
    assert plan_cohort("general-ms", **kw).settings["background_blur_voxels"] == 1.0
    sharp = plan_cohort("general-ms", background_blur_voxels=0, **kw)
    assert sharp.settings["background_blur_voxels"] == 0.0
    for bad in (-0.5, 5.0):
        with pytest.raises(InputError, match="background_blur_voxels"):
            plan_cohort("general-ms", background_blur_voxels=bad, **kw)


def test_storage_orientation_moves_voxels_not_anatomy():
    """A sagittal or coronal scan is the axial one with its axes permuted and flipped: every
    image, label map and truth map maps back voxel for voxel, with the same world affine."""
    kw = dict(n_subjects=1, seed=4, source="procedural", anatomy_shape=(40, 44, 48),
              anatomy_voxel_mm=(1.5, 1.5, 1.5), voxel_size_mm=(1.5, 1.5, 1.5),
              max_tilt_deg=10)
    axial = simulate_scan(plan_cohort("general-ms", **kw), 0, 0)
    assert nib.aff2axcodes(axial.gre_affine) == ("R", "A", "S")
    for orientation, codes, shape in [("sagittal", ("P", "I", "R"), (44, 48, 40)),
                                      ("coronal", ("R", "S", "A"), (40, 48, 44))]:
        plan = plan_cohort("general-ms", orientation=orientation, **kw)
        assert plan.settings["orientation"] == orientation
        scan = simulate_scan(plan, 0, 0)
        assert nib.aff2axcodes(scan.gre_affine) == codes
        assert nib.aff2axcodes(scan.flair_affine) == codes
        assert scan.magnitude.shape[:3] == shape and scan.lesion_labels.shape == shape
        for name in ("magnitude", "phase_rad", "chi_ppm", "brain_mask", "rim_mask"):
            back, affine = acq.store_as(getattr(scan, name), scan.gre_affine, "axial")
            np.testing.assert_array_equal(back, getattr(axial, name), err_msg=name)
            np.testing.assert_allclose(affine, axial.gre_affine, atol=1e-9)
        back, _ = acq.store_as(scan.lesion_labels, scan.flair_affine, "axial")
        np.testing.assert_array_equal(back, axial.lesion_labels)
        assert scan.stats.keys() == axial.stats.keys()
    assert np.linalg.det(scan.gre_affine[:3, :3]) < 0  # coronal (R, S, A) is left-handed
    with pytest.raises(InputError, match="orientation"):
        plan_cohort("general-ms", orientation="oblique", **kw)
