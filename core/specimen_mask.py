"""Where the specimen is (issue 21, item 1): the slab between the lamella's (or ice layer's) top
and bottom surfaces, found from the tomogram itself, so that what the network calls outside it
(in vacuum, surface ice, carbon) can be dropped and the slab's thickness and tilt reported.

Method, on the model grid before preprocessing (pure functions on arrays):

1. Bin to about `BIN_NM` by block means (a 1/8 copy at 1 nm voxels: nothing full-size).
2. Band-pass with a difference of Gaussians (`BAND_NM`): macromolecules, membranes and their
   CTF fringes have structure at 3-10 nm; vacuum has only noise, and plain ice little. The
   slab's own mean density does not help: a flat slab's contrast lies in the missing wedge.
3. Square, average over in-plane tiles of about `TILE_NM` and smooth along z: one energy
   profile per tile. Measured on the microscope simulator, the energy inside a slab is 2.4-5
   times that of the void beside it (vacuum or ice).
4. Two thresholds between the volume's floor (a low percentile) and its typical level: per
   tile, the surface is where the profile crosses the outer one (near the void) on its way
   from the volume's edge to the inner one (near the specimen's level). Hysteresis, because
   the void's noise and faint clutter cross the outer threshold alone; and the outermost
   such entry from each side, so dips inside the specimen (a large vesicle's lumen) never
   cut it. A tile already above the outer threshold at the volume's edge is censored: the
   specimen runs on past the reconstruction there.
5. A robust plane per surface: least median of squares over triplets of tiles, then least
   squares over the tiles near it: gold beads and contamination on the surfaces lift single
   tiles (or a third of them), never the plane. Two planes allow a tilted and a wedge-shaped
   lamella; over one field of view (1-2 um) a milled lamella bends by a few nm at most, so a
   plane is the smooth height map here.

A surface with too few uncensored tiles is reported as not found and placed at the volume's
edge; a volume whose energy does not drop anywhere (contrast below `MIN_CONTRAST`, the usual
case for a reconstruction cropped to the specimen) is all specimen.

Surfaces are kept in nm of the canonical [z, y, x] frame (a voxel's index times its size), so
the slab rasterises on any grid of the same field (model or input) and survives in the summary
for `tomolive repick`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

BIN_NM = 2.0  # binning before filtering: the band below keeps nothing finer than ~3 nm
BAND_NM = (1.5, 4.0)  # difference-of-Gaussians sigmas
TILE_NM = 32.0  # in-plane tile: enough voxels for a steady energy, fine enough for a tilt
MIN_TILES_PER_AXIS = 6  # a robust plane needs tiles to spare: 4x4 misfit small fields
Z_SMOOTH_NM = 2.0
FLOOR_PERCENTILE = 2.0  # of a tile's profile: the void's level, when it has a void
LEVEL_PERCENTILE = 90.0  # of a tile's profile, its specimen level: a slab fills > 1/10 of z
# Below this ratio of typical level to floor there is no void to find: measured on the
# simulator, a void sits 2.4-5x below the slab; the validation tomograms (specimen to the
# edges but for 3-4 slices) read about 2.8.
MIN_CONTRAST = 1.8
# The outer threshold lies this far from the void's level towards the specimen's (in log
# energy): a third of the way put the surfaces 2.4 nm from the truth on average over seven
# simulated slabs (vacuum and ice, 40-100 nm, tilted up to 11 deg), the midpoint 2.8 nm;
# nearer the void errs towards keeping specimen.
LEVEL_WEIGHT = 0.33
# The inner threshold, which an outer crossing must lead on to (_crossings). On 32 simulated
# lamellae (bench/specimen_mask.py's draw, seeds 0-31) the mean surface error was 2.85 nm
# without it (inner = outer), 2.81 nm at 0.5, 2.46 nm at 0.66 and 2.45 nm at 0.8.
CORE_WEIGHT = 0.66
MIN_FOUND_TILES = 0.25  # share of tiles that must cross for a surface to count as found
LMEDS_ALL_TILES = 40  # tiles up to which every triplet is tried (9,880 of them)
LMEDS_SAMPLES = 4000  # triplets drawn otherwise
REJECT_MAD = 3.0  # outlier tiles: residual beyond this many robust sigmas
MIN_REJECT_NM = 2.0
EDGE_ARTEFACT_NM = 4.0
# Thicker than this is a poor specimen (shown flagged; monitoring/alerts.yml's
# TomoliveThickLamellae uses the same figure): FIB lamellae are milled to about 100-250 nm,
# and the inelastic mean free path at 300 kV is about 320 nm in vitreous ice (Rice et al.
# 2018, J Struct Biol 204:38), so past it most electrons have lost energy.
THICK_SPECIMEN_NM = 300.0
MIN_DEPTH_NM = 24.0  # thinner volumes (test shapes, slabs cut to the specimen): all specimen


@dataclass(frozen=True)
class Surface:
    """z_nm = z0_nm + dz_dy * y_nm + dz_dx * x_nm; `found` False: the volume's edge stands
    in for a surface the data did not show."""

    z0_nm: float
    dz_dy: float
    dz_dx: float
    found: bool

    def height_nm(self, y_nm: np.ndarray, x_nm: np.ndarray) -> np.ndarray:
        return self.z0_nm + self.dz_dy * np.asarray(y_nm) + self.dz_dx * np.asarray(x_nm)

    def tilt_deg(self) -> float:
        return math.degrees(math.atan(math.hypot(self.dz_dy, self.dz_dx)))

    def to_json(self) -> dict[str, Any]:
        return {"z0_nm": self.z0_nm, "dz_dy": self.dz_dy, "dz_dx": self.dz_dx,
                "found": self.found}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Surface:
        return cls(float(record["z0_nm"]), float(record["dz_dy"]), float(record["dz_dx"]),
                   bool(record["found"]))


@dataclass(frozen=True)
class SpecimenSlab:
    """The specimen between `lower` and `upper` over a field of `extent_nm_zyx` (canonical
    frame, nm); `contrast`: the energy ratio the detection saw (NaN when not measured)."""

    lower: Surface
    upper: Surface
    extent_nm_zyx: tuple[float, float, float]
    contrast: float

    @classmethod
    def whole(cls, extent_nm_zyx: tuple[float, float, float], contrast: float = math.nan
              ) -> SpecimenSlab:
        """All specimen: both surfaces at the volume's edges, not found."""
        return cls(Surface(-1.0, 0.0, 0.0, False),
                   Surface(float(extent_nm_zyx[0]) + 1.0, 0.0, 0.0, False),
                   tuple(float(v) for v in extent_nm_zyx), contrast)  # type: ignore[arg-type]

    @property
    def found(self) -> bool:
        return self.lower.found or self.upper.found

    def heights_nm(self, samples: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """Both surfaces' heights on a samples x samples grid over the field."""
        y = np.linspace(0.0, self.extent_nm_zyx[1], samples)
        x = np.linspace(0.0, self.extent_nm_zyx[2], samples)
        yy, xx = np.meshgrid(y, x, indexing="ij")
        return self.lower.height_nm(yy, xx), self.upper.height_nm(yy, xx)

    def tilt_deg(self) -> float:
        """The mid-plane's angle to the plane perpendicular to the beam."""
        return math.degrees(math.atan(math.hypot(
            (self.lower.dz_dy + self.upper.dz_dy) / 2, (self.lower.dz_dx + self.upper.dz_dx) / 2)))

    def thickness_nm(self) -> dict[str, float]:
        """Perpendicular thickness over the field, inside the volume (a surface not found
        counts at the volume's edge, so the figures are then lower bounds)."""
        lower, upper = self.heights_nm()
        depth = self.extent_nm_zyx[0]
        vertical = np.clip(upper, 0.0, depth) - np.clip(lower, 0.0, depth)
        perpendicular = np.maximum(vertical, 0.0) * math.cos(math.radians(self.tilt_deg()))
        return {"mean": float(perpendicular.mean()), "min": float(perpendicular.min()),
                "max": float(perpendicular.max())}

    def void_fraction(self) -> float:
        lower, upper = self.heights_nm(64)
        depth = self.extent_nm_zyx[0]
        inside = np.clip(upper, 0.0, depth) - np.clip(lower, 0.0, depth)
        return float(1.0 - np.clip(inside, 0.0, None).mean() / depth)

    def voxel_size_nm(self, shape_zyx: tuple[int, ...]) -> np.ndarray:
        """The voxel size (z, y, x nm) of a grid of `shape_zyx` over this field: the model
        grid and the input grid cover the same field."""
        return np.asarray(self.extent_nm_zyx) / np.asarray(shape_zyx[:3], dtype=np.float64)

    def depth_nm(self, zyx_vox: np.ndarray, shape_zyx: tuple[int, ...]) -> np.ndarray:
        """Per point (n, 3; voxels of a grid of `shape_zyx`): the perpendicular distance (nm)
        to the nearer found surface, positive inside the slab and negative outside; NaN when
        no surface was found."""
        p = np.asarray(zyx_vox, dtype=np.float64).reshape(-1, 3) * self.voxel_size_nm(shape_zyx)
        distances = [sign * (p[:, 0] - surface.height_nm(p[:, 1], p[:, 2]))
                     * math.cos(math.radians(surface.tilt_deg()))
                     for surface, sign in ((self.lower, 1.0), (self.upper, -1.0))
                     if surface.found]
        if not distances:
            return np.full(len(p), math.nan)
        # Inside, both are positive and the nearer counts; outside, the negative one.
        return np.min(distances, axis=0)

    def contains(self, zyx_vox: np.ndarray, shape_zyx: tuple[int, ...]) -> np.ndarray:
        """Per point (n, 3; voxels of a grid of `shape_zyx`): inside the slab (a surface not
        found never excludes: its depth is NaN, which is not below 0)."""
        return ~(self.depth_nm(zyx_vox, shape_zyx) < 0)

    def mask(self, shape_zyx: tuple[int, ...]) -> np.ndarray:
        """int8 [z, y, x] on a grid of `shape_zyx` over this field: 1 inside the slab.
        Built from two 2-D height maps, one slice at a time."""
        lower, upper = _height_maps(self, shape_zyx)
        z_nm = np.arange(int(shape_zyx[0])) * self.voxel_size_nm(shape_zyx)[0]
        out = np.empty((len(z_nm), *lower.shape), dtype=np.int8)
        for z, height in enumerate(z_nm):
            np.logical_and(lower <= height, height <= upper, out=out[z].view(bool))
        return out

    def summary(self) -> dict[str, Any]:
        """The figures a facility reads, and the surfaces (for `from_json`)."""
        return {"found": self.found, "thickness_nm": self.thickness_nm(),
                "thickness_is_lower_bound": not (self.lower.found and self.upper.found),
                "tilt_deg": self.tilt_deg(), "void_fraction": self.void_fraction(),
                "contrast": self.contrast, **self.to_json()}

    def to_json(self) -> dict[str, Any]:
        return {"lower": self.lower.to_json(), "upper": self.upper.to_json(),
                "extent_nm_zyx": list(self.extent_nm_zyx), "contrast": self.contrast}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> SpecimenSlab:
        contrast = record.get("contrast")
        return cls(Surface.from_json(record["lower"]), Surface.from_json(record["upper"]),
                   tuple(float(v) for v in record["extent_nm_zyx"]),  # type: ignore[arg-type]
                   math.nan if contrast is None else float(contrast))


def measured_thickness_nm(record: Any) -> float | None:
    """The mean thickness from a summary's "specimen" record (SpecimenSlab.summary), or None
    when it is not a measurement: no record (older results), a surface not found (the figure
    is then a lower bound) or a value that is not a finite number (summaries are files anyone
    can write)."""
    if not isinstance(record, dict) or record.get("thickness_is_lower_bound") is not False:
        return None
    thickness = record.get("thickness_nm")
    mean = thickness.get("mean") if isinstance(thickness, dict) else None
    try:
        value = float(mean)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def find_specimen(data: np.ndarray, voxel_size_nm_zyx: tuple[float, float, float]
                  ) -> SpecimenSlab:
    """The specimen slab of a canonical [z, y, x] tomogram (any real dtype)."""
    vs = np.asarray(voxel_size_nm_zyx, dtype=np.float64)
    extent = tuple(float(n * v) for n, v in zip(data.shape, vs, strict=True))
    if extent[0] < MIN_DEPTH_NM:
        return SpecimenSlab.whole(extent)  # type: ignore[arg-type]
    coarse, coarse_vs = _binned(data, vs)
    energy, tile_centres_nm = _tile_energy(coarse, coarse_vs)
    # Each tile against its own specimen level: tiles differ in content (a vesicle, carbon, a
    # bundle) by more than a void differs from the specimen beside it.
    level = np.percentile(energy, LEVEL_PERCENTILE, axis=1, keepdims=True)
    energy = energy / np.maximum(level, np.finfo(np.float64).tiny)
    # The void's level: the typical tile's lowest. Not the lowest of all tiles: one holding a
    # gold bead (tens of times the specimen's energy) has everything else far below it.
    floor = float(np.median(np.percentile(energy, FLOOR_PERCENTILE, axis=1)))
    contrast = 1.0 / floor if floor > 0 else math.inf
    if not contrast >= MIN_CONTRAST:
        return SpecimenSlab.whole(extent, contrast)  # type: ignore[arg-type]
    outer, inner = floor ** (1.0 - LEVEL_WEIGHT), floor ** (1.0 - CORE_WEIGHT)
    # Reconstructions carry edge artefacts in their outermost slices (raised energy in both
    # simulated and independently simulated tomograms): the profiles start inside them.
    trim = int(math.ceil(EDGE_ARTEFACT_NM / coarse_vs[0]))
    energy = energy[:, trim:energy.shape[1] - trim]
    low_z, high_z = _crossings(energy, outer, inner)
    low_z, high_z = low_z + trim, high_z + trim
    z_nm = lambda index: index * coarse_vs[0] + (coarse_vs[0] - vs[0]) / 2  # noqa: E731
    lower = _fit_surface(tile_centres_nm, z_nm(low_z), edge_nm=-1.0)
    upper = _fit_surface(tile_centres_nm, z_nm(high_z), edge_nm=extent[0] + 1.0)
    return SpecimenSlab(lower, upper, extent, contrast)  # type: ignore[arg-type]


def _binned(data: np.ndarray, vs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block means of about BIN_NM (float32), slab by slab; and the binned voxel size."""
    factor = np.maximum(1, np.round(BIN_NM / vs)).astype(int)
    shape = [n // k for n, k in zip(data.shape, factor, strict=True)]
    fz, fy, fx = (int(k) for k in factor)
    out = np.empty(shape, dtype=np.float32)
    for z in range(shape[0]):
        block = np.asarray(data[z * fz:(z + 1) * fz, :shape[1] * fy, :shape[2] * fx],
                           dtype=np.float32)
        out[z] = block.reshape(fz, shape[1], fy, shape[2], fx).mean(axis=(0, 2, 4))
    return out, vs * factor


def _tile_energy(coarse: np.ndarray, coarse_vs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Band-passed energy per (tile, z): shape (tiles, nz); and each tile's centre (y, x nm)."""
    low = ndimage.gaussian_filter(coarse, BAND_NM[0] / coarse_vs, mode="nearest")
    low -= ndimage.gaussian_filter(coarse, BAND_NM[1] / coarse_vs, mode="nearest")
    np.square(low, out=low)
    rows, centres = [], []
    y_edges = _tile_edges(coarse.shape[1], coarse_vs[1])
    x_edges = _tile_edges(coarse.shape[2], coarse_vs[2])
    for y0, y1 in zip(y_edges[:-1], y_edges[1:], strict=True):
        for x0, x1 in zip(x_edges[:-1], x_edges[1:], strict=True):
            rows.append(low[:, y0:y1, x0:x1].mean(axis=(1, 2)))
            centres.append(((y0 + y1) / 2 * coarse_vs[1], (x0 + x1) / 2 * coarse_vs[2]))
    energy = ndimage.gaussian_filter1d(np.array(rows), Z_SMOOTH_NM / coarse_vs[0], axis=1,
                                       mode="nearest")
    return energy, np.array(centres)


def _tile_edges(n: int, voxel_nm: float) -> np.ndarray:
    tiles = max(MIN_TILES_PER_AXIS, int(round(n * voxel_nm / TILE_NM)))
    return np.linspace(0, n, min(tiles, n) + 1).round().astype(int)


def _crossings(energy: np.ndarray, outer: float, inner: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per tile, where the profile enters the specimen from below and leaves it above
    (fractional z, coarse voxels): the last crossing of `outer` before the profile first
    reaches `inner`, and the first after it last does, interpolated between voxels. NaN where
    the profile starts (ends) above `outer` (censored: specimen at the volume's edge), or
    never reaches `inner`. Hysteresis, because `outer` lies near the void's level, where the
    void's own noise crosses it in places: a lone excursion out there is not a surface unless
    it rises on to the specimen's level."""
    low = np.full(len(energy), math.nan)
    high = np.full(len(energy), math.nan)
    for t, row in enumerate(energy):
        core = np.flatnonzero(row >= inner)
        if not len(core):
            continue
        # inner > outer, so a profile that starts (ends) below `outer` has a voxel below it
        # before its first (after its last) voxel at `inner`.
        below = row < outer
        if below[0]:
            last_below = int(np.flatnonzero(below[:core[0]])[-1])
            low[t] = _interpolate(row, last_below, last_below + 1, outer)
        if below[-1]:
            first_below = int(np.flatnonzero(below[core[-1] + 1:])[0]) + core[-1] + 1
            high[t] = _interpolate(row, first_below - 1, first_below, outer)
    return low, high


def _interpolate(profile: np.ndarray, a: int, b: int, threshold: float) -> float:
    """Where the line between profile[a] and profile[b] meets `threshold` (in log energy:
    the profile is a smoothed step over orders of magnitude)."""
    la, lb = math.log(max(profile[a], 1e-30)), math.log(max(profile[b], 1e-30))
    if la == lb:
        return (a + b) / 2
    return a + (math.log(threshold) - la) / (lb - la) * (b - a)


def _fit_surface(centres_nm: np.ndarray, z_nm: np.ndarray, edge_nm: float) -> Surface:
    """A robust plane through the tiles' crossings; the volume's edge when too few crossed.
    (Tiles above threshold at the edge are not evidence of specimen there: streaks from gold
    and contamination reach the edge through the void in a fifth to a half of them.)"""
    usable = np.isfinite(z_nm)
    if usable.sum() < max(3, MIN_FOUND_TILES * len(z_nm)):
        return Surface(edge_nm, 0.0, 0.0, False)
    design = np.column_stack([np.ones(len(z_nm)), centres_nm[:, 0], centres_nm[:, 1]])
    coefficients, sigma = _least_median_plane(design[usable], z_nm[usable])
    keep = np.zeros_like(usable)  # so that the first pass always refits on the inliers
    for _ in range(6):
        residual = np.abs(z_nm - design @ coefficients)
        new_keep = usable & (residual <= max(REJECT_MAD * sigma, MIN_REJECT_NM))
        if new_keep.sum() < 3 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
        coefficients, *_ = np.linalg.lstsq(design[keep], z_nm[keep], rcond=None)
        sigma = 1.4826 * float(np.median(np.abs(z_nm - design @ coefficients)[keep]))
    return Surface(*(float(c) for c in coefficients), found=True)


def _least_median_plane(design: np.ndarray, z_nm: np.ndarray
                        ) -> tuple[np.ndarray, float]:
    """The plane through three of the tiles whose median absolute residual over all tiles is
    least (least median of squares, Rousseeuw 1984: it stands up to almost half the tiles being
    outliers, where least squares started from all of them is pulled off by a few tiles lifted
    50 nm by gold or contamination), and the robust sigma of its residuals. Triplets: all of
    them for a small field, else a fixed sample (deterministic): with 4,000 of them, a field
    where 40 % of tiles are outliers misses every clean triplet with odds of 0.78 ** 4000."""
    n = len(z_nm)
    if n <= LMEDS_ALL_TILES:
        triplets = np.array(list(itertools.combinations(range(n), 3)), dtype=np.intp)
    else:
        # A triplet with a repeated tile has no plane and is dropped below, like a collinear one.
        triplets = np.random.default_rng(0).integers(0, n, size=(LMEDS_SAMPLES, 3))
    a = design[triplets]  # (m, 3, 3): rows [1, y, x]
    b = z_nm[triplets]
    # Collinear (or repeated) tile centres make no plane.
    det = np.linalg.det(a)
    good = np.abs(det) > 1e-6 * np.abs(a[:, :, 1:]).max() ** 2
    if not good.any():
        coefficients, *_ = np.linalg.lstsq(design, z_nm, rcond=None)
        return coefficients, 1.4826 * float(np.median(np.abs(z_nm - design @ coefficients)))
    planes = np.linalg.solve(a[good], b[good][:, :, None])[:, :, 0]  # (m, 3)
    medians = np.median(np.abs(z_nm[None, :] - planes @ design.T), axis=1)
    best = int(np.argmin(medians))
    return planes[best], 1.4826 * float(medians[best])


def clear_outside(labels: np.ndarray, slab: SpecimenSlab, values: list[int]) -> dict[int, int]:
    """Set to 0, in place, the voxels of `labels` (canonical int8 [z, y, x]) holding one of
    `values` outside the slab, one slice at a time; returns how many per value."""
    cleared = dict.fromkeys(values, 0)
    if not slab.found or not values:
        return cleared
    lookup = np.zeros(256, dtype=bool)
    lookup[np.asarray(values) % 256] = True
    lower, upper = _height_maps(slab, labels.shape)
    voxel_z_nm = slab.voxel_size_nm(labels.shape)[0]
    for z in range(labels.shape[0]):
        z_nm = z * voxel_z_nm
        row = labels[z]
        drop = lookup[row.view(np.uint8)] & ((z_nm < lower) | (z_nm > upper))
        if drop.any():
            for value, count in zip(*np.unique(row[drop], return_counts=True), strict=True):
                cleared[int(value)] += int(count)
            row[drop] = 0
    return cleared


def _height_maps(slab: SpecimenSlab, shape_zyx: tuple[int, ...]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Both surfaces' heights (nm) at every (y, x) of a grid of `shape_zyx`; +-inf where
    not found."""
    _, vy, vx = slab.voxel_size_nm(shape_zyx)
    yy, xx = np.meshgrid(np.arange(shape_zyx[1]) * vy, np.arange(shape_zyx[2]) * vx,
                         indexing="ij")
    lower = (slab.lower.height_nm(yy, xx) if slab.lower.found
             else np.full(yy.shape, -math.inf))
    upper = (slab.upper.height_nm(yy, xx) if slab.upper.found
             else np.full(yy.shape, math.inf))
    return lower, upper
