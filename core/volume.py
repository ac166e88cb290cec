"""Tomograms as arrays: MRC reading (memory-mapped, validated before use) and atomic writing.

Arrays are [z, y, x] in the FILE's axis order. Tomograms whose beam axis is Y (IMOD `tilt`
output without rotation) are detected with `thin_axis` and viewed beam-axis-first with
`to_canonical`; `from_canonical` (the same swap) takes results back to the file's order.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
from mrcfile.dtypes import HEADER_DTYPE

from .atomic import atomic_path

HEADER_BYTES = 1024
MIN_DIM = 8
MAX_DIM = 16384
MAX_VOXELS = 2**34
# Bytes per voxel of every MRC mode (101 is 4-bit, handled apart); the supported ones map to dtypes.
_MODE_BYTES = {0: 1, 1: 2, 2: 4, 3: 4, 4: 8, 6: 2, 12: 2, 16: 3, 101: 0}
_MODE_DTYPE = {0: "i1", 1: "i2", 2: "f4", 6: "u2", 12: "f2"}
# uint8 is written as mode 0 with IMOD's stamp and its "signed" flag clear: how IMOD (and
# read_mrc) know the bytes are unsigned; MRC2014 alone would say signed.
_DTYPE_MODE = {"int8": 0, "uint8": 0, "int16": 1, "float32": 2, "uint16": 6, "float16": 12}
_FLOAT_MODES = (2, 12)
_IMOD_STAMP = 1146047817  # IMOD's header stamp; without its "signed" flag, mode 0 is uint8
_SLAB_BYTES = 64 * 2**20  # bounded working memory when scanning or writing slab by slab
# Plausible voxel sizes (Å): below, a header in nm or m (0.013 Å gave a 1x1x1 model grid and a
# confident empty result); above, upsampling to the model grid tries to allocate terabytes.
DEFAULT_VOXEL_SIZE_BOUNDS_A = (1.5, 50.0)
# The largest model grid a tomogram may need (core.resample.grid_for). The pipeline holds a
# float32 copy of it plus a few bytes per voxel of labels and probabilities: 2**32 voxels is
# 16 GiB as float32, far above a real tomogram at a model's voxel size, far below what a lying
# header asks for (1000 Å tried to allocate 1.91 TiB).
DEFAULT_MAX_MODEL_VOXELS = 2**32


class VolumeError(ValueError):
    """A tomogram file that cannot be used; the message is one line starting with the path."""


@dataclass(frozen=True)
class MrcHeader:
    """What the 1024-byte MRC header says (cheap to read; used for completeness checks)."""

    shape_zyx: tuple[int, int, int]
    mode: int
    dtype: np.dtype | None  # None for modes tomolive does not read (complex, RGB, 4-bit)
    voxel_size_a: float  # X spacing (cella.x / mx); 0 when mx is 0
    origin_xyz_a: tuple[float, float, float]
    data_offset_bytes: int
    expected_size_bytes: int
    axis_map_crs: tuple[int, int, int] = (1, 2, 3)  # mapc, mapr, maps: which axis is x, y, z
    # What was read by a guess rather than by the standard (a missing 'MAP ' stamp, unsigned
    # mode-0 bytes without IMOD's stamp): reported in the summary's warnings.
    notes: tuple[str, ...] = ()


@dataclass
class Volume:
    """A tomogram: data [z, y, x] in the file's axis order (possibly a read-only memmap)."""

    data: np.ndarray
    voxel_size_a: float
    origin_xyz_a: tuple[float, float, float] = (0.0, 0.0, 0.0)
    path: Path | None = None
    header: MrcHeader | None = None  # set by read_mrc (mode, offsets); None for arrays in memory

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape)  # type: ignore[return-value]


def _plausible(h: np.void) -> bool:
    dims = (int(h["nx"]), int(h["ny"]), int(h["nz"]))
    return all(0 < n < 2**24 for n in dims) and int(h["mode"]) in _MODE_BYTES


