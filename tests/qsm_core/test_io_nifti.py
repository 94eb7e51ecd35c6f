import gzip

import nibabel as nib
import numpy as np
import pytest

from qsm_core.errors import InputError
from qsm_core.io.nifti import load_nifti


@pytest.mark.parametrize("klass", [nib.Nifti1Image, nib.Nifti2Image])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_load_matches_nibabel_with_scaling(tmp_path, rng, klass, suffix):
    raw = rng.integers(-2000, 2000, (9, 8, 7)).astype(np.int16)
    aff = np.diag([0.9, 1.1, 2.0, 1.0])
    aff[:3, 3] = [-4.0, 5.0, 6.0]
    img = klass(raw, aff)
    img.header.set_slope_inter(0.5, 3.0)  # vendor scaling, as phase images often have
    path = tmp_path / f"img{suffix}"
    nib.save(img, path)
    data, affine = load_nifti(path)
    ref = nib.load(path)
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data, np.asarray(ref.dataobj, np.float32))
    np.testing.assert_array_equal(data, raw * 0.5 + 3.0)
    np.testing.assert_allclose(affine, ref.affine)


def test_multi_member_gzip_is_read_whole(tmp_path, rng):
    # a .nii.gz written as two concatenated gzip members (pigz -i, some converters)
    vol = rng.normal(size=(6, 6, 6)).astype(np.float32)
    plain = tmp_path / "a.nii"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), plain)
    b = plain.read_bytes()
    (tmp_path / "a.nii.gz").write_bytes(gzip.compress(b[:500]) + gzip.compress(b[500:]))
    np.testing.assert_array_equal(load_nifti(tmp_path / "a.nii.gz")[0], vol)


def test_truncated_gzip_names_the_file(tmp_path, rng):
    path = tmp_path / "cut.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(size=(6, 6, 6)).astype(np.float32), np.eye(4)), path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(InputError, match="cut.nii.gz: not a readable NIfTI"):
        load_nifti(path)
