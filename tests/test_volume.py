"""core.volume: MRC reading (validation messages), atomic writing, thin-axis views."""

from __future__ import annotations

import io
import struct

import mrcfile
import numpy as np
import pytest
from tomolive.core.volume import (
    VolumeError,
    canonical_shape,
    from_canonical,
    read_header,
    read_mrc,
    swap_zyx_columns,
    thin_axis,
    to_canonical,
    write_mrc,
)

SHAPE = (12, 20, 24)


def _mrcfile_new(path, data, voxel_size=10.0):
    """A file written by mrcfile itself (not by our writer)."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        if voxel_size is not None:
            mrc.voxel_size = voxel_size
    return path


def _valid(path) -> bool:
    out = io.StringIO()
    return mrcfile.validate(str(path), print_file=out)


def _patch_header_int32(path, offset, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<i", value))


@pytest.mark.parametrize(
    "dtype,mode",
    [("int8", 0), ("int16", 1), ("float32", 2), ("uint16", 6), ("float16", 12)],
)
def test_round_trip_every_mode(tmp_path, dtype, mode):
    rng = np.random.default_rng(1)
    data = (rng.random(SHAPE) * 100 - (0 if dtype.startswith("u") else 50)).astype(dtype)
    path = write_mrc(tmp_path / "t.mrc", data, 13.25, origin_xyz_a=(10.5, -20.0, 300.25))
    assert _valid(path)
    with mrcfile.open(path, permissive=False) as mrc:
        assert int(mrc.header.mode) == mode
    vol = read_mrc(path)
    assert vol.data.dtype == np.dtype(dtype)
    assert vol.data.shape == SHAPE
    np.testing.assert_array_equal(vol.data, data)
    assert vol.voxel_size_a == pytest.approx(13.25)
    assert vol.origin_xyz_a == (10.5, -20.0, 300.25)
    assert vol.header.mode == mode
    assert not vol.data.flags.writeable  # memory-mapped read-only


def test_header_statistics_are_exact(tmp_path):
    data = np.random.default_rng(2).normal(3.0, 2.0, SHAPE).astype(np.float32)
    write_mrc(tmp_path / "s.mrc", data, 5.0)
    with mrcfile.open(tmp_path / "s.mrc") as mrc:
        h = mrc.header
        assert float(h.dmin) == pytest.approx(float(data.min()))
        assert float(h.dmax) == pytest.approx(float(data.max()))
        assert float(h.dmean) == pytest.approx(float(data.mean(dtype=np.float64)), rel=1e-6)
        assert float(h.rms) == pytest.approx(float(data.std(dtype=np.float64)), rel=1e-5)


def test_reads_files_written_by_mrcfile_and_big_endian(tmp_path):
    data = np.arange(np.prod(SHAPE), dtype=">i2").reshape(SHAPE)
    vol = read_mrc(_mrcfile_new(tmp_path / "be.mrc", data, 7.5))
    np.testing.assert_array_equal(vol.data, data)
    assert vol.voxel_size_a == pytest.approx(7.5)


def test_write_labels_int8_mode0_and_rejects_other_dtypes(tmp_path):
    labels = np.zeros(SHAPE, np.int8)
    labels[3:6, 4:9, 5:7] = 3
    write_mrc(tmp_path / "l.mrc", labels, 10.0)
    with mrcfile.open(tmp_path / "l.mrc") as mrc:
        assert int(mrc.header.mode) == 0
        np.testing.assert_array_equal(mrc.data, labels)
    write_mrc(tmp_path / "b.mrc", labels > 0, 10.0)  # bool -> int8 0/1
    assert read_mrc(tmp_path / "b.mrc").data.max() == 1
    with pytest.raises(ValueError, match="cannot write int64 as MRC"):
        write_mrc(tmp_path / "u.mrc", labels.astype(np.int64), 10.0)
    with pytest.raises(ValueError, match="needs a 3-D"):
        write_mrc(tmp_path / "2d.mrc", labels[0], 10.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.mrc", "l.mrc"]  # no temp files


def test_unsigned_bytes_are_mode_0_with_imods_unsigned_stamp_and_read_back_unsigned(tmp_path):
    values = (np.arange(np.prod(SHAPE)) % 256).astype(np.uint8).reshape(SHAPE)
    write_mrc(tmp_path / "p.mrc", values, 10.0)
    raw = (tmp_path / "p.mrc").read_bytes()[:1024]
    stamp, flags = np.frombuffer(raw[152:160], "<i4")
    assert (int(stamp), int(flags) & 1) == (1146047817, 0)  # IMOD: unsigned mode 0
    with mrcfile.open(tmp_path / "p.mrc") as mrc:
        assert int(mrc.header.mode) == 0
        assert (float(mrc.header.dmin), float(mrc.header.dmax)) == (0.0, 255.0)
    back = read_mrc(tmp_path / "p.mrc")
    assert back.data.dtype == np.uint8 and not back.header.notes
    np.testing.assert_array_equal(back.data, values)


def test_write_is_atomic_replace(tmp_path):
    path = tmp_path / "x.mrc"
    write_mrc(path, np.zeros(SHAPE, np.float32), 10.0)
    write_mrc(path, np.ones(SHAPE, np.float32), 11.0)
    vol = read_mrc(path)
    assert vol.data.min() == 1.0 and vol.voxel_size_a == pytest.approx(11.0)
    assert [p.name for p in tmp_path.iterdir()] == ["x.mrc"]


def test_read_header_is_cheap_and_knows_the_size(tmp_path):
    path = tmp_path / "h.mrc"
    write_mrc(path, np.zeros(SHAPE, np.int16), 8.0, (1.0, 2.0, 3.0))
    hdr = read_header(path)
    assert hdr.shape_zyx == SHAPE
    assert hdr.mode == 1
    assert hdr.dtype == np.dtype("int16")
    assert hdr.voxel_size_a == pytest.approx(8.0)
    assert hdr.origin_xyz_a == (1.0, 2.0, 3.0)
    assert hdr.data_offset_bytes == 1024
    assert hdr.expected_size_bytes == path.stat().st_size == 1024 + 2 * np.prod(SHAPE)


def test_extended_header_is_skipped(tmp_path):
    path = tmp_path / "ext.mrc"
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.set_extended_header(np.zeros(100, dtype="V8"))
        mrc.voxel_size = 4.0
    hdr = read_header(path)
    assert hdr.data_offset_bytes == 1024 + 800
    np.testing.assert_array_equal(read_mrc(path).data, data)


def test_imod_unsigned_bytes(tmp_path):
    path = _mrcfile_new(tmp_path / "u8.mrc", np.full(SHAPE, -56, np.int8))
    _patch_header_int32(path, 152, 1146047817)  # IMOD stamp, flags 0: bytes are unsigned
    _patch_header_int32(path, 156, 0)
    vol = read_mrc(path)
    assert vol.data.dtype == np.uint8 and int(vol.data[0, 0, 0]) == 200
    _patch_header_int32(path, 156, 1)  # "signed" flag
    assert int(read_mrc(path).data[0, 0, 0]) == -56


def test_unsigned_bytes_without_imod_stamp_follow_the_header_range(tmp_path):
    path = _mrcfile_new(tmp_path / "u8.mrc", np.full(SHAPE, -56, np.int8))
    header = bytearray(path.read_bytes()[:1024])
    struct.pack_into("<ff", header, 76, 0.0, 200.0)  # dmin, dmax: beyond int8
    path.write_bytes(bytes(header) + path.read_bytes()[1024:])
    hdr = read_header(path)
    assert hdr.dtype == np.uint8 and int(read_mrc(path).data[0, 0, 0]) == 200
    assert hdr.notes == (f"{path}: mode 0 without IMOD's stamp read as unsigned bytes, as its "
                         "header range 0..200 says",)
    signed = _mrcfile_new(tmp_path / "s8.mrc", np.full(SHAPE, -56, np.int8))
    assert read_header(signed).dtype == np.int8 and read_header(signed).notes == ()


def test_a_missing_map_stamp_is_read_and_noted(tmp_path):
    path = write_mrc(tmp_path / "old.mrc", np.zeros(SHAPE, np.float32), 10.0)
    blob = bytearray(path.read_bytes())
    blob[208:212] = b"\0\0\0\0"
    path.write_bytes(bytes(blob))
    assert read_header(path).notes == (f"{path}: no 'MAP ' stamp at byte 208 (not MRC2014); "
                                       "read as MRC because its dimensions and mode are "
                                       "plausible",)
    assert read_mrc(path).data.shape == SHAPE


# ---- bad inputs: each a one-line VolumeError starting with the path ----


def _assert_error(path, text, **kw):
    with pytest.raises(VolumeError) as err:
        read_mrc(path, **kw)
    msg = str(err.value)
    assert msg.startswith(f"{path}: "), msg
    assert "\n" not in msg
    assert text in msg, msg
    return msg


def test_text_file_is_not_an_mrc(tmp_path):
    path = tmp_path / "notes.mrc"
    path.write_text("these are my notes about the session, not a tomogram\n" * 40)
    _assert_error(path, "not an MRC file")
    with pytest.raises(VolumeError, match="not an MRC file"):
        read_header(path)


def test_short_file_is_not_an_mrc(tmp_path):
    path = tmp_path / "short.mrc"
    path.write_bytes(b"\0" * 100)
    _assert_error(path, "not an MRC file (100 bytes, shorter than the 1024-byte header)")


def test_truncated_file(tmp_path):
    path = write_mrc(tmp_path / "t.mrc", np.zeros(SHAPE, np.float32), 10.0)
    full = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(full - 1000)
    _assert_error(
        path,
        f"file is {full - 1000} bytes but its header implies {full} bytes "
        "(truncated or still being written)",
    )


def test_file_with_extra_bytes(tmp_path):
    path = write_mrc(tmp_path / "t.mrc", np.zeros(SHAPE, np.int8), 10.0)
    with open(path, "ab") as f:
        f.write(b"\0" * 10)
    _assert_error(path, "(extra data after the volume)")


@pytest.mark.parametrize("shape", [(1, 64, 64), (16, 1, 64)])
def test_2d_image(tmp_path, shape):
    path = _mrcfile_new(tmp_path / "img.mrc", np.zeros(shape, np.float32))
    _assert_error(path, "is a 2-D image")


def test_tiny_dimension(tmp_path):
    path = _mrcfile_new(tmp_path / "tiny.mrc", np.zeros((4, 64, 64), np.float32))
    _assert_error(path, "too small to segment: 64 x 64 x 4 (x, y, z); z has fewer than 8")


def test_huge_dimension_in_header(tmp_path):
    path = _mrcfile_new(tmp_path / "huge.mrc", np.zeros(SHAPE, np.float32))
    _patch_header_int32(path, 0, 20000)  # nx
    _assert_error(path, "implausibly large dimensions 20000 x 20 x 12")


def test_unsupported_mode(tmp_path):
    path = _mrcfile_new(tmp_path / "c.mrc", np.zeros(SHAPE, np.complex64))
    _assert_error(path, "unsupported MRC mode 4")


@pytest.mark.parametrize("dtype,bad", [("float32", np.nan), ("float16", np.inf)])
def test_nonfinite_voxels(tmp_path, dtype, bad):
    data = np.zeros(SHAPE, dtype)
    data[7, 3, 4] = bad
    data[9, 0, 0] = bad
    path = write_mrc(tmp_path / "n.mrc", data, 10.0)
    _assert_error(path, "NaN or Inf voxels (first in z slice 7)")
    assert read_mrc(path, check_finite=False).data.shape == SHAPE


@pytest.mark.parametrize("voxel", [0.0, 1.0])
def test_unset_voxel_size_and_override(tmp_path, voxel):
    path = write_mrc(tmp_path / "v.mrc", np.zeros(SHAPE, np.int16), voxel)
    _assert_error(
        path, f"voxel size {voxel:g} Å in the header looks unset; pass a voxel size override"
    )
    vol = read_mrc(path, voxel_size_a=13.2)
    assert vol.voxel_size_a == 13.2


def test_nan_voxel_size_and_bad_override(tmp_path):
    path = _mrcfile_new(tmp_path / "v.mrc", np.zeros(SHAPE, np.int16))
    with mrcfile.open(path, "r+") as mrc:
        mrc.header.cella.x = np.nan
    _assert_error(path, "voxel size nan Å in the header looks unset")
    _assert_error(path, "voxel size override -3 Å must be positive", voxel_size_a=-3)


def test_permuted_axis_order(tmp_path):
    path = _mrcfile_new(tmp_path / "p.mrc", np.zeros(SHAPE, np.float32))
    _patch_header_int32(path, 64, 2)  # mapc
    _patch_header_int32(path, 68, 1)  # mapr
    _assert_error(path, "unsupported axis order (mapc, mapr, maps) = (2, 1, 3); expected (1, 2, 3)")


def test_missing_file(tmp_path):
    path = tmp_path / "absent.mrc"
    _assert_error(path, "cannot read")


# ---- thin axis and canonical views ----


def test_thin_axis():
    assert thin_axis((64, 256, 256)) == 0
    assert thin_axis((256, 64, 256)) == 1  # IMOD tilt output without rotation
    assert thin_axis((64, 64, 64)) == 0  # ties -> 0
    assert thin_axis((64, 32, 32)) == 1  # ties between 1 and 2 -> the first


def test_canonical_views_and_coordinates():
    rng = np.random.default_rng(3)
    data = rng.random((40, 16, 32)).astype(np.float32)  # Y thin
    ax = thin_axis(data.shape)
    canon = to_canonical(data, ax)
    assert canon.shape == canonical_shape(data.shape, ax) == (16, 40, 32)
    assert np.shares_memory(canon, data)  # a view, not a copy
    back = from_canonical(canon, ax)
    assert back.shape == data.shape and np.shares_memory(back, data)
    np.testing.assert_array_equal(back, data)
    pts_file = np.array([[3, 5, 7], [39, 15, 31], [0, 0, 0]])
    pts_canon = swap_zyx_columns(pts_file, ax)
    np.testing.assert_array_equal(pts_canon, [[5, 3, 7], [15, 39, 31], [0, 0, 0]])
    for pf, pc in zip(pts_file, pts_canon.astype(int), strict=True):
        assert canon[tuple(pc)] == data[tuple(pf)]
    np.testing.assert_array_equal(swap_zyx_columns(pts_canon, ax), pts_file)
    assert to_canonical(data, 0) is data