def read_header(path: str | os.PathLike) -> MrcHeader:
    """Read the MRC header (1024 bytes; the extended header is only skipped, never read)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise VolumeError(f"{path}: cannot read ({e.strerror or e})") from e
    if len(raw) < HEADER_BYTES:
        raise VolumeError(
            f"{path}: not an MRC file ({len(raw)} bytes, shorter than the 1024-byte header)"
        )
    little = np.frombuffer(raw, HEADER_DTYPE.newbyteorder("<"), count=1)[0]
    big = np.frombuffer(raw, HEADER_DTYPE.newbyteorder(">"), count=1)[0]
    # The machine stamp says the byte order; old writers leave it zero, so fall back to sanity.
    stamp = int(little["machst"][0])
    candidates = (big, little) if stamp == 0x11 else (little, big)
    h = next((c for c in candidates if _plausible(c)), None)
    if h is None:
        is_map = bytes(little["map"]) == b"MAP "
        why = "dimensions or mode are garbage" if is_map else "no 'MAP ' stamp, garbage dimensions"
        raise VolumeError(f"{path}: not an MRC file ({why})")
    nx, ny, nz, mode = int(h["nx"]), int(h["ny"]), int(h["nz"]), int(h["mode"])
    nsymbt = int(h["nsymbt"])
    if nsymbt < 0:
        raise VolumeError(f"{path}: not an MRC file (negative extended header size {nsymbt})")
    notes = []
    if bytes(h["map"]) != b"MAP ":
        notes.append(f"{path}: no 'MAP ' stamp at byte 208 (not MRC2014); read as MRC because "
                     "its dimensions and mode are plausible")
    dtype = None
    if mode in _MODE_DTYPE:
        dtype = np.dtype(_MODE_DTYPE[mode]).newbyteorder(h.dtype["nx"].byteorder)
        if mode == 0 and _imod_unsigned(raw, h.dtype["nx"].byteorder):
            dtype = np.dtype("u1")
        elif mode == 0 and float(h["dmin"]) >= 0.0 and 127.0 < float(h["dmax"]) <= 255.0:
            # MRC2014 says mode 0 is signed; old IMOD and other writers store unsigned bytes
            # without IMOD's stamp. A header range beyond int8's settles it.
            dtype = np.dtype("u1")
            notes.append(f"{path}: mode 0 without IMOD's stamp read as unsigned bytes, as its "
                         f"header range {float(h['dmin']):g}..{float(h['dmax']):g} says")
    offset = HEADER_BYTES + nsymbt
    if mode == 101:  # 4-bit: each row padded to whole bytes
        data_bytes = (nx + 1) // 2 * ny * nz
    else:
        data_bytes = nx * ny * nz * _MODE_BYTES[mode]
    mx = int(h["mx"])
    voxel = float(h["cella"]["x"]) / mx if mx > 0 else 0.0
    origin = tuple(float(h["origin"][a]) for a in "xyz")
    return MrcHeader(
        shape_zyx=(nz, ny, nx),
        mode=mode,
        dtype=dtype,
        voxel_size_a=voxel,
        origin_xyz_a=origin,  # type: ignore[arg-type]
        data_offset_bytes=offset,
        expected_size_bytes=offset + data_bytes,
        axis_map_crs=(int(h["mapc"]), int(h["mapr"]), int(h["maps"])),
        notes=tuple(notes),
    )


def _imod_unsigned(raw: bytes, byteorder: str) -> bool:
    """IMOD writes unsigned bytes in mode 0 unless bit 0 of imodFlags says they are signed."""
    order = "<" if byteorder in ("<", "=", "|") else ">"
    stamp, flags = np.frombuffer(raw[152:160], dtype=f"{order}i4")
    return int(stamp) == _IMOD_STAMP and not int(flags) & 1


def _check_dims(path: Path, shape_zyx: tuple[int, int, int]) -> None:
    nz, ny, nx = shape_zyx
    dims = f"{nx} x {ny} x {nz} (x, y, z)"
    if nz == 1 or min(shape_zyx) == 1:
        raise VolumeError(f"{path}: is a 2-D image ({dims}), not a tomogram")
    if min(shape_zyx) < MIN_DIM:
        thin = "z" if nz < MIN_DIM else "x or y"
        raise VolumeError(f"{path}: too small to segment: {dims}; {thin} has fewer than "
                          f"{MIN_DIM} voxels (a stack of a few slices, not a tomogram?)")
    if max(shape_zyx) > MAX_DIM or nx * ny * nz > MAX_VOXELS:
        raise VolumeError(
            f"{path}: implausibly large dimensions {dims} (each at most {MAX_DIM}, "
            f"at most 2**34 voxels; a damaged header?)"
        )


def _voxels_per_slab(shape_zyx: tuple[int, ...], itemsize: int) -> int:
    plane = int(np.prod(shape_zyx[1:])) * itemsize
    return max(1, _SLAB_BYTES // max(plane, 1))


def _first_nonfinite_slice(data: np.ndarray) -> int | None:
    step = _voxels_per_slab(data.shape, 4)
    for z0 in range(0, data.shape[0], step):
        bad = ~np.isfinite(data[z0 : z0 + step]).all(axis=(1, 2))
        if bad.any():
            return z0 + int(np.argmax(bad))
    return None


def check_voxel_size(
    voxel_size_a: float, bounds_a: tuple[float, float] = DEFAULT_VOXEL_SIZE_BOUNDS_A
) -> None:
    """Raise ValueError (one line, no path) unless `voxel_size_a` lies within `bounds_a`."""
    low_a, high_a = bounds_a
    if not (np.isfinite(voxel_size_a) and low_a <= voxel_size_a <= high_a):
        raise ValueError(
            f"{voxel_size_a:g} Å is outside the plausible range {low_a:g}..{high_a:g} Å"
        )


def resolve_voxel_size(
    path: Path, hdr: MrcHeader, override_a: float | None, bounds_a: tuple[float, float]
) -> float:
    """The voxel size to use: the override if given, else the header's; checked against
    `bounds_a` before anything is mapped or allocated."""
    if override_a is not None:
        if not (np.isfinite(override_a) and override_a > 0):
            raise VolumeError(f"{path}: voxel size override {override_a} Å must be positive")
        what = "voxel size override"
        voxel = float(override_a)
    else:
        voxel = hdr.voxel_size_a
        if not np.isfinite(voxel) or voxel <= 0 or abs(voxel - 1.0) < 1e-3:
            raise VolumeError(
                f"{path}: voxel size {voxel:g} Å in the header looks unset; "
                f"pass a voxel size override"
            )
        what = "header voxel size"
    try:
        check_voxel_size(voxel, bounds_a)
    except ValueError as error:
        hint = "" if override_a is not None else "; pass a voxel size override if it lies"
        raise VolumeError(f"{path}: {what} {error}{hint}") from None
    return voxel


def read_mrc(
    path: str | os.PathLike,
    voxel_size_a: float | None = None,
    check_finite: bool = True,
    voxel_size_bounds_a: tuple[float, float] = DEFAULT_VOXEL_SIZE_BOUNDS_A,
) -> Volume:
    """Memory-map an MRC/REC tomogram (modes 0, 1, 2, 6, 12) after validating it.

    `voxel_size_a` overrides the header (needed when the header says 0 or 1 Å). The voxel size
    used (header or override) must lie within `voxel_size_bounds_a` (Å). The NaN/Inf scan reads
    the whole file slab by slab (bounded memory); pass check_finite=False to skip.
    """
    path = Path(path)
    hdr = read_header(path)
    if hdr.dtype is None:
        raise VolumeError(
            f"{path}: unsupported MRC mode {hdr.mode} (supported: 0 int8, 1 int16, 2 float32, "
            f"6 uint16, 12 float16)"
        )
    if hdr.axis_map_crs not in ((1, 2, 3), (0, 0, 0)):  # (0, 0, 0): old writers left it unset
        raise VolumeError(
            f"{path}: unsupported axis order (mapc, mapr, maps) = {hdr.axis_map_crs}; "
            f"expected (1, 2, 3)"
        )
    _check_dims(path, hdr.shape_zyx)
    size = path.stat().st_size
    if size != hdr.expected_size_bytes:
        why = "truncated or still being written" if size < hdr.expected_size_bytes else (
            "extra data after the volume"
        )
        raise VolumeError(
            f"{path}: file is {size} bytes but its header implies "
            f"{hdr.expected_size_bytes} bytes ({why})"
        )
    voxel = resolve_voxel_size(path, hdr, voxel_size_a, voxel_size_bounds_a)
    data = np.memmap(path, dtype=hdr.dtype, mode="r", offset=hdr.data_offset_bytes,
                     shape=hdr.shape_zyx)
    if check_finite and hdr.mode in _FLOAT_MODES:
        bad = _first_nonfinite_slice(data)
        if bad is not None:
            raise VolumeError(f"{path}: NaN or Inf voxels (first in z slice {bad})")
    # A NaN origin is header garbage, not a position: treat it as unset.
    origin = tuple(o if np.isfinite(o) else 0.0 for o in hdr.origin_xyz_a)
    return Volume(data=data, voxel_size_a=voxel, origin_xyz_a=origin, path=path,  # type: ignore[arg-type]
                  header=hdr)


def _file_dtype(data: np.ndarray) -> np.dtype:
    """The dtype written for `data`: float64 -> float32, bool -> int8; anything else must map."""
    if data.dtype == np.float64:
        return np.dtype("f4")
    if data.dtype == np.bool_:
        return np.dtype("i1")
    name = data.dtype.newbyteorder("=").name
    if name not in _DTYPE_MODE:
        raise ValueError(
            f"cannot write {data.dtype} as MRC (use int8, uint8, int16, float32, float16 or "
            f"uint16; labels are int8)"
        )
    return np.dtype(name)


def write_mrc(
    path: str | os.PathLike,
    data: np.ndarray,
    voxel_size_a: float | tuple[float, float, float],
    origin_xyz_a: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Path:
    """Write a 3-D array [z, y, x] atomically (temp file in the same folder, fsync, rename).

    int8 -> mode 0, uint8 -> mode 0 marked unsigned (IMOD's stamp), int16 -> 1, float32 -> 2,
    uint16 -> 6, float16 -> 12. Copies slab by slab and computes the header statistics
    incrementally, so no whole-volume temporary is made.
    """
    path = Path(path)
    if data.ndim != 3:
        raise ValueError(f"{path}: write_mrc needs a 3-D [z, y, x] array, got shape {data.shape}")
    dtype = _file_dtype(data)
    with atomic_path(path) as tmp:
        with mrcfile.new_mmap(tmp, shape=data.shape, mrc_mode=_DTYPE_MODE[dtype.name],
                              overwrite=True) as mrc:
            if dtype.name == "uint8":
                _mark_unsigned_bytes(mrc.header)
            target = mrc.data.view(np.uint8) if dtype.name == "uint8" else mrc.data
            _copy_with_stats(data, target, mrc.header)
            mrc.voxel_size = voxel_size_a
            for axis, value in zip("xyz", origin_xyz_a, strict=True):
                mrc.header.origin[axis] = value
    return path


def _mark_unsigned_bytes(header: np.recarray) -> None:
    """IMOD's stamp and flags (header bytes 152-159, inside mrcfile's `extra2`): flags 0 says
    mode 0 holds unsigned bytes."""
    extra = bytearray(header.extra2.tobytes())
    extra[40:48] = np.array([_IMOD_STAMP, 0], dtype=header.mode.dtype.byteorder.replace(
        "=", "<").replace("|", "<") + "i4").tobytes()
    header.extra2 = bytes(extra)


def _copy_with_stats(src: np.ndarray, dst: np.ndarray, header: np.recarray) -> None:
    """Copy slab by slab; min/max/mean/rms via Chan's parallel variance (float64, per slab)."""
    n_total, mean_total, m2_total = 0, 0.0, 0.0
    lo, hi = np.inf, -np.inf
    step = _voxels_per_slab(src.shape, 8)
    for z0 in range(0, src.shape[0], step):
        dst[z0 : z0 + step] = src[z0 : z0 + step]
        slab = np.array(dst[z0 : z0 + step], dtype=np.float64)  # a copy: edited in place below
        release_pages(dst)  # written pages stay in the page cache, not in our resident set
        lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf data: stats say so
            n, mean = slab.size, float(slab.mean())
            slab -= mean  # in place: one float64 slab instead of three
            m2 = float(np.square(slab, out=slab).sum())
        del slab  # before the next slab is allocated
        delta = mean - mean_total
        total = n_total + n
        mean_total += delta * n / total
        m2_total += m2 + delta * delta * n_total * n / total
        n_total = total
    header.dmin, header.dmax = lo, hi
    header.dmean = mean_total
    # mrcfile.validate recomputes the rms in float16 for mode 12, which overflows: leave it
    # "undetermined" (negative, as MRC2014 allows) there.
    header.rms = np.sqrt(m2_total / n_total) if dst.dtype != np.float16 else -1.0


