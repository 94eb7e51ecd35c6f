"""Every bad input -> exit status 2, a message naming the file and the fix, no output file."""

import json

import numpy as np
import pytest

from qsmrim.cli.main import main
from tests.qsm_core.bids_synth import random_scan, save, write_megre

TE = (0.005, 0.010)
ALLOWED = {"qsmrim_failures.tsv"}  # the per-scan failure log is the only file allowed


def _dataset(root, rng):
    mag, ph = random_scan(rng, shape=(12, 10, 8))
    mags, phs = write_megre(root, "01", magnitude=mag, phase=ph, te_s=TE)
    return mag, ph, mags, phs


def _edit_json(path, **changes):
    meta = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    path.write_text(json.dumps(meta))


def _json(p):
    return p.with_name(p.name.replace(".nii.gz", ".json"))


def _corrupt(case, root, rng):
    """Make the dataset bad in one way; returns (extra CLI args, text the message must hold)."""
    mag, ph, mags, phs = _dataset(root, rng)
    if case == "echo_shapes_differ":
        save(mags[1], mag[:-2, :, :, 1])
        save(phs[1], ph[:-2, :, :, 1])
        return [], ["sub-01_echo-2_part-mag_MEGRE.nii.gz", "same matrix"]
    if case == "mag_phase_shape":
        save(phs[0], ph[:, :-1, :, 0])
        return [], ["sub-01_echo-1_part-phase_MEGRE.nii.gz", "does not match magnitude"]
    if case == "mag_phase_affine":
        save(phs[1], ph[..., 1], affine=np.diag([1.0, 1.0, 1.5, 1.0]))
        return [], ["sub-01_echo-2_part-phase_MEGRE.nii.gz", "same geometry"]
    if case == "missing_echo_time":
        _edit_json(_json(mags[0]), EchoTime=None)
        _edit_json(_json(phs[0]), EchoTime=None)
        return [], ["sub-01_echo-1_part-mag_MEGRE.nii.gz", "no EchoTime", "add"]
    if case in ("nan", "inf"):
        bad = ph[..., 1].copy()
        bad[4, 4, 4] = np.nan if case == "nan" else np.inf
        save(phs[1], bad)
        return [], ["sub-01_echo-2_part-phase_MEGRE.nii.gz", "NaN or Inf", "fix or mask"]
    if case == "2d":
        save(mags[0], mag[:, :, 0, 0])
        return [], ["sub-01_echo-1_part-mag_MEGRE.nii.gz", "2D image", "3D volume"]
    if case == "unknown_units":
        _edit_json(_json(phs[0]), Units="Hz")
        return [], ["sub-01_echo-1_part-phase_MEGRE.nii.gz", "unknown phase Units 'Hz'",
                    "'rad'"]
    if case == "rad_but_vendor_range":
        save(phs[0], np.round(ph[..., 0] / np.pi * 4096), dtype=np.int16)
        return [], ["sub-01_echo-1_part-phase_MEGRE.nii.gz", "Units is 'rad'", "'arbitrary'"]
    if case == "echo_times_decrease":
        _edit_json(_json(mags[1]), EchoTime=0.001)
        return [], ["EchoTime of", "not strictly increasing"]
    if case == "echo_without_phase":
        phs[1].unlink()
        return [], ["sub-01_echo-2_part-mag_MEGRE.nii.gz", "no matching phase"]
    if case == "empty_mask":
        save(root / "mask.nii.gz", np.zeros(mag.shape[:3]))
        return ["--mask", str(root / "mask.nii.gz")], ["mask.nii.gz", "the mask is empty"]
    if case == "mask_wrong_shape":
        save(root / "mask.nii.gz", np.ones((12, 10, 9)))
        return ["--mask", str(root / "mask.nii.gz")], ["mask.nii.gz", "mask shape", "GRE grid"]
    if case == "mask_missing":
        return ["--mask", str(root / "nomask.nii.gz")], ["nomask.nii.gz", "no such mask file"]
    raise AssertionError(case)


BIDS_CASES = ["echo_shapes_differ", "mag_phase_shape", "mag_phase_affine", "missing_echo_time",
              "nan", "inf", "2d", "unknown_units", "rad_but_vendor_range", "echo_times_decrease",
              "echo_without_phase", "empty_mask", "mask_wrong_shape", "mask_missing"]


