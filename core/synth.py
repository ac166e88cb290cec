"""Synthetic cryo-electron tomograms with ground truth (labels and particle centres).

`synthesize` is the one entry point. Its default, simulator="microscope", builds a crowded
cellular specimen (`core.specimen`) and images it as a microscope does (`core.microscope`:
tilt series, CTF, dose, shot noise, weighted back-projection). simulator="cartoon" is the
earlier, much simpler scene described below, kept for the tests that rely on it.

The scene is built in physical units (nm) from a seed, independently of the voxel size, so the
same seed at 10 Å and at 13.2 Å gives the same objects at the same physical places (only the
sampling and the noise differ). It is then rendered on the voxel grid and imaged.

Scene, inside a specimen slab that fills the box's z extent less a margin:
  membrane (1)     vesicles (spherical shells) and curved/flat sheets spanning the slab; a lipid
                   bilayer: two dense leaflets 2.5 nm apart; label = the 4.5 nm thick shell
  microtubule (2)  hollow tubes, 25 nm outer / 15 nm inner diameter, long, gently curved, lying
                   roughly in XY; label = wall AND lumen (a solid tube: what tracing and
                   skeletonising need, and what an annotator paints in a slice)
  actin (3)        7 nm filaments, curved, mostly in XY (tilted <~10°); label = the filament
  ribosome (4)     ~25 nm particles: a large and a small subunit plus small protrusions, with
                   internal density texture; label = the particle body
  gold (5)         10 nm beads, 6x the protein density; label = the bead
  distractors      small 5-12 nm protein blobs, NOT labelled
Objects are kept >= 2 nm apart (placements that collide are rejected), so labels never overlap;
vesicle lumens stay empty. Each kind's minimum count is placed before the rest, so every class is
present in boxes from about 40 x 96 x 96 nm up (ribosomes and microtubules need ~40 nm of slab).

Image formation: density (ice 0.3, protein +1, gold +6) plus white noise (noise before the
filters, as in a real reconstruction where noise comes through the same tilt series), then in
one Fourier pass: a missing wedge (tilt axis y, tilt range ±`tilt_range_deg`: frequencies with
|kz| > tan(tilt)·|kx| are zeroed), a CTF-like band-pass (Gaussian high-pass removing periods
longer than ~80 nm, raised-cosine low-pass from 3 nm to 2 nm). The result is negated so that
dense matter is DARK (negative), as in real cryo-ET, and scaled to mean 0 and std 1.
Noise per voxel scales with voxel_size^-1.5 so that the physical noise power (and the SNR seen
by a model after rescaling) does not depend on the voxel size.

Coordinates: voxel index i has its centre at i * voxel_size; particle tables give (x, y, z)
float voxel indices (0-based), like the segmentation outputs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft
from scipy.spatial import cKDTree

from .atomic import atomic_path
from .classes import SYNTH_CLASS_NAMES
from .star import particle_csv_text
from .synth_result import SynthResult, fibonacci_sphere

Progress = Callable[[str, float], None]  # (stage name, fraction of that stage done in 0..1)

MEMBRANE, MICROTUBULE, ACTIN, RIBOSOME, GOLD = (SYNTH_CLASS_NAMES.index(n) + 1 for n in (
    "membrane", "microtubule", "actin", "ribosome", "gold"))

# Physical parameters (nm); densities are relative to the ice (protein = 1).
ICE_DENSITY = 0.3
GOLD_DENSITY = 6.0
BILAYER_HALF_NM = 2.25  # label half thickness (4.5 nm bilayer)
LEAFLET_OFFSET_NM = 1.25  # head-group layers at +-1.25 nm from the mid-plane
LEAFLET_SIGMA_NM = 0.7
MEMBRANE_DENSITY = 1.2  # peak density of one leaflet
MT_OUTER_NM, MT_INNER_NM = 12.5, 7.5
ACTIN_RADIUS_NM = 3.5
GOLD_RADIUS_NM = 5.0
GAP_NM = 2.0  # minimum distance between objects
CURVE_STEP_NM = 1.0  # filament centre lines are sampled every nm
HIGHPASS_PERIOD_NM = 80.0
LOWPASS_PASS_NM, LOWPASS_STOP_NM = 3.0, 2.0
DEFAULT_NOISE_SIGMA = 1.3  # per-voxel noise std at 10 Å voxels, in protein-density units


# --- scene (physical, voxel-size independent) ----------------------------------------------

@dataclass
class _Blob:
    """A union of spheres (ribosome, gold, distractor). label 0 = not labelled."""

    lobes: np.ndarray  # (n, 4): z, y, x, radius (nm)
    label: int
    density: float
    waves: np.ndarray | None = None  # (k, 4): kz, ky, kx (rad/nm), phase: internal texture
    centre: np.ndarray | None = None  # (3,) nm, for particle tables


@dataclass
class _Shell:
    """A vesicle: spherical bilayer of mid-radius `radius` (nm)."""

    centre: np.ndarray
    radius: float


@dataclass
class _Sheet:
    """A bilayer on a cylinder of (large) radius around an axis roughly along z."""

    axis_point: np.ndarray
    axis_dir: np.ndarray
    radius: float


@dataclass
class _Tube:
    """A filament: centre line (n, 3) nm; density between inner and outer radius."""

    points: np.ndarray
    inner_nm: float
    outer_nm: float
    label: int


class _Occupancy:
    """Spheres already taken by accepted objects, for collision tests (physical, nm).

    Points live in a few KD-trees: recent additions go to a small tree that is rebuilt on each
    addition, and are merged into the large tree only now and then (rebuilding one big tree per
    object would be quadratic in the number of objects).
    """

    _MERGE_POINTS = 4000

    def __init__(self) -> None:
        self._big: list[tuple[cKDTree, np.ndarray]] = []  # (tree, radii)
        self._recent_p: list[np.ndarray] = []
        self._recent_r: list[np.ndarray] = []
        self._recent: tuple[cKDTree, np.ndarray] | None = None
        self._lumens: list[tuple[np.ndarray, float]] = []  # vesicle interiors: keep them empty

    def _trees(self) -> list[tuple[cKDTree, np.ndarray]]:
        if self._recent is None and self._recent_p:
            self._recent = (cKDTree(np.concatenate(self._recent_p)),
                            np.concatenate(self._recent_r))
        return self._big + ([self._recent] if self._recent is not None else [])

    def collides(self, points: np.ndarray, radii: np.ndarray,
                 lumen: tuple[np.ndarray, float] | None = None) -> bool:
        if self._lumens:
            centres = np.array([c for c, _ in self._lumens])
            radii_l = np.array([r for _, r in self._lumens])
            d2 = ((points[:, None, :] - centres[None]) ** 2).sum(-1)
            if np.any(d2 < radii_l**2):
                return True
        new_tree = None
        for tree, tree_r in self._trees():
            new_tree = new_tree or cKDTree(points)
            reach = float(radii.max() + tree_r.max() + GAP_NM)
            pairs = new_tree.sparse_distance_matrix(tree, reach, output_type="ndarray")
            if len(pairs) and np.any(pairs["v"] < radii[pairs["i"]] + tree_r[pairs["j"]]
                                     + GAP_NM):
                return True
            # A new vesicle must not swallow what is already there.
            if lumen is not None and tree.query_ball_point(lumen[0], lumen[1],
                                                           return_length=True) > 0:
                return True
        return False

    def add(self, points: np.ndarray, radii: np.ndarray,
            lumen: tuple[np.ndarray, float] | None = None) -> None:
        if lumen is not None:
            self._lumens.append(lumen)
        self._recent_p.append(points)
        self._recent_r.append(radii)
        self._recent = None
        if sum(len(p) for p in self._recent_p) > self._MERGE_POINTS:
            self._big.append(self._trees()[-1])
            self._recent_p, self._recent_r, self._recent = [], [], None
            if len(self._big) > 8:  # keep the number of trees to query small
                data = np.concatenate([t.data for t, _ in self._big])
                self._big = [(cKDTree(data), np.concatenate([r for _, r in self._big]))]


class _Scene:
    """Places objects in a box of `extent_nm` (z, y, x) with the specimen slab in z."""

    def __init__(self, extent_nm: np.ndarray, rng: np.random.Generator) -> None:
        self.extent = extent_nm
        self.rng = rng
        margin = max(3.0, 0.05 * extent_nm[0])
        self.slab = (margin, extent_nm[0] - margin)
        self.occupied = _Occupancy()
        self.objects: list[Any] = []
        self.counts: dict[str, int] = {}

    def inside_slab(self, z_lo: float, z_hi: float) -> bool:
        return z_lo >= self.slab[0] + 1.0 and z_hi <= self.slab[1] - 1.0

    def random_point(self, pad_xy: float, pad_z: float) -> np.ndarray | None:
        lo = np.array([self.slab[0] + 1.0 + pad_z, pad_xy, pad_xy])
        hi = np.array([self.slab[1] - 1.0 - pad_z, self.extent[1] - pad_xy,
                       self.extent[2] - pad_xy])
        if np.any(hi <= lo):
            return None
        return lo + self.rng.random(3) * (hi - lo)

    def place(self, kind: str, count: int, make: Callable[[], Any], tries_each: int = 30) -> None:
        placed = 0
        for _ in range(count * tries_each):
            if placed == count:
                break
            made = make()
            if made is None:
                continue
            obj, points, radii = made
            lumen = (obj.centre, obj.radius) if isinstance(obj, _Shell) else None
            if self.occupied.collides(points, radii, lumen):
                continue
            self.occupied.add(points, radii, lumen)
            self.objects.append(obj)
            placed += 1
        self.counts[kind] = self.counts.get(kind, 0) + placed


def _make_vesicle(scene: _Scene) -> tuple[_Shell, np.ndarray, np.ndarray] | None:
    rng = scene.rng
    max_r = min(45.0, (scene.slab[1] - scene.slab[0]) / 2 - BILAYER_HALF_NM - 2.0)
    if max_r < 10.0:
        return None
    radius = rng.uniform(10.0, max_r)
    outer = radius + BILAYER_HALF_NM
    centre = scene.random_point(pad_xy=-0.3 * outer, pad_z=outer)  # may be cut by x/y edges
    if centre is None:
        return None
    n = max(12, int(4 * math.pi * outer**2 / 9.0))  # a point every ~3 nm
    pts = centre + fibonacci_sphere(n) * radius
    return _Shell(centre, radius), pts, np.full(n, BILAYER_HALF_NM + 0.5)


def _make_sheet(scene: _Scene) -> tuple[_Sheet, np.ndarray, np.ndarray] | None:
    rng = scene.rng
    base = scene.random_point(pad_xy=0.15 * scene.extent[1], pad_z=0.0)
    if base is None:
        return None
    radius = float(rng.choice([rng.uniform(150.0, 600.0), 5000.0]))  # curved or ~flat
    phi0 = rng.uniform(0, 2 * math.pi)
    normal = np.array([0.0, math.sin(phi0), math.cos(phi0)])
    tilt = math.radians(rng.uniform(-12.0, 12.0))  # lean of the sheet out of the z direction
    tangent = np.array([0.0, math.cos(phi0), -math.sin(phi0)])
    axis = np.array([math.cos(tilt), 0.0, 0.0]) + math.sin(tilt) * tangent
    axis_point = base - radius * normal
    # Surface samples inside the box, for collisions.
    diag = float(np.linalg.norm(scene.extent))
    half_angle = min(math.pi, diag / radius)
    angles = phi0 + np.arange(-half_angle, half_angle, 3.0 / radius)
    heights = np.arange(-diag / 2, diag / 2, 3.0)
    a, h = np.meshgrid(angles, heights, indexing="ij")
    radial = np.stack([np.zeros_like(a), np.sin(a), np.cos(a)], axis=-1)
    # Radial directions must be perpendicular to the (tilted) axis: project them.
    radial -= (radial @ axis)[..., None] * axis
    radial /= np.linalg.norm(radial, axis=-1, keepdims=True)
    pts = (axis_point + h[..., None] * axis + radius * radial).reshape(-1, 3)
    keep = np.all((pts >= [scene.slab[0], -3, -3]) & (pts <= [scene.slab[1],
                  scene.extent[1] + 3, scene.extent[2] + 3]), axis=1)
    pts = pts[keep]
    if len(pts) < 20:
        return None
    return _Sheet(axis_point, axis, radius), pts, np.full(len(pts), BILAYER_HALF_NM + 0.5)


def _curve(scene: _Scene, length_nm: float, bend: float, slope_max: float,
           radius: float) -> np.ndarray | None:
    """A smooth centre line through a random point, mostly in XY, clipped to the box."""
    rng = scene.rng
    centre = scene.random_point(pad_xy=radius, pad_z=radius)
    if centre is None:
        return None
    s = np.arange(-length_nm / 2, length_nm / 2 + CURVE_STEP_NM, CURVE_STEP_NM)
    wavelength = rng.uniform(100.0, 400.0)
    theta = (rng.uniform(0, 2 * math.pi) + rng.uniform(-1, 1) * bend * s / 100.0
             + bend * rng.uniform(0.3, 1.0) * np.sin(2 * math.pi * s / wavelength
                                                     + rng.uniform(0, 2 * math.pi)))
    slope = rng.uniform(-slope_max, slope_max)
    dz = slope + 0.5 * slope_max * np.sin(2 * math.pi * s / rng.uniform(150, 500)
                                          + rng.uniform(0, 2 * math.pi))
    steps = np.stack([dz, np.sin(theta), np.cos(theta)], axis=1)
    steps *= CURVE_STEP_NM / np.linalg.norm(steps, axis=1, keepdims=True)
    pts = np.cumsum(steps, axis=0)
    pts += centre - pts[len(s) // 2]
    # Keep the run of points around the centre that lies within the box (plus the radius).
    inside = np.all((pts[:, 1:] >= -radius) & (pts[:, 1:] <= scene.extent[1:] + radius), axis=1)
    mid = len(s) // 2
    lo = mid - np.argmin(inside[mid::-1]) + 1 if not inside[: mid + 1].all() else 0
    hi = mid + np.argmin(inside[mid:]) if not inside[mid:].all() else len(s)
    pts = pts[max(lo, 0): hi]
    if len(pts) < 20 or not scene.inside_slab(pts[:, 0].min() - radius, pts[:, 0].max() + radius):
        return None
    return pts


def _make_microtubule(scene: _Scene) -> tuple[_Tube, np.ndarray, np.ndarray] | None:
    pts = _curve(scene, scene.rng.uniform(200.0, 800.0), bend=0.15, slope_max=0.04,
                 radius=MT_OUTER_NM)
    if pts is None:
        return None
    coarse = pts[::4]
    return (_Tube(pts, MT_INNER_NM, MT_OUTER_NM, MICROTUBULE), coarse,
            np.full(len(coarse), MT_OUTER_NM))


def _make_actin(scene: _Scene) -> tuple[_Tube, np.ndarray, np.ndarray] | None:
    short = min(1.0, float(scene.extent[1:].min()) / 250.0)  # shorter in small boxes
    pts = _curve(scene, scene.rng.uniform(60.0, 300.0) * short, bend=0.6, slope_max=0.1,
                 radius=ACTIN_RADIUS_NM)
    if pts is None:
        return None
    coarse = pts[::2]
    return (_Tube(pts, 0.0, ACTIN_RADIUS_NM, ACTIN), coarse,
            np.full(len(coarse), ACTIN_RADIUS_NM))


def _texture_waves(rng: np.random.Generator, n: int, period_lo: float,
                   period_hi: float) -> np.ndarray:
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = 2 * math.pi / rng.uniform(period_lo, period_hi, size=n)
    return np.concatenate([dirs * k[:, None], rng.uniform(0, 2 * math.pi, (n, 1))], axis=1)


def _union_centroid(lobes: np.ndarray, step_nm: float = 0.75) -> np.ndarray:
    """Centroid of a union of spheres on a fixed physical grid (voxel-size independent)."""
    lo = (lobes[:, :3] - lobes[:, 3:]).min(axis=0)
    hi = (lobes[:, :3] + lobes[:, 3:]).max(axis=0)
    axes = [np.arange(a, b + step_nm, step_nm) for a, b in zip(lo, hi, strict=True)]
    inside = _union_sdf(lobes, axes) <= 0
    idx = np.nonzero(inside)
    return np.array([axes[i][idx[i]].mean() for i in range(3)])


def _make_ribosome(scene: _Scene) -> tuple[_Blob, np.ndarray, np.ndarray] | None:
    rng = scene.rng
    centre = scene.random_point(pad_xy=15.0, pad_z=15.0)
    if centre is None:
        return None
    large_r, small_r = rng.uniform(10.0, 11.0), rng.uniform(7.0, 8.0)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    large = -0.35 * 9.5 * axis
    lobes = [(*large, large_r), (*(0.65 * 9.5 * axis), small_r)]
    for _ in range(rng.integers(2, 5)):  # protrusions on the large subunit (stalks, rRNA)
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        lobes.append((*(large + d * rng.uniform(large_r - 1.5, large_r)), rng.uniform(2.5, 4.0)))
    lobes_a = np.array(lobes)
    # Cheap test first (the centroid is near the volume-weighted lobe centre); the exact
    # centroid (the particle table gives the body's centroid) only for placements that fit.
    weights = lobes_a[:, 3] ** 3
    approx = lobes_a[:, :3] + centre - (weights @ lobes_a[:, :3]) / weights.sum()
    if scene.occupied.collides(approx, lobes_a[:, 3]):
        return None
    lobes_a[:, :3] += centre - _union_centroid(lobes_a)
    blob = _Blob(lobes_a, RIBOSOME, 1.0, _texture_waves(rng, 5, 3.0, 7.0), centre)
    return blob, lobes_a[:, :3], lobes_a[:, 3]


def _make_gold(scene: _Scene) -> tuple[_Blob, np.ndarray, np.ndarray] | None:
    centre = scene.random_point(pad_xy=GOLD_RADIUS_NM + 2, pad_z=GOLD_RADIUS_NM)
    if centre is None:
        return None
    lobes = np.array([[*centre, GOLD_RADIUS_NM]])
    return _Blob(lobes, GOLD, GOLD_DENSITY, None, centre), centre[None], lobes[:, 3]


def _make_distractor(scene: _Scene) -> tuple[_Blob, np.ndarray, np.ndarray] | None:
    rng = scene.rng
    centre = scene.random_point(pad_xy=0.0, pad_z=6.0)
    if centre is None:
        return None
    n = int(rng.integers(1, 4))
    radii = rng.uniform(2.5, 4.5, n) if n == 1 else rng.uniform(2.0, 3.5, n)
    offsets = rng.normal(scale=1.8, size=(n, 3)) * (n > 1)
    lobes = np.concatenate([centre + offsets, radii[:, None]], axis=1)
    blob = _Blob(lobes, 0, rng.uniform(0.7, 1.2), _texture_waves(rng, 2, 3.0, 6.0))
    return blob, lobes[:, :3], lobes[:, 3]


def _build_scene(extent_nm: np.ndarray, rng: np.random.Generator) -> _Scene:
    """All placement decisions; depends only on the physical box and the generator."""
    scene = _Scene(extent_nm, rng)
    area = float(extent_nm[1] * extent_nm[2])
    volume = area * (scene.slab[1] - scene.slab[0])

    # kind: (maker, expected count, minimum, tries per object).
    plan = {
        "sheet": (_make_sheet, area / 100000, 1 if area >= 200.0**2 else 0, 10),
        "microtubule": (_make_microtubule, area / 30000, 1, 30),
        "vesicle": (_make_vesicle, area / 14000, 2, 30),
        "actin": (_make_actin, area / 5000, 2, 40),
        "gold": (_make_gold, area / 9000, 3, 40),
        "ribosome": (_make_ribosome, volume / 1.2e5, 3, 40),
        "distractor": (_make_distractor, volume / 6e4, 0, 20),
    }
    counts = {kind: max(minimum, int(rng.poisson(expected)))
              for kind, (_, expected, minimum, _) in plan.items()}
    # Sheets and long filaments first; then each other kind's minimum, smallest first, so that
    # crowding in a small box cannot leave a class out; then the rest, largest first.
    rounds = [(("sheet", "microtubule"), counts),
              (("ribosome", "gold", "actin", "vesicle"), {k: v[2] for k, v in plan.items()}),
              (("vesicle", "actin", "gold", "ribosome", "distractor"), counts)]
    for kinds, wanted in rounds:
        for kind in kinds:
            make, _, _, tries = plan[kind]
            missing = wanted[kind] - scene.counts.get(kind, 0)
            scene.place(kind, max(0, missing), lambda make=make: make(scene), tries)
    return scene


# --- rendering on the voxel grid ------------------------------------------------------------

def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))


def _box(lo_nm: np.ndarray, hi_nm: np.ndarray, vs_nm: float, shape: tuple[int, ...]
         ) -> tuple[tuple[slice, ...], list[np.ndarray]] | None:
    """Voxel slices covering [lo, hi] nm and the voxel centre coordinates (nm) along each axis."""
    i0 = np.maximum(np.floor(lo_nm / vs_nm).astype(int), 0)
    i1 = np.minimum(np.ceil(hi_nm / vs_nm).astype(int) + 1, shape)
    if np.any(i1 <= i0):
        return None
    slices = tuple(slice(int(a), int(b)) for a, b in zip(i0, i1, strict=True))
    coords = [(np.arange(a, b) * vs_nm).astype(np.float32) for a, b in zip(i0, i1, strict=True)]
    return slices, coords


def _sq_dist(coords: list[np.ndarray], p: np.ndarray) -> np.ndarray:
    z, y, x = coords
    return ((z - p[0]) ** 2)[:, None, None] + ((y - p[1]) ** 2)[None, :, None] + \
        ((x - p[2]) ** 2)[None, None, :]


def _union_sdf(lobes: np.ndarray, coords: list[np.ndarray]) -> np.ndarray:
    sdf = None
    for z, y, x, r in lobes:
        d = np.sqrt(_sq_dist(coords, np.array([z, y, x]))) - r
        sdf = d if sdf is None else np.minimum(sdf, d)
    return sdf


def _paint(density: np.ndarray, labels: np.ndarray, slices: tuple[slice, ...],
           obj_density: np.ndarray, mask: np.ndarray | None, label: int) -> None:
    view = density[slices]
    np.maximum(view, obj_density.astype(np.float32, copy=False), out=view)
    if label and mask is not None:
        labels[slices][mask] = label


def _render_blob(blob: _Blob, density: np.ndarray, labels: np.ndarray, vs_nm: float,
                 edge_nm: float) -> None:
    r = blob.lobes[:, 3:]
    box = _box((blob.lobes[:, :3] - r).min(0) - 2 * edge_nm,
               (blob.lobes[:, :3] + r).max(0) + 2 * edge_nm, vs_nm, density.shape)
    if box is None:
        return
    slices, coords = box
    sdf = _union_sdf(blob.lobes, coords)
    dens = _sigmoid(-sdf / edge_nm) * blob.density
    if blob.waves is not None:  # internal texture: +-30 % density variation
        z, y, x = coords
        tex = np.zeros_like(dens)
        for kz, ky, kx, phase in blob.waves:
            tex += np.cos((kz * z)[:, None, None] + (ky * y)[None, :, None]
                          + (kx * x)[None, None, :] + phase)
        dens *= 1.0 + 0.3 / math.sqrt(len(blob.waves)) * tex
    _paint(density, labels, slices, dens, sdf <= 0, blob.label)


def _bilayer(u: np.ndarray) -> np.ndarray:
    """Density across a bilayer at signed distance u (nm) from its mid-plane."""
    s2 = 2 * LEAFLET_SIGMA_NM**2
    return MEMBRANE_DENSITY * (np.exp(-((u - LEAFLET_OFFSET_NM) ** 2) / s2)
                               + np.exp(-((u + LEAFLET_OFFSET_NM) ** 2) / s2))


def _render_shell(shell: _Shell, density: np.ndarray, labels: np.ndarray, vs_nm: float) -> None:
    reach = shell.radius + BILAYER_HALF_NM + 2.0
    box = _box(shell.centre - reach, shell.centre + reach, vs_nm, density.shape)
    if box is None:
        return
    slices, coords = box
    u = np.sqrt(_sq_dist(coords, shell.centre)) - shell.radius
    near = np.abs(u) < BILAYER_HALF_NM + 3.0  # the profile is ~0 beyond
    dens = np.zeros(u.shape, dtype=np.float32)
    dens[near] = _bilayer(u[near])
    _paint(density, labels, slices, dens, np.abs(u) <= BILAYER_HALF_NM, MEMBRANE)


def _render_sheet(sheet: _Sheet, density: np.ndarray, labels: np.ndarray, vs_nm: float,
                  slab_nm: tuple[float, float], edge_nm: float) -> None:
    nz, ny, nx = density.shape
    y = (np.arange(ny) * vs_nm)[:, None]
    x = (np.arange(nx) * vs_nm)[None, :]
    a = sheet.axis_dir
    for iz in range(nz):
        z = iz * vs_nm
        inside_slab = _sigmoid((z - slab_nm[0]) / edge_nm) * _sigmoid((slab_nm[1] - z) / edge_nm)
        if inside_slab < 1e-3:
            continue
        v = [z - sheet.axis_point[0], y - sheet.axis_point[1], x - sheet.axis_point[2]]
        along = v[0] * a[0] + v[1] * a[1] + v[2] * a[2]
        dist2 = sum((v[i] - along * a[i]) ** 2 for i in range(3))
        u = np.sqrt(dist2) - sheet.radius
        near = np.abs(u) < BILAYER_HALF_NM + 3.0
        if not near.any():
            continue
        plane, u_near = density[iz], u[near]
        plane[near] = np.maximum(plane[near], _bilayer(u_near) * inside_slab)
        if slab_nm[0] <= z <= slab_nm[1]:
            labels[iz][near] = np.where(np.abs(u_near) <= BILAYER_HALF_NM, MEMBRANE,
                                        labels[iz][near])


def _render_tube(tube: _Tube, density: np.ndarray, labels: np.ndarray, vs_nm: float,
                 edge_nm: float) -> None:
    """Distance to the centre line by splatting small cubes around its points, chunk by chunk."""
    reach = tube.outer_nm + 2 * edge_nm
    stride = max(1, int(vs_nm / CURVE_STEP_NM))  # coarse voxels need fewer points
    pts = tube.points[::stride]
    spacing = CURVE_STEP_NM * stride
    extra = int(math.ceil(reach / spacing)) + 1
    chunk = 32
    for start in range(0, len(pts), chunk):
        own = pts[start: start + chunk]
        box = _box(own.min(0) - reach, own.max(0) + reach, vs_nm, density.shape)
        if box is None:
            continue
        slices, coords = box
        d2 = np.full(tuple(len(c) for c in coords), np.float32(np.inf), dtype=np.float32)
        origin = np.array([c[0] for c in coords], dtype=np.float64)
        for p in pts[max(0, start - extra): start + chunk + extra]:
            lo = np.maximum(np.floor((p - reach - origin) / vs_nm).astype(int), 0)
            hi = np.minimum(np.ceil((p + reach - origin) / vs_nm).astype(int) + 1, d2.shape)
            if np.any(hi <= lo):
                continue
            sub = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
            sub_coords = [c[s] for c, s in zip(coords, sub, strict=True)]
            np.minimum(d2[sub], _sq_dist(sub_coords, p), out=d2[sub])
        d = np.sqrt(d2)
        dens = _sigmoid((tube.outer_nm - d) / edge_nm)
        if tube.inner_nm > 0:
            dens *= _sigmoid((d - tube.inner_nm) / edge_nm)
        _paint(density, labels, slices, dens, d <= tube.outer_nm, tube.label)


def _render(scene: _Scene, shape: tuple[int, int, int], vs_nm: float,
            progress: Progress | None) -> tuple[np.ndarray, np.ndarray]:
    edge_nm = max(0.4, 0.4 * vs_nm)  # soft edges: no aliasing from sharp steps
    density = np.zeros(shape, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.int8)
    z = np.arange(shape[0]) * vs_nm
    slab = scene.slab
    ice = ICE_DENSITY * _sigmoid((z - slab[0]) / edge_nm) * _sigmoid((slab[1] - z) / edge_nm)
    density += ice.astype(np.float32)[:, None, None]
    for i, obj in enumerate(scene.objects):
        if isinstance(obj, _Blob):
            _render_blob(obj, density, labels, vs_nm, edge_nm)
        elif isinstance(obj, _Shell):
            _render_shell(obj, density, labels, vs_nm)
        elif isinstance(obj, _Sheet):
            _render_sheet(obj, density, labels, vs_nm, slab, edge_nm)
        else:
            _render_tube(obj, density, labels, vs_nm, edge_nm)
        if progress is not None and i % 16 == 0:
            progress("render", i / len(scene.objects))
    # Background ice is denser than vacuum but carries no object density.
    return density, labels


# --- image formation -------------------------------------------------------------------------

def _add_noise(density: np.ndarray, sigma: float, rng: np.random.Generator) -> None:
    for z0 in range(0, density.shape[0], 8):  # slab-wise: no whole-volume noise array
        block = density[z0: z0 + 8]
        block += sigma * rng.standard_normal(block.shape, dtype=np.float32)


def _filter_plane(kz: float, ky: np.ndarray, kx: np.ndarray, tan_tilt: float) -> np.ndarray:
    """Transfer function on one kz plane: missing wedge x high-pass x soft low-pass."""
    k = np.sqrt(kz * kz + ky[:, None] ** 2 + kx[None, :] ** 2)
    high = 1.0 - np.exp(-0.5 * (k * HIGHPASS_PERIOD_NM) ** 2)
    f_pass, f_stop = 1.0 / LOWPASS_PASS_NM, 1.0 / LOWPASS_STOP_NM
    t = np.clip((k - f_pass) / (f_stop - f_pass), 0.0, 1.0)
    low = np.cos(0.5 * math.pi * t) ** 2
    wedge = np.abs(kz) <= tan_tilt * np.abs(kx)[None, :] + 1e-9
    return (high * low * wedge).astype(np.float32)


def _image(holder: list[np.ndarray], vs_nm: float, tilt_range_deg: float,
           noise_sigma: float) -> tuple[np.ndarray, float]:
    """Wedge and band-pass in one Fourier pass; returns (tomogram, SNR).

    The density comes in a one-element list that is emptied, so that its memory is freed
    before the inverse transform (peak: one complex64 half spectrum plus one float32 volume).
    """
    density = holder.pop()
    shape = density.shape
    spectrum = scipy.fft.rfftn(density, workers=1)  # complex64 for float32 input
    del density
    kz = scipy.fft.fftfreq(shape[0], d=vs_nm)
    ky = scipy.fft.fftfreq(shape[1], d=vs_nm)
    kx = scipy.fft.rfftfreq(shape[2], d=vs_nm)
    # Weights of rfft columns in the full spectrum (Parseval): interior columns count twice.
    weight = np.full(len(kx), 2.0)
    weight[0] = 1.0
    if shape[2] % 2 == 0:
        weight[-1] = 1.0
    tan_tilt = math.tan(math.radians(tilt_range_deg))
    h2_sum = 0.0
    for iz in range(shape[0]):
        h = _filter_plane(kz[iz], ky, kx, tan_tilt)
        spectrum[iz] *= h
        h2_sum += float(((h.astype(np.float64) ** 2) * weight).sum())
    out = scipy.fft.irfftn(spectrum, s=shape, workers=1)
    del spectrum
    n = out.size
    noise_var = noise_sigma**2 * h2_sum / n
    total_var = _variance(out)
    snr = max(total_var - noise_var, 0.0) / noise_var if noise_var > 0 else math.inf
    out *= np.float32(-1.0 / math.sqrt(total_var))  # dense = dark; std 1 (mean is 0: no DC)
    return out.astype(np.float32, copy=False), snr


def _variance(data: np.ndarray) -> float:
    total, total_sq = 0.0, 0.0
    for z0 in range(0, data.shape[0], 16):
        block = data[z0: z0 + 16].astype(np.float64)
        total += block.sum()
        total_sq += (block * block).sum()
    mean = total / data.size
    return total_sq / data.size - mean * mean


def synthesize(
    shape_zyx: tuple[int, int, int] = (64, 256, 256),
    voxel_size_a: float = 10.0,
    seed: int = 0,
    progress: Progress | None = None,
    *,
    tilt_range_deg: float | None = None,
    noise_sigma: float = DEFAULT_NOISE_SIGMA,
    simulator: str = "microscope",
    tilt_step_deg: float | None = None,
    defocus_um: float | None = None,
    dose_e_per_a2: float | None = None,
    thickness_nm: float | None = None,
) -> SynthResult:
    """A synthetic tomogram with labels and particle centres, deterministic for `seed`.

    simulator "microscope" (default): a crowded cellular specimen imaged as a microscope does
    it (`core.microscope.simulate_tomogram`): every physical parameter is drawn from its
    documented range; `tilt_range_deg`, `tilt_step_deg`, `defocus_um`, `dose_e_per_a2` and
    `thickness_nm` override single draws (`noise_sigma` is not used: noise is shot noise).
    simulator "cartoon": the earlier scene of clean shells, tubes and blobs with a Fourier
    wedge and band-pass (this module); `noise_sigma` is its per-voxel noise std at 10 Å
    (protein density = 1) and `tilt_range_deg` (default 60) its +- tilt range.
    Either way the scene depends only on the seed and the physical box ((shape - 1) * voxel
    size).
    """
    shape = tuple(int(s) for s in shape_zyx)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"synthesize: shape_zyx must be 3 sizes >= 8, got {shape_zyx}")
    if not voxel_size_a > 0:
        raise ValueError(f"synthesize: voxel_size_a must be > 0, got {voxel_size_a}")
    if simulator == "microscope":
        from .microscope import simulate_tomogram

        return simulate_tomogram(shape, voxel_size_a, seed, progress,
                                 tilt_range_deg=tilt_range_deg, tilt_step_deg=tilt_step_deg,
                                 defocus_um=defocus_um, dose_e_per_a2=dose_e_per_a2,
                                 thickness_nm=thickness_nm)
    if simulator != "cartoon":
        raise ValueError(f"synthesize: simulator must be 'microscope' or 'cartoon', "
                         f"got {simulator!r}")
    if tilt_range_deg is None:
        tilt_range_deg = 60.0
    vs_nm = voxel_size_a / 10.0
    scene_seed, noise_seed = np.random.SeedSequence(seed).spawn(2)
    scene = _build_scene((np.array(shape) - 1) * vs_nm, np.random.Generator(
        np.random.PCG64(scene_seed)))
    if progress is not None:
        progress("scene", 1.0)
    density, labels = _render(scene, shape, vs_nm, progress)
    if progress is not None:
        progress("render", 1.0)
    sigma_voxel = noise_sigma * (1.0 / vs_nm) ** 1.5  # same physical noise power at any voxel
    _add_noise(density, sigma_voxel, np.random.Generator(np.random.PCG64(noise_seed)))
    holder = [density]
    del density
    tomogram, snr = _image(holder, vs_nm, tilt_range_deg, sigma_voxel)
    if progress is not None:
        progress("image", 1.0)
    particles = [
        (SYNTH_CLASS_NAMES[obj.label - 1], *(float(c) for c in obj.centre[::-1] / vs_nm))
        for obj in scene.objects
        if isinstance(obj, _Blob) and obj.label in (RIBOSOME, GOLD)
    ]
    info = {"simulator": "cartoon", "counts": dict(scene.counts), "snr": snr,
            "noise_sigma_voxel": sigma_voxel,
            "tilt_range_deg": tilt_range_deg, "slab_nm": list(scene.slab), "seed": seed}
    return SynthResult(tomogram, labels, particles, float(voxel_size_a), SYNTH_CLASS_NAMES, info)


# --- files -----------------------------------------------------------------------------------

def _stored(tomogram: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return tomogram
    if dtype == "float16":
        return tomogram.astype(np.float16)
    if dtype == "int16":  # scaled to use the range, as detectors/reconstructions often do
        peak = float(np.abs(tomogram).max()) or 1.0
        return np.round(tomogram * (32000.0 / peak)).astype(np.int16)
    raise ValueError(f"write_synth: dtype must be float32, float16 or int16, got {dtype!r}")


def write_synth(
    result: SynthResult,
    out_mrc: str | os.PathLike,
    labels_path: str | os.PathLike | None = None,
    particles_csv: str | os.PathLike | None = None,
    dtype: str = "float32",
) -> None:
    """Write the tomogram (MRC, `dtype` float32|float16|int16), labels (int8 MRC, mode 0) and
    particle table (CSV `class,x,y,z`, voxel indices), each with the voxel size."""
    from .volume import write_mrc

    write_mrc(out_mrc, _stored(result.tomogram, dtype), result.voxel_size_a)
    if labels_path is not None:
        write_mrc(labels_path, result.labels.astype(np.int8, copy=False), result.voxel_size_a)
    if particles_csv is not None:
        with atomic_path(particles_csv) as tmp:
            Path(tmp).write_text(particle_csv_text(result.particles, with_score=False))
