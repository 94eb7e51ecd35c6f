import os

import numpy as np
import pytest

from qsm_core.errors import InputError
from qsm_core.io import atomic_path, load_nifti, save_nifti, write_json


def test_crash_leaves_no_file(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []


def test_written_file_has_umask_permissions(tmp_path):
    write_json(tmp_path / "a.json", {"x": np.float32(1.5)})
    mode = os.stat(tmp_path / "a.json").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    assert (tmp_path / "a.json").read_text() == '{\n  "x": 1.5\n}\n'


def test_save_nifti_refuses_nan_and_round_trips(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    aff = np.diag([0.9, 0.9, 2.0, 1.0])
    save_nifti(tmp_path / "a.nii.gz", data, aff)
    back, back_aff = load_nifti(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(back, data)
    np.testing.assert_allclose(back_aff, aff)
    bad = data.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        save_nifti(tmp_path / "b.nii.gz", bad, aff)
    assert not (tmp_path / "b.nii.gz").exists()