def _outputs(out):
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} \
        if out.exists() else set()


@pytest.mark.parametrize("case", BIDS_CASES)
def test_bids_bad_input(tmp_path, rng, capsys, case):
    raw, out = tmp_path / "raw", tmp_path / "out"
    extra, needles = _corrupt(case, raw, rng)
    rc = main(["recon", str(raw), str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    for needle in needles:
        assert needle in err, (needle, err)
    assert "Traceback" not in err
    assert _outputs(out) <= ALLOWED
    if _outputs(out):  # the scan was recorded as failed, with the message
        table = (out / "qsmrim_failures.tsv").read_text().splitlines()
        assert table[0].split("\t") == ["scan", "participant_id", "session_id", "error_type",
                                        "message"]
        assert table[1].startswith("sub-01\tsub-01\tn/a\tInputError\t")


def test_nonexistent_bids_dir(tmp_path, capsys):
    rc = main(["recon", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "nowhere: no such BIDS folder; check the path" in err
    assert not (tmp_path / "out").exists()


def _explicit(tmp_path, rng):
    mag, ph = random_scan(rng, shape=(12, 10, 8))
    m = [save(tmp_path / f"mag{e}.nii.gz", mag[..., e]) for e in range(2)]
    p = [save(tmp_path / f"pha{e}.nii.gz", ph[..., e]) for e in range(2)]
    return mag, ph, m, p


@pytest.mark.parametrize("case", ["missing_file", "echo_times_ms", "wrong_count",
                                  "no_field_strength", "no_label", "positional"])
def test_explicit_bad_input(tmp_path, rng, capsys, case):
    mag, ph, m, p = _explicit(tmp_path, rng)
    out = tmp_path / "out"
    args = ["recon", "--magnitude", *map(str, m), "--phase", *map(str, p), "--echo-times",
            "0.005", "0.01", "--field-strength", "3", "--out", str(out), "--participant-label",
            "01"]
    needles = {"missing_file": ["pha9.nii.gz", "no such file"],
               "echo_times_ms": ["look like milliseconds", "0.0072"],
               "wrong_count": ["1 echo time(s) for 2 echo", "mag0.nii.gz"],
               "no_field_strength": ["mag0.nii.gz", "no MagneticFieldStrength",
                                     "--field-strength"],
               "no_label": ["mag0.nii.gz", "--participant-label"],
               "positional": ["unexpected positional", "--out"]}[case]
    if case == "missing_file":
        args[args.index(str(p[1]))] = str(tmp_path / "pha9.nii.gz")
    elif case == "echo_times_ms":
        i = args.index("0.005")
        args[i:i + 2] = ["7.2", "13.4"]
    elif case == "wrong_count":
        args.remove("0.01")
    elif case == "no_field_strength":
        i = args.index("--field-strength")
        del args[i:i + 2]
    elif case == "no_label":
        del args[-2:]
    elif case == "positional":
        args.insert(1, str(tmp_path))
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2
    for needle in needles:
        assert needle in err, (needle, err)
    assert _outputs(out) == set()


@pytest.mark.parametrize("step", ["unwrap", "bgremove", "invert"])
def test_steps_bad_input(tmp_path, rng, capsys, step):
    shape = (12, 10, 8)
    field = save(tmp_path / "field.nii.gz", rng.normal(0, 1, shape))
    mask = save(tmp_path / "mask.nii.gz", np.zeros(shape))
    out = tmp_path / "out" / "x.nii.gz"
    if step == "unwrap":
        bad = rng.normal(0, 1, shape)
        bad[0, 0, 0] = np.nan
        save(tmp_path / "phase.nii.gz", bad)
        args = ["unwrap", str(tmp_path / "phase.nii.gz"), str(out)]
        needles = ["phase.nii.gz", "NaN or Inf"]
    elif step == "bgremove":
        args = ["bgremove", str(field), str(mask), str(out)]
        needles = ["mask.nii.gz", "the mask is empty"]
    else:
        save(tmp_path / "mask.nii.gz", np.ones(shape))
        args = ["invert", str(field), str(mask), str(out)]  # Hz without a field strength
        needles = ["field.nii.gz", "--field-strength"]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "out").exists()
