import gzip

import nibabel as nib
import numpy as np
import pytest

from qsm_core.errors import InputError
from qsm_core.io.nifti import load_nifti, write_image


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


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_written_file_is_what_nibabel_writes(tmp_path, rng, suffix):
    """write_image (ISA-L gzip) gives a standard file: gzip and nibabel read back the bytes
    nib.save would have compressed, and equal images give byte-identical files."""
    img = nib.Nifti1Image(rng.normal(size=(9, 8, 7)).astype(np.float32), np.diag([1, 2, 3, 1.]))
    img.header.set_xyzt_units("mm", "sec")
    a, b = write_image(img, tmp_path / f"a{suffix}"), write_image(img, tmp_path / f"b{suffix}")
    assert a.read_bytes() == b.read_bytes()
    ref = tmp_path / f"ref{suffix}"
    nib.save(img, ref)
    if suffix == ".nii.gz":
        assert gzip.decompress(a.read_bytes()) == gzip.decompress(ref.read_bytes())
    else:
        assert a.read_bytes() == ref.read_bytes()
    np.testing.assert_array_equal(nib.load(a).get_fdata(), img.get_fdata())
    np.testing.assert_array_equal(load_nifti(a)[0], img.get_fdata())
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temporary left
