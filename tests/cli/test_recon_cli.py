"""qsmrim recon: BIDS and explicit-file runs, provenance, resume, failure isolation."""

import json
import sys
import types

import nibabel as nib
import numpy as np
import pytest

from qsm_core import __version__
from qsm_core.io.derivatives import find_derivative, find_derivatives
from qsmrim.cli.main import main
from tests.qsm_core.bids_synth import head_phantom, random_scan, save, write_megre

TE = (0.005, 0.010)
DESCRIPTION = ("qsmrim classical QSM: Laplacian unwrapping, multi-echo fit, brain mask, "
               "background field removal, dipole inversion")


def _load(p):
    return np.asarray(nib.load(str(p)).dataobj)


def _contrast(chi, region, mask):
    return chi[region & mask].mean() - chi[mask & ~region].mean()


# ------------------------------------------------------------------ the real pipeline
def test_bids_round_trip_on_a_phantom(tmp_path, capsys):
    """40^3 head-ish phantom, 2 echoes, wrapped noisy phase, real pipeline (iLSQR)."""
    te = (0.010, 0.020)
    ph = head_phantom(shape=(40, 40, 40), te_s=te, noise=0.01)
    raw, out = tmp_path / "raw", tmp_path / "deriv"
    write_megre(raw, "01", "1", magnitude=ph["magnitude"], phase=ph["phase_rad"], te_s=te)
    rc = main(["recon", str(raw), str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "1 scan(s) reconstructed, 0 skipped" in err
    chi = _load(find_derivative(out, "01", "1", "Chimap"))
    mask = _load(find_derivative(out, "01", "1", "mask")) > 0
    truth = ph["chi_ppm"]
    # the mask is the brain, eroded by 2 mm (computed masks) and by V-SHARP: on this small
    # 40^3 head that keeps about 60 % of it; never anything outside the head
    assert 0.5 * ph["brain"].sum() < mask.sum() <= ph["brain"].sum()
    assert not np.any(mask & ~ph["brain"])
    # susceptibility close to truth: the +0.2 ppm nucleus within 20 %, NRMSE (after removing
    # the mean, QSM is relative) below 0.6; measured (2 mm mask erosion): contrast 0.182 vs
    # 0.219 on this tiny 2-echo head
    assert _contrast(chi, ph["sphere"], mask) == pytest.approx(
        _contrast(truth, ph["sphere"], mask), rel=0.20)
    d, t = chi[mask] - chi[mask].mean(), truth[mask] - truth[mask].mean()
    assert np.linalg.norm(d - t) / np.linalg.norm(t) < 0.6
    assert np.all(chi[~mask] == 0)
    # local field in Hz, same grid
    local = _load(find_derivative(out, "01", "1", "localfield"))
    assert local.shape == chi.shape and np.abs(local[mask]).max() > 1.0
    swi, mip = (_load(find_derivative(out, "01", "1", k)) for k in ("swi", "minIP"))
    assert np.all(np.isfinite(swi)) and np.all(mip <= swi.max() + 1e-6)
    # provenance: the parameters the pipeline reports, plus the run options
    side = json.loads((out / "sub-01/ses-1/anat/sub-01_ses-1_Chimap.json").read_text())
    params = side["GeneratedBy"][0]["Parameters"]
    assert side["Units"] == "ppm" and side["GeneratedBy"][0]["Version"] == __version__
    assert params["method"] == "ilsqr" and params["bgremove"] == "vsharp"
    assert params["echo_times_s"] == list(te) and params["field_strength_t"] == 3.0
    assert side["EchoTime"] == list(te) and side["MagneticFieldStrength"] == 3.0
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Parameters"] == {
        "method": "ilsqr", "bgremove": "vsharp", "phase_sign": 1, "mask": "auto"}


def test_explicit_files_4d_with_user_mask(tmp_path, capsys):
    ph = head_phantom(shape=(40, 40, 40), te_s=TE)
    mag = save(tmp_path / "mag.nii.gz", ph["magnitude"])
    pha = save(tmp_path / "pha.nii.gz", np.round(ph["phase_rad"] / np.pi * 4096),
               dtype=np.int16)  # Siemens-scaled integers, no sidecar: detected
    msk = save(tmp_path / "brain.nii.gz", ph["brain"].astype(np.uint8), dtype=np.uint8)
    out = tmp_path / "qsm"
    rc = main(["recon", "--magnitude", str(mag), "--phase", str(pha), "--echo-times",
               "0.005", "0.010", "--field-strength", "3", "--out", str(out),
               "--participant-label", "07", "--method", "tkd", "--mask", str(msk)])
    err = capsys.readouterr().err
    assert rc == 0, err
    chi = _load(out / "sub-07/anat/sub-07_Chimap.nii.gz")
    mask = _load(out / "sub-07/anat/sub-07_desc-brain_mask.nii.gz") > 0
    assert not np.any(mask & ~ph["brain"])  # the user mask won (V-SHARP only erodes it)
    assert _contrast(chi, ph["sphere"], mask) == pytest.approx(
        _contrast(ph["chi_ppm"], ph["sphere"], mask), rel=0.25)
    side = json.loads((out / "sub-07/anat/sub-07_Chimap.json").read_text())
    assert side["Sources"] == [str(mag.resolve()), str(pha.resolve())]
    assert side["GeneratedBy"][0]["Parameters"]["mask_file"] == str(msk.resolve())
    assert side["GeneratedBy"][0]["Parameters"]["mask_source"] == "user"
    assert any("pi/4096" in n for n in side["InputNotes"])
    assert not (out / "qsmrim_failures.tsv").exists()


# ------------------------------------------------------------------ control flow (fast)
class FakePipeline:
    """Stands in for qsm_core.pipeline: records calls, can fail for chosen participants."""

    def __init__(self, fail=None):
        self.calls, self.fail = [], fail or {}

    def module(self):
        mod = types.ModuleType("qsm_core.pipeline")
        mod.reconstruct = self.reconstruct
        return mod

    def reconstruct(self, magnitude, phase_rad, te_s, *, affine, field_strength_t, method,
                    bgremove, mask, phase_sign, device, progress):
        key = float(magnitude[0, 0, 0, 0])
        self.calls.append(key)
        for stage in ("mask", "unwrap_fit", "bgremove", "inversion", "swi"):
            progress(stage)
        if key in self.fail:
            raise self.fail[key]
        shape = magnitude.shape[:3]
        m = np.ones(shape, np.uint8) if mask is None else mask.astype(np.uint8)
        return types.SimpleNamespace(
            chi_ppm=phase_rad[..., 0] * 0.01 * m, mask=m, local_field_hz=phase_rad[..., 0] * m,
            total_field_hz=phase_rad[..., 0], swi=magnitude[..., 0], mip=magnitude[..., 0],
            parameters={"method": method, "bgremove": bgremove, "te_s": list(te_s),
                        "field_strength_t": field_strength_t})


def _cohort(root, rng, subs=("01", "02", "03")):
    for i, sub in enumerate(subs):
        mag, ph = random_scan(rng)
        mag[0, 0, 0, 0] = i + 1  # marks the participant in FakePipeline.calls
        write_megre(root, sub, "1" if sub == "03" else None, magnitude=mag, phase=ph, te_s=TE)


def test_isolation_resume_and_overwrite(tmp_path, rng, monkeypatch, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _cohort(raw, rng)
    bad = [next(raw.rglob(f"sub-02_echo-1_part-{p}_MEGRE.json")) for p in ("mag", "phase")]
    good_meta = [b.read_text() for b in bad]
    for b in bad:
        b.write_text(json.dumps({"MagneticFieldStrength": 3, "Units": "rad"}))  # no EchoTime
    fake = FakePipeline()
    monkeypatch.setitem(sys.modules, "qsm_core.pipeline", fake.module())

    rc = main(["recon", str(raw), str(out)])
    err = capsys.readouterr().err
    assert rc == 2  # bad input in one scan
    assert sorted(fake.calls) == [1.0, 3.0]  # the others finished
    assert "sub-02 failed: " in err and "sub-02_echo-1_part-mag_MEGRE.nii.gz" in err
    assert "sub-01: inversion" in err and "scan/s" in err  # progress bar with stage names
    assert [(d["participant_id"], d["session_id"]) for d in find_derivatives(out)] == [
        ("sub-01", None), ("sub-03", "ses-1")]
    rows = (out / "qsmrim_failures.tsv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("sub-02\tsub-02\tn/a\tInputError\t")
    assert not (out / "sub-02").exists()  # nothing partial for the failed scan

    # resume: only the fixed scan runs; the failure log goes away
    for b, text in zip(bad, good_meta):
        b.write_text(text)
    fake.calls.clear()
    mtime = find_derivative(out, "01", None, "Chimap").stat().st_mtime_ns
    assert main(["recon", str(raw), str(out)]) == 0
    assert fake.calls == [2.0]
    assert "1 scan(s) reconstructed, 2 skipped" in capsys.readouterr().err
    assert find_derivative(out, "01", None, "Chimap").stat().st_mtime_ns == mtime
    assert not (out / "qsmrim_failures.tsv").exists()

    # --overwrite recomputes everything; other options in the same folder are refused
    fake.calls.clear()
    assert main(["recon", str(raw), str(out), "--overwrite"]) == 0
    assert sorted(fake.calls) == [1.0, 2.0, 3.0]
    fake.calls.clear()
    assert main(["recon", str(raw), str(out), "--method", "tkd"]) == 2
    assert "other parameters" in capsys.readouterr().err and fake.calls == []


def test_unexpected_failure_exits_1_and_is_logged(tmp_path, rng, monkeypatch, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _cohort(raw, rng)
    fake = FakePipeline(fail={2.0: RuntimeError("solver diverged")})
    monkeypatch.setitem(sys.modules, "qsm_core.pipeline", fake.module())
    assert main(["recon", str(raw), str(out), "--participant-label", "sub-01", "02"]) == 1
    assert sorted(fake.calls) == [1.0, 2.0]  # filter: sub-03 not selected
    rows = (out / "qsmrim_failures.tsv").read_text().splitlines()
    assert rows[1] == "sub-02\tsub-02\tn/a\tRuntimeError\tsolver diverged"
    assert [d["participant_id"] for d in find_derivatives(out)] == ["sub-01"]


def test_provenance_sidecar_exact(tmp_path, rng, monkeypatch):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _cohort(raw, rng, subs=("03",))
    monkeypatch.setitem(sys.modules, "qsm_core.pipeline", FakePipeline().module())
    assert main(["recon", str(raw), str(out), "--bgremove", "pdf", "--phase-sign", "-1"]) == 0
    side = json.loads((out / "sub-03/ses-1/anat/sub-03_ses-1_desc-local_fieldmap.json")
                      .read_text())
    assert side == {
        "Description": "Local (tissue) field after background field removal, in Hz",
        "Units": "Hz",
        "GeneratedBy": [{"Name": "qsmrim", "Version": __version__, "Description": DESCRIPTION,
                         "Parameters": {"device": "cpu", "method": "ilsqr", "bgremove": "pdf",
                                        "te_s": [0.005, 0.01], "field_strength_t": 3.0}}],
        "Sources": [f"bids:raw:sub-03/ses-1/anat/sub-03_ses-1_echo-{e}_part-{p}_MEGRE.nii.gz"
                    for p in ("mag", "phase") for e in (1, 2)],
        "EchoTime": [0.005, 0.01],
        "MagneticFieldStrength": 3.0,
        "InputNotes": ["phase in radians (Units 'rad')"],
    }
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Parameters"] == {
        "method": "ilsqr", "bgremove": "pdf", "phase_sign": -1, "mask": "auto"}
    assert desc["DatasetLinks"] == {"raw": raw.resolve().as_uri()}


def test_mask_needs_a_single_scan(tmp_path, rng, monkeypatch, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _cohort(raw, rng, subs=("01", "02"))
    save(tmp_path / "m.nii.gz", np.ones((12, 10, 8)))
    monkeypatch.setitem(sys.modules, "qsm_core.pipeline", FakePipeline().module())
    assert main(["recon", str(raw), str(out), "--mask", str(tmp_path / "m.nii.gz")]) == 2
    assert "applies to one scan but 2 are selected" in capsys.readouterr().err
    assert main(["recon", str(raw), str(out), "--mask", str(tmp_path / "m.nii.gz"),
                 "--participant-label", "02"]) == 0
    assert [d["participant_id"] for d in find_derivatives(out)] == ["sub-02"]
    # --mask-dir: BIDS-named masks, e.g. from the previous run
    out2 = tmp_path / "out2"
    assert main(["recon", str(raw), str(out2), "--mask-dir", str(tmp_path / "nomasks")]) == 2
    assert main(["recon", str(raw), str(out2), "--mask-dir", str(out)]) == 2
    assert [d["participant_id"] for d in find_derivatives(out2)] == ["sub-02"]
    rows = (out2 / "qsmrim_failures.tsv").read_text().splitlines()
    assert len(rows) == 2 and "sub-01_desc-brain_mask.nii.gz: no such mask" in rows[1]


def test_jobs_give_the_same_maps_and_isolate_failures(tmp_path, capsys):
    """--jobs 2 (two pinned worker processes, real pipeline) against one process."""
    te = (0.010, 0.020)
    raw = tmp_path / "raw"
    for i, sub in enumerate(("01", "02", "03")):
        ph = head_phantom(shape=(40, 40, 40), te_s=te, noise=0.01,
                          rng=np.random.default_rng(i))
        write_megre(raw, sub, None, magnitude=ph["magnitude"], phase=ph["phase_rad"], te_s=te)
    bad = [next(raw.rglob(f"sub-02_echo-1_part-{p}_MEGRE.json")) for p in ("mag", "phase")]
    good_meta = [b.read_text() for b in bad]
    for b in bad:
        b.write_text(json.dumps({"MagneticFieldStrength": 3, "Units": "rad"}))  # no EchoTime

    assert main(["recon", str(raw), str(tmp_path / "one"), "--no-progress"]) == 2
    capsys.readouterr()
    assert main(["recon", str(raw), str(tmp_path / "two"), "--jobs", "2"]) == 2
    err = capsys.readouterr().err
    assert "2 scan(s) reconstructed, 0 skipped (already done), 1 failed" in err
    assert "sub-02 failed: " in err and "EchoTime" in err
    for out in ("one", "two"):
        rows = (tmp_path / out / "qsmrim_failures.tsv").read_text().splitlines()
        assert len(rows) == 2 and rows[1].startswith("sub-02\tsub-02\tn/a\tInputError\t")
    for sub in ("01", "03"):
        one, two = (_load(find_derivative(tmp_path / out, sub, None, "Chimap"))
                    for out in ("one", "two"))
        mask = _load(find_derivative(tmp_path / "one", sub, None, "mask")) > 0
        assert np.array_equal(mask, _load(find_derivative(tmp_path / "two", sub, None, "mask"))
                              > 0)
        # one thread per worker against two: only the summation order of the kernels differs
        assert np.abs(two - one).max() <= 1e-5 * np.abs(one).max()
    assert not (tmp_path / "two" / "sub-02").exists()
    # resume in workers: only the mended scan runs
    for b, text in zip(bad, good_meta):
        b.write_text(text)
    assert main(["recon", str(raw), str(tmp_path / "two"), "--jobs", "2"]) == 0
    assert "1 scan(s) reconstructed, 2 skipped" in capsys.readouterr().err
    assert not (tmp_path / "two" / "qsmrim_failures.tsv").exists()


class _PoolWithADeadWorker:
    """Stands in for the worker pool: the first scan runs here, then the pool breaks."""

    def __init__(self, *args, **kwargs):
        self.n = 0

    def submit(self, fn, *args):
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool

        fut = Future()
        self.n += 1
        if self.n == 1:
            fut.set_result(fn(*args))
        else:
            fut.set_exception(BrokenProcessPool("A process in the process pool was terminated"))
        return fut

    def shutdown(self, **kwargs):
        pass


def test_a_dead_worker_is_recorded_and_the_rerun_finishes(tmp_path, rng, monkeypatch, capsys):
    from qsmrim.cli import recon

    raw, out = tmp_path / "raw", tmp_path / "out"
    _cohort(raw, rng)
    monkeypatch.setitem(sys.modules, "qsm_core.pipeline", FakePipeline().module())
    monkeypatch.setattr(recon, "pinned_pool", _PoolWithADeadWorker)
    assert main(["recon", str(raw), str(out), "--jobs", "2"]) == 1
    err = capsys.readouterr().err
    assert "1 scan(s) reconstructed, 0 skipped (already done), 2 failed" in err
    assert "rerun with fewer --jobs" in err
    rows = (out / "qsmrim_failures.tsv").read_text().splitlines()
    assert [r.split("\t")[:4] for r in rows[1:]] == [
        ["sub-02", "sub-02", "n/a", "WorkerDied"],
        ["sub-03_ses-1", "sub-03", "ses-1", "WorkerDied"]]
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "qsm_core.pipeline", FakePipeline().module())
    assert main(["recon", str(raw), str(out), "--jobs", "1"]) == 0
    assert "2 scan(s) reconstructed, 1 skipped" in capsys.readouterr().err
    assert not (out / "qsmrim_failures.tsv").exists()


def test_jobs_options_are_checked(tmp_path, rng, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _cohort(raw, rng, subs=("01",))
    assert main(["recon", str(raw), str(out), "--jobs", "0"]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err
    assert main(["recon", str(raw), str(out), "--jobs", "2", "--device", "cuda"]) == 2
    assert "give --jobs 1" in capsys.readouterr().err
    mag = next(raw.rglob("*part-mag_MEGRE.nii.gz"))
    pha = next(raw.rglob("*part-phase_MEGRE.nii.gz"))
    assert main(["recon", "--magnitude", str(mag), "--phase", str(pha), "--echo-times", "0.005",
                 "--field-strength", "3", "--out", str(out), "--jobs", "2"]) == 2
    assert "--jobs is for BIDS datasets" in capsys.readouterr().err
    assert not out.exists()


def test_cuda_without_a_gpu_is_refused(tmp_path, rng, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    raw, out = tmp_path / "raw", tmp_path / "out"
    _cohort(raw, rng, subs=("01",))
    assert main(["recon", str(raw), str(out), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.gpu
def test_cuda_matches_cpu(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    te = (0.010, 0.020)
    ph = head_phantom(shape=(48, 48, 48), te_s=te, noise=0.01)
    raw = tmp_path / "raw"
    write_megre(raw, "01", None, magnitude=ph["magnitude"], phase=ph["phase_rad"], te_s=te)
    for dev in ("cpu", "cuda"):
        assert main(["recon", str(raw), str(tmp_path / dev), "--device", dev]) == 0
    cpu, gpu = (_load(find_derivative(tmp_path / d, "01", None, "Chimap")) for d in ("cpu", "cuda"))
    mask = _load(find_derivative(tmp_path / "cpu", "01", None, "mask")) > 0
    assert np.linalg.norm(gpu[mask] - cpu[mask]) / np.linalg.norm(cpu[mask]) < 5e-3