def thin_axis(shape_zyx: tuple[int, ...]) -> int:
    """Index of the smallest dimension (the beam axis): 0 normally, 1 for IMOD `tilt` output
    without rotation. Ties go to the lowest index, so a cube is 0."""
    return int(np.argmin(np.asarray(shape_zyx[:3])))


def to_canonical(data: np.ndarray, thin_axis: int) -> np.ndarray:
    """A view with the beam (thin) axis first. Self-inverse: `from_canonical` is the same swap."""
    return data if thin_axis == 0 else np.swapaxes(data, 0, thin_axis)


def from_canonical(data: np.ndarray, thin_axis: int) -> np.ndarray:
    """A view back in the file's axis order (undoes `to_canonical`)."""
    return data if thin_axis == 0 else np.swapaxes(data, 0, thin_axis)


def canonical_shape(shape_zyx: tuple[int, ...], thin_axis: int) -> tuple[int, int, int]:
    """The shape `to_canonical` gives for `shape_zyx`."""
    s = list(shape_zyx)
    s[0], s[thin_axis] = s[thin_axis], s[0]
    return tuple(s)  # type: ignore[return-value]


def swap_zyx_columns(zyx: np.ndarray, thin_axis: int) -> np.ndarray:
    """Coordinates (n, 3) in (z, y, x) columns between file and canonical order (self-inverse).

    Returns a new array; the input is not modified.
    """
    zyx = np.asarray(zyx, dtype=np.float64)
    out = zyx.copy()
    if thin_axis != 0:
        out[..., [0, thin_axis]] = zyx[..., [thin_axis, 0]]
    return out


def release_pages(data: np.ndarray) -> None:
    """Drop a memory-mapped array's pages from this process's resident set (the page cache
    keeps them; a later read faults them back in). No-op for an array that is not a map.

    Touched pages of a mapped input count towards the process's peak memory: all of them for a
    300x1024x1024 float32 tomogram is 1.26 GB.
    """
    base = data
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        base.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):  # advice only: a closed map or an unsupported platform
        pass
