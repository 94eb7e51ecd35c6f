import logging

import numpy as np
import pytest

from qsm_core.errors import InputError
from qsm_core.io.phase import normalise_units, phase_to_rad, wrap_rad


def test_siemens_signed_12bit_rescaled_exactly(rng, caplog):
    x = rng.integers(-4096, 4096, size=(8, 8, 8)).astype(np.float32)
    x.flat[0], x.flat[1] = -4096, 4095
    with caplog.at_level(logging.WARNING, logger="qsm_core.io.phase"):
        rad, note = phase_to_rad(x, units="arbitrary", source="p.nii.gz")
    np.testing.assert_allclose(rad, x.astype(np.float64) * np.pi / 4096, rtol=0, atol=1e-6)
    assert rad.dtype == np.float32
    assert "pi/4096" in note
    warn = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "p.nii.gz" in warn[0].getMessage()
    assert "vendor phase scaling detected" in warn[0].getMessage()


def test_unsigned_12bit_rescaled_exactly(rng, caplog):
    x = rng.integers(0, 4096, size=(6, 6, 6)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        rad, note = phase_to_rad(x, units=None)  # auto-detect without Units
    np.testing.assert_allclose(rad, x * 2 * np.pi / 4096 - np.pi, atol=1e-6)
    assert "[0, 4095]" in note
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_other_wide_range_rescaled_to_one_cycle(rng):
    true = rng.uniform(-np.pi, np.pi, (6, 6, 6))
    true.flat[0], true.flat[1] = -np.pi, np.pi
    x = (true + np.pi) / (2 * np.pi) * 1000.0 + 17.0  # floats in [17, 1017]
    rad, _ = phase_to_rad(x, units="arbitrary")
    np.testing.assert_allclose(rad, true, atol=1e-5)


def test_radians_kept_and_0_2pi_wrapped():
    x = np.linspace(-np.pi, np.pi, 64).reshape(4, 4, 4)
    rad, _ = phase_to_rad(x, units="rad")
    np.testing.assert_array_equal(rad, x.astype(np.float32))
    y = np.linspace(0, 2 * np.pi, 64, endpoint=False).reshape(4, 4, 4)
    rad, note = phase_to_rad(y, units="rad")
    np.testing.assert_allclose(np.exp(1j * rad), np.exp(1j * y), atol=1e-5)
    assert rad.max() < np.pi and "wrapped" in note


def test_degrees_converted():
    x = np.array([-180.0, -90.0, 0.0, 90.0])
    rad, _ = phase_to_rad(x, units="degrees")
    np.testing.assert_allclose(rad, [-np.pi, -np.pi / 2, 0, np.pi / 2], atol=1e-6)


def test_rad_units_with_vendor_values_is_an_error():
    x = np.array([-4096.0, 0.0, 4095.0])
    with pytest.raises(InputError, match=r"sub-01_echo-1_part-phase.*Units.*'arbitrary'"):
        phase_to_rad(x, units="rad", source="sub-01_echo-1_part-phase_MEGRE.nii.gz")


def test_unknown_units_named():
    with pytest.raises(InputError, match=r"p\.nii\.gz: unknown phase Units 'Hz'"):
        phase_to_rad(np.zeros(3), units="Hz", source="p.nii.gz")
    assert normalise_units("RADIANS") == "rad"


def test_constant_phase_is_an_error():
    with pytest.raises(InputError, match="constant"):
        phase_to_rad(np.full((3, 3, 3), 100.0), units="arbitrary", source="p.nii")


def test_wrap_rad_range(rng):
    x = rng.uniform(-50, 50, 1000)
    w = wrap_rad(x)
    assert w.min() >= -np.pi and w.max() < np.pi
    np.testing.assert_allclose(np.exp(1j * w), np.exp(1j * x), atol=1e-4)
