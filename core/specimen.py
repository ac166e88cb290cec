"""A cellular specimen for the microscope simulator, built in nm and rendered on a voxel grid.

`build_specimen` makes every placement decision in physical units (nm) from a numpy Generator,
independently of the voxel size; `render_specimen` samples the result as a potential map
(volts, mean inner potential: what the electron wave's phase sees) and a label map on a
[z, y, x] grid whose voxel i is centred at i * voxel size.

Content: a specimen slab (lamella or cell periphery) with vacuum or ice outside, an optional
carbon support edge and surface ice contamination; lipid bilayers (vesicles, sheets, tubes,
double-membrane envelopes), some carrying membrane proteins; microtubules (13 protofilaments,
empty lumen) and actin (two-stranded helix), single and bundled; ribosomes (two unequal
subunits, some in polysomes); gold beads; and a crowd of distractor macromolecules of about
a dozen procedural shapes (labelled 0). Labelled objects never overlap (an occupancy grid at
1 nm rejects colliding placements); distractors may touch each other but not labelled objects.
Membranes and filaments are cut by the slab surfaces (as FIB milling cuts them).

Densities are mass densities relative to vitreous ice (0.93 g/cm^3), turned into potential
through the ice's mean inner potential; gold, whose potential does not follow its mass
density, gets its own (capped) potential. Edges are smooth (a logistic step about a third of
a voxel wide), so that objects smaller than a voxel are sampled without aliasing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.spatial import cKDTree

from .classes import SYNTH_CLASS_NAMES
from .synth_result import fibonacci_sphere

Progress = Callable[[str, float], None]

MEMBRANE, MICROTUBULE, ACTIN, RIBOSOME, GOLD = (SYNTH_CLASS_NAMES.index(n) + 1 for n in (
    "membrane", "microtubule", "actin", "ribosome", "gold"))

ICE_G_CM3 = 0.93  # vitreous ice
GRID_NM = 1.0  # occupancy grid cell for placement
LUMEN_GRID_NM = 4.0  # coarse grid of vesicle interiors (kept free of cytosolic crowding)
GAP_NM = 1.0  # minimum clearance between labelled objects
MT_PF_COUNT = 13
MT_OUTER_NM, MT_INNER_NM = 12.5, 7.5  # 25 nm tube, 15 nm lumen
ACTIN_RADIUS_NM = 3.5  # 7 nm filament


# --- parameters (domain randomisation) -------------------------------------------------------

@dataclass
class SpecimenParams:
    """Physical parameters of one specimen; `sample` draws them from documented ranges."""

    thickness_nm: float = 150.0  # FIB lamellae 100-250 nm (Schaffer et al. 2017), cell edges 80-300
    slab_tilt_x_deg: float = 0.0  # lamella not perpendicular to the beam: a few degrees
    slab_tilt_y_deg: float = 0.0  # milling angle residual after pre-tilt, +-10 deg
    slab_offset_nm: float = 0.0  # mid-plane off the box centre (reconstructions are not centred)
    outside: str = "vacuum"  # "vacuum" (lamella) or "ice" (thick plunge-frozen ice)
    carbon_edge: bool = False  # holey-carbon support edge in view (cell periphery on a grid)
    carbon_thickness_nm: float = 15.0  # Quantifoil/C-flat films 10-20 nm
    contamination: int = 0  # surface ice crystals (frost), 0-4 per field of view
    ice_mip_v: float = 4.0  # ice mean inner potential 3.5-4.5 V (water 4.48 V, Yesibolati 2020)
    protein_g_cm3: float = 1.35  # protein mass density (Fischer et al. 2004)
    ribosome_g_cm3: float = 1.55  # ~60 % rRNA (RNA ~1.7-2.0 g/cm^3) raises the mean
    # Not every macromolecule is plain protein: nucleoprotein complexes (spliceosomes, vault
    # RNPs, chromatin pieces, other RNA-rich particles) range from protein's 1.35 up to RNA's
    # ~1.7 g/cm^3 (buoyant densities, Fischer et al. 2004; Voss & Gerstein 2005). This share
    # of the distractor shapes is that dense, so that "dark and compact" alone is not gold
    # (gold, 15-30 V, stays 4-10 times further from ice than the densest of these); 0.1-0.4
    # is plausible. Off by default and not drawn by `sample`: a model trained with it (and two
    # other changes, issue 14 "model B") had half the false gold of one without, but worse
    # membranes and ribosomes on the validation set, and which change did what is unmeasured.
    dense_distractor_fraction: float = 0.0
    dense_distractor_g_cm3: tuple[float, float] = (1.45, 1.70)
    # Head groups / water, 1.4-1.8: electron density 1.35-1.4 (Nagle & Tristram-Nagle 2000),
    # and P and O scatter more per electron than water's O and H.
    head_rel: float = 1.5
    tail_rel: float = 0.90  # hydrocarbon core / water 0.85-0.95 (Nagle & Tristram-Nagle 2000)
    head_separation_nm: float = 4.0  # phosphate-phosphate distance 3.8-4.2 nm
    bilayer_nm: float = 4.8  # total bilayer thickness 4.5-5 nm
    gold_mip_v: float = 22.0  # Au mean inner potential ~25-30 V; capped at 15-30 for dynamic range
    gold_diameter_nm: float = 10.0  # commercial colloids 5, 10, 15 nm
    crowding: float = 0.25  # macromolecular volume fraction of cytosol 0.2-0.33 (Ellis 2001)
    vesicles_per_um3: float = 150.0
    sheets: int = 1
    tubes: int = 0
    envelopes: int = 0
    membrane_protein_fraction: float = 0.5  # share of membranes carrying proteins
    microtubules_per_um2: float = 15.0  # per um^2 of field of view
    mt_bundle_p: float = 0.3
    mt_steep_p: float = 0.3  # share of microtubules running steeply to z
    actin_per_um2: float = 60.0
    actin_bundle_p: float = 0.4
    ribosomes_per_um3: float = 2000.0  # cytosolic ribosomes ~1-10 uM in eukaryotic cytosol
    polysome_p: float = 0.3  # share of ribosomes in polysome chains
    gold_per_um2: float = 60.0
    gold_inside_p: float = 0.25  # beads that end up inside the specimen
    mt_label: str = "wall"  # "wall" (protofilament shell) or "solid" (wall and lumen)

    @classmethod
    def sample(cls, rng: np.random.Generator) -> SpecimenParams:
        """Draw every parameter from its documented range."""
        return cls(
            thickness_nm=float(rng.uniform(80.0, 300.0)),
            slab_tilt_x_deg=float(rng.uniform(-4.0, 4.0)),
            slab_tilt_y_deg=float(rng.uniform(-10.0, 10.0)),
            slab_offset_nm=float(rng.uniform(-15.0, 15.0)),
            outside=str(rng.choice(["vacuum", "ice"], p=[0.75, 0.25])),
            carbon_edge=bool(rng.random() < 0.15),
            carbon_thickness_nm=float(rng.uniform(10.0, 20.0)),
            contamination=int(rng.integers(0, 5)),
            ice_mip_v=float(rng.uniform(3.5, 4.5)),
            protein_g_cm3=float(rng.uniform(1.32, 1.40)),
            ribosome_g_cm3=float(rng.uniform(1.45, 1.65)),
            head_rel=float(rng.uniform(1.40, 1.80)),
            tail_rel=float(rng.uniform(0.85, 0.95)),
            head_separation_nm=float(rng.uniform(3.8, 4.2)),
            bilayer_nm=float(rng.uniform(4.5, 5.0)),
            gold_mip_v=float(rng.uniform(15.0, 30.0)),
            gold_diameter_nm=float(rng.choice([5.0, 10.0, 15.0]) * rng.uniform(0.9, 1.1)),
            crowding=float(rng.uniform(0.20, 0.33)),
            vesicles_per_um3=float(rng.uniform(50.0, 400.0)),
            sheets=int(rng.integers(0, 3)),
            tubes=int(rng.integers(0, 2)),
            envelopes=int(rng.random() < 0.35),
            membrane_protein_fraction=float(rng.uniform(0.3, 0.8)),
            microtubules_per_um2=float(rng.uniform(4.0, 30.0)),
            mt_bundle_p=float(rng.uniform(0.0, 0.6)),
            mt_steep_p=float(rng.uniform(0.1, 0.5)),
            actin_per_um2=float(rng.uniform(20.0, 150.0)),
            actin_bundle_p=float(rng.uniform(0.0, 0.7)),
            ribosomes_per_um3=float(rng.uniform(500.0, 4000.0)),
            polysome_p=float(rng.uniform(0.0, 0.5)),
            gold_per_um2=float(rng.uniform(20.0, 150.0)),
            gold_inside_p=float(rng.uniform(0.1, 0.4)),
        )

    def potential_v(self, g_cm3: float) -> float:
        """Mean inner potential of matter of mass density `g_cm3` (scales with ice's)."""
        return self.ice_mip_v * g_cm3 / ICE_G_CM3


# --- the model (physical) --------------------------------------------------------------------

@dataclass
class Slab:
    """The specimen: |normal . (p - centre)| < thickness / 2 (nm, z y x)."""

    normal: np.ndarray
    centre: np.ndarray
    thickness_nm: float

    def depth(self, p: np.ndarray) -> np.ndarray:
        """Signed distance of points (..., 3) from the mid-plane."""
        return (p - self.centre) @ self.normal


@dataclass
class Membrane:
    """A bilayer whose mid-surface is a (scaled) sphere or a cylinder."""

    kind: str  # "sphere" | "cylinder"
    centre: np.ndarray  # sphere centre, or a point on the cylinder axis
    radius_nm: float
    scale: np.ndarray = field(default_factory=lambda: np.ones(3))  # sphere axis scaling
    axis: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))

    def sdf(self, p: np.ndarray) -> np.ndarray:
        """Signed distance (nm, approximate for scaled spheres) from the mid-surface."""
        v = p - self.centre
        if self.kind == "sphere":
            s = self.scale
            return (np.linalg.norm(v / s, axis=-1) - self.radius_nm) * float(np.mean(s))
        along = v @ self.axis
        return np.linalg.norm(v - along[..., None] * self.axis, axis=-1) - self.radius_nm

    def normal(self, p: np.ndarray) -> np.ndarray:
        v = p - self.centre
        if self.kind == "cylinder":
            v = v - (v @ self.axis)[..., None] * self.axis
        else:
            v = v / self.scale**2
        return v / np.linalg.norm(v, axis=-1, keepdims=True)


@dataclass
class Filament:
    """A filament centre line (n, 3) nm sampled every ~1 nm, with its helical phase."""

    label: int  # MICROTUBULE or ACTIN
    points: np.ndarray
    phase: float = 0.0


@dataclass
class Blob:
    """A union of spheres: lobes (n, 4) z y x r (nm), each with its potential (V)."""

    lobes: np.ndarray
    potential_v: np.ndarray
    label: int = 0
    kind: str = ""
    centre: np.ndarray | None = None  # particle centre (labelled particles)


@dataclass
class SpecimenModel:
    """Everything placed, in nm; renderable at any voxel size."""

    extent_nm: np.ndarray  # (z, y, x) box size
    params: SpecimenParams
    slab: Slab
    carbon: dict[str, Any] | None
    membranes: list[Membrane] = field(default_factory=list)
    filaments: list[Filament] = field(default_factory=list)
    blobs: list[Blob] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    crowding_achieved: float = 0.0


@dataclass
class Specimen:
    """A rendered specimen on a [z, y, x] grid."""

    potential_v: np.ndarray  # float32, volts
    labels: np.ndarray  # int8, 0 background, i = SYNTH_CLASS_NAMES[i - 1]
    particles: list[tuple[str, float, float, float]]  # (class, x, y, z) voxel indices
    filaments: list[tuple[str, np.ndarray]]  # (class, (n, 3) x y z voxel indices)
    voxel_size_a: float
    info: dict[str, Any]


# --- geometry helpers ------------------------------------------------------------------------

def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation (from a random unit quaternion)."""
    q = _unit(rng.normal(size=4))
    w, x, y, z = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _ring(n: int, radius: float, lobe_r: float, z: float, phase: float = 0.0) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.full(n, z), radius * np.sin(a), radius * np.cos(a),
                     np.full(n, lobe_r)], axis=1)


def _frames(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Arc length, tangents and a parallel-transported (rotation-minimising) normal frame."""
    d = np.gradient(points, axis=0)
    t = _unit(d)
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    n = np.empty_like(t)
    ref = np.array([1.0, 0.0, 0.0]) if abs(t[0, 0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    n[0] = _unit(ref - (ref @ t[0]) * t[0])
    for i in range(1, len(t)):
        v = n[i - 1] - (n[i - 1] @ t[i]) * t[i]
        n[i] = v / max(np.linalg.norm(v), 1e-9)
    b = np.cross(t, n)
    return s, t, n, b


# --- occupancy -------------------------------------------------------------------------------

class _Occupancy:
    """Placement bookkeeping on a fixed physical grid (voxel-size independent).

    `hard`: cells touched by labelled objects, membranes and membrane proteins (nothing may
    enter them); `soft`: cores of distractors (distractors may touch but not interpenetrate);
    `lumen`: interiors of small vesicles on a coarse grid (no cytosolic crowding inside).
    """

    def __init__(self, extent_nm: np.ndarray) -> None:
        self.shape = tuple(int(math.ceil(e / GRID_NM)) + 1 for e in extent_nm)
        self.hard = np.zeros(self.shape, dtype=bool)
        self.soft = np.zeros(self.shape, dtype=bool)
        lshape = tuple(int(math.ceil(e / LUMEN_GRID_NM)) + 1 for e in extent_nm)
        self.lumen = np.zeros(lshape, dtype=bool)
        self._shape_a = np.array(self.shape)
        self._strides = np.array([self.shape[1] * self.shape[2], self.shape[2], 1])
        self._offsets: dict[int, np.ndarray] = {}

    def _cells(self, lobes: np.ndarray, pad: float) -> np.ndarray:
        """Flat indices of the cells within r + pad of a lobe's centre cell (with repeats).

        Radii are quantised to a quarter of a cell and each lobe takes a cached ball of
        offsets around its nearest cell: a few vectorised steps per object, accurate to about
        half a cell, which is all placement needs.
        """
        rq = np.round((lobes[:, 3] + pad) * 4.0 / GRID_NM).astype(int)
        centre_cells = np.round(lobes[:, :3] / GRID_NM).astype(np.int64)
        parts = []
        for q in np.unique(rq):
            off = self._ball(int(q))
            parts.append((centre_cells[rq == q][:, None, :] + off[None]).reshape(-1, 3))
        cells = np.concatenate(parts)
        cells = cells[np.all((cells >= 0) & (cells < self._shape_a), axis=1)]
        return cells @ self._strides

    def cells_with_owner(self, lobes: np.ndarray, pad: float, owner: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
        """Like `_cells`, with the owner id of each cell's lobe."""
        rq = np.round((lobes[:, 3] + pad) * 4.0 / GRID_NM).astype(int)
        centre_cells = np.round(lobes[:, :3] / GRID_NM).astype(np.int64)
        cells_p, own_p = [], []
        for q in np.unique(rq):
            off = self._ball(int(q))
            sel = rq == q
            c = (centre_cells[sel][:, None, :] + off[None]).reshape(-1, 3)
            cells_p.append(c)
            own_p.append(np.repeat(owner[sel], len(off)))
        cells, own = np.concatenate(cells_p), np.concatenate(own_p)
        keep = np.all((cells >= 0) & (cells < self._shape_a), axis=1)
        return cells[keep] @ self._strides, own[keep]

    def _ball(self, q: int) -> np.ndarray:
        off = self._offsets.get(q)
        if off is None:
            h = int(math.ceil(q / 4.0))
            ax = np.arange(-h, h + 1)
            cube = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
            off = cube[(cube**2).sum(1) <= (q / 4.0) ** 2]
            self._offsets[q] = off
        return off

    def free_at(self, point: np.ndarray) -> bool:
        """A cheap first test: the cell at `point` is neither hard nor soft."""
        c = tuple(np.clip(np.round(point / GRID_NM).astype(int), 0, self._shape_a - 1))
        return not (self.hard[c] or self.soft[c])

    def hits(self, lobes: np.ndarray, soft: bool = False) -> bool:
        # Labelled objects are marked padded by the cell half-diagonal and tested padded by the
        # gap, so any true overlap shares a cell that is both marked and tested.
        if self.hard.reshape(-1)[self._cells(lobes, GAP_NM)].any():
            return True
        if soft:
            core = lobes * np.array([1, 1, 1, 0.85])
            return bool(self.soft.reshape(-1)[self._cells(core, 0.0)].any())
        return False

    def in_lumen(self, points: np.ndarray) -> bool:
        idx = np.clip(np.round(points / LUMEN_GRID_NM).astype(int), 0,
                      np.array(self.lumen.shape) - 1)
        return bool(np.any(self.lumen[idx[:, 0], idx[:, 1], idx[:, 2]]))

    def mark(self, lobes: np.ndarray, soft: bool = False) -> int:
        """Mark lobes (hard: labelled; soft: a distractor's core); returns the number of cells
        inside the union (its volume in nm^3)."""
        if soft:
            core = lobes * np.array([1, 1, 1, 0.85])
            self.soft.reshape(-1)[self._cells(core, 0.0)] = True
            return int(np.unique(self._cells(lobes, 0.0)).size)
        self.hard.reshape(-1)[self._cells(lobes, 0.87 * GRID_NM)] = True
        return int(np.unique(self._cells(lobes, 0.0)).size)

    def mark_long(self, lobes: np.ndarray) -> None:
        """Mark many lobes (filaments) in chunks, so temporaries stay small."""
        for i in range(0, len(lobes), 64):
            self.mark(lobes[i: i + 64])

    def hits_long(self, lobes: np.ndarray) -> bool:
        return any(self.hits(lobes[i: i + 64]) for i in range(0, len(lobes), 64))

    def mark_band(self, sdf: Callable[[np.ndarray], np.ndarray], half_nm: float) -> None:
        """Mark the cells within `half_nm` of a surface, via a coarse pass then a fine one."""
        for sl, u in _band_cells(sdf, self.shape, GRID_NM, half_nm + 0.87 * GRID_NM):
            self.hard[sl] |= np.abs(u) <= half_nm + 0.87 * GRID_NM

    def mark_lumen(self, m: Membrane, inset_nm: float) -> None:
        n = self.lumen.shape
        axes = [np.arange(k) * LUMEN_GRID_NM for k in n]
        c = np.round(m.centre / LUMEN_GRID_NM).astype(int)
        reach = int(math.ceil(m.radius_nm * float(m.scale.max()) / LUMEN_GRID_NM)) + 1
        lo = np.maximum(c - reach, 0)
        hi = np.minimum(c + reach + 1, n)
        if np.any(hi <= lo):
            return
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        p = np.stack(np.meshgrid(*[ax[s] for ax, s in zip(axes, sl, strict=True)],
                                 indexing="ij"), axis=-1)
        self.lumen[sl] |= m.sdf(p) < -inset_nm


def _band_cells(sdf: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...], step_nm: float,
                band_nm: float, block: int = 8):
    """Yield (slices, sdf values) for grid blocks that may lie within `band_nm` of the surface.

    The block centres are tested first (a signed distance changes by at most the distance
    moved, times 1.5 to allow for approximate ones), then whole blocks are evaluated.
    """
    nb = [int(math.ceil(n / block)) for n in shape]
    centres = np.stack(np.meshgrid(*[(np.arange(k) * block + (block - 1) / 2) * step_nm
                                     for k in nb], indexing="ij"), axis=-1)
    half_diag = block * step_nm * math.sqrt(3) / 2
    near = np.abs(sdf(centres)) < band_nm + 1.5 * half_diag
    for bz, by, bx in np.argwhere(near):
        sl = tuple(slice(int(b * block), int(min((b + 1) * block, n)))
                   for b, n in zip((bz, by, bx), shape, strict=True))
        p = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) * step_nm for s in sl],
                                 indexing="ij"), axis=-1)
        yield sl, sdf(p)


# --- builders --------------------------------------------------------------------------------

class _Builder:
    def __init__(self, extent_nm: np.ndarray, params: SpecimenParams,
                 rng: np.random.Generator) -> None:
        self.extent = np.asarray(extent_nm, dtype=np.float64)
        self.p = params
        self.rng = rng
        tx, ty = math.radians(params.slab_tilt_x_deg), math.radians(params.slab_tilt_y_deg)
        normal = _unit(np.array([1.0, math.tan(tx), math.tan(ty)]))
        centre = self.extent / 2 + np.array([params.slab_offset_nm, 0.0, 0.0])
        self.slab = Slab(normal, centre, params.thickness_nm)
        self.occ = _Occupancy(self.extent)
        self.model = SpecimenModel(self.extent, params, self.slab, None)
        self.protein_v = params.potential_v(params.protein_g_cm3)
        self.crowd_nm3 = 0.0
        # Distractor templates: a few dozen variants of every shape, drawn once per specimen
        # and then placed in random orientations (drawing each of ~10^4 objects anew is slow).
        self.templates = [_distractor_shape(rng, (kind,)) for kind in DISTRACTOR_KINDS
                          for _ in range(24)]
        self.template_extent = np.array([_extent(lb) for _, lb in self.templates])
        self.template_v = np.array([self._distractor_potential_v() for _ in self.templates])

    def _distractor_potential_v(self) -> float:
        """Plain protein, or (a `dense_distractor_fraction` of them) a nucleoprotein's density."""
        p = self.p
        # No draw when off: the same seed then gives the same specimen as before the option.
        if p.dense_distractor_fraction > 0 and self.rng.random() < p.dense_distractor_fraction:
            return p.potential_v(float(self.rng.uniform(*p.dense_distractor_g_cm3)))
        return self.protein_v

    def template(self, kinds: tuple[str, ...], min_extent_nm: float = 0.0,
                 max_extent_nm: float = math.inf) -> tuple[str, np.ndarray, float]:
        """A random template of one of `kinds`: (kind, lobes, potential in V)."""
        ok = [i for i, (k, _) in enumerate(self.templates) if k in kinds
              and min_extent_nm <= self.template_extent[i] <= max_extent_nm]
        if not ok:
            lobes = np.array([[0.0, 0.0, 0.0, min(4.0, max_extent_nm / 2 - 0.2)]])
            return "globule", lobes, self.protein_v
        i = ok[int(self.rng.integers(len(ok)))]
        return (*self.templates[i], float(self.template_v[i]))

    # placement primitives

    def inside(self, lobes: np.ndarray, margin: float = 1.0) -> bool:
        """All lobes within the slab and with centres in the box."""
        d = self.slab.depth(lobes[:, :3])
        if np.any(np.abs(d) + lobes[:, 3] > self.slab.thickness_nm / 2 - margin):
            return False
        return True

    def random_point(self, pad_nm: float = 0.0) -> np.ndarray:
        """A point in the box and in the slab (rejection on the slab)."""
        for _ in range(50):
            p = self.rng.random(3) * self.extent
            if abs(float(self.slab.depth(p))) < self.slab.thickness_nm / 2 - pad_nm:
                return p
        return self.extent / 2

    def count(self, kind: str, n: int = 1) -> None:
        self.model.counts[kind] = self.model.counts.get(kind, 0) + n

    def add_blob(self, blob: Blob, soft: bool = False, check_lumen: bool = True) -> bool:
        if check_lumen and self.occ.in_lumen(blob.lobes[:, :3]):
            return False
        if self.occ.hits(blob.lobes, soft=soft):
            return False
        vol = self.occ.mark(blob.lobes, soft=soft)
        if blob.label in (0, RIBOSOME) and blob.kind != "membrane protein":
            self.crowd_nm3 += vol
        self.model.blobs.append(blob)
        self.count(blob.kind)
        return True

    # membranes

    def membranes(self) -> None:
        p, rng, ext = self.p, self.rng, self.extent
        half = p.bilayer_nm / 2
        volume_um3 = self.cytosol_volume_um3()
        placed: list[Membrane] = []
        # Large membranes per ~300 x 300 nm of field of view, at most the drawn numbers (a
        # small box crossed by three of them would have room for nothing else).
        room = max(1, int(ext[1] * ext[2] / 300.0**2))
        for _ in range(min(p.envelopes, room)):  # nuclear envelope / mitochondrion: two membranes
            r = rng.uniform(150.0, 1000.0)
            gap = rng.uniform(15.0, 40.0)  # perinuclear space 20-50 nm; mitochondria ~10-20 nm
            direction = _unit(rng.normal(size=3) * np.array([0.3, 1.0, 1.0]))
            c = self.random_point() + direction * (r - rng.uniform(0.1, 0.4) * ext[1])
            for radius in (r, r - gap):
                placed.append(Membrane("sphere", c, radius))
            self.count("envelope")
        # ER sheets, plasma membrane: large radius, nearly flat.
        for _ in range(min(p.sheets, max(0, room - min(p.envelopes, room)))):
            r = float(rng.choice([rng.uniform(300.0, 1500.0), 20000.0]))
            direction = _unit(rng.normal(size=3) * np.array([0.25, 1.0, 1.0]))
            placed.append(Membrane("sphere", self.random_point() + direction * r, r))
            self.count("sheet")
        for _ in range(min(p.tubes, room)):  # ER tubules 30-100 nm diameter
            axis = _unit(rng.normal(size=3) * np.array([0.3, 1.0, 1.0]))
            placed.append(Membrane("cylinder", self.random_point(), rng.uniform(15.0, 50.0),
                                   axis=axis))
            self.count("tube")
        for m in placed:
            if self._membrane_hits(m):
                continue
            self._add_membrane(m, half)
        n_ves = max(1, int(rng.poisson(p.vesicles_per_um3 * volume_um3)))
        for _ in range(n_ves * 10):
            if self.model.counts.get("vesicle", 0) >= n_ves:
                break
            r = float(np.exp(rng.uniform(math.log(10.0), math.log(150.0))))  # 20-300 nm
            # A vesicle fits the slab and leaves most of a small box to the cytosol.
            r = min(r, max(10.0, 0.45 * self.slab.thickness_nm),
                    max(10.0, 0.3 * float(ext[1:].max())))
            scale = rng.uniform(0.85, 1.15, 3)
            c = self.random_point(pad_nm=0.5 * r)
            m = Membrane("sphere", c, r, scale=scale / scale.mean())
            if self._membrane_hits(m):
                continue
            self._add_membrane(m, half)
            if r < 150.0:
                self.occ.mark_lumen(m, half + 2.0)
            self.count("vesicle")

    def _membrane_hits(self, m: Membrane) -> bool:
        half = self.p.bilayer_nm / 2 + GAP_NM
        for sl, u in _band_cells(m.sdf, self.occ.shape, GRID_NM, half):
            if np.any(self.occ.hard[sl][np.abs(u) <= half]):
                return True
        if m.kind == "sphere" and self.occ.in_lumen(m.centre[None]):
            return True  # no vesicle inside another vesicle's lumen
        return False

    def _add_membrane(self, m: Membrane, half: float) -> None:
        self.occ.mark_band(m.sdf, half)
        self.model.membranes.append(m)
        if self.rng.random() < self.p.membrane_protein_fraction:
            self._membrane_proteins(m)

    def _membrane_proteins(self, m: Membrane) -> None:
        """Transmembrane proteins with soluble domains on either side (labelled 0)."""
        rng = self.rng
        area_guess = float(self.extent[1] * self.extent[2])
        n = int(rng.integers(5, 40) * max(1.0, area_guess / 512.0**2))
        for _ in range(n * 3):
            if n <= 0:
                break
            q = self.random_point()
            # Project a random point onto the surface along the normal (two Newton steps).
            for _ in range(2):
                q = q - m.sdf(q) * m.normal(q)
            if np.any(q < 0) or np.any(q > self.extent) or not self.inside(
                    np.append(q, 0.0)[None], 0.0):
                continue
            nrm = m.normal(q) * (1 if rng.random() < 0.5 else -1)
            lobes = _membrane_protein(rng, self.p.bilayer_nm / 2)
            frame = _frame_from(nrm, rng)
            placed = np.concatenate([q + lobes[:, :3] @ frame.T, lobes[:, 3:]], axis=1)
            soluble = placed[lobes[:, 0] > self.p.bilayer_nm / 2 + 1.0]
            if len(soluble) and self.occ.hits(soluble):
                continue
            if len(soluble):
                self.occ.mark(soluble)
            pot = np.full(len(placed), self.protein_v) * rng.uniform(0.95, 1.05, len(placed))
            self.model.blobs.append(Blob(placed, pot, 0, "membrane protein"))
            self.count("membrane protein")
            n -= 1

    # filaments

    def filaments(self) -> None:
        p, rng = self.p, self.rng
        area_um2 = float(self.extent[1] * self.extent[2]) / 1e6
        n_mt = max(1, int(rng.poisson(p.microtubules_per_um2 * area_um2)))
        n_actin = max(2, int(rng.poisson(p.actin_per_um2 * area_um2)))
        self._place_filaments(MICROTUBULE, n_mt, p.mt_bundle_p, (2, 6), (30.0, 55.0),
                              p.mt_steep_p, (3e3, 3e4), MT_OUTER_NM)
        self._place_filaments(ACTIN, n_actin, p.actin_bundle_p, (3, 12), (9.0, 14.0),
                              0.15, (5e2, 1e4), ACTIN_RADIUS_NM)

    def _place_filaments(self, label: int, n: int, bundle_p: float, bundle_size: tuple[int, int],
                         spacing_nm: tuple[float, float], steep_p: float,
                         persistence_nm: tuple[float, float], radius_nm: float) -> None:
        rng = self.rng
        name = "microtubule" if label == MICROTUBULE else "actin"
        placed = 0
        for _ in range(n * 15):
            if placed >= n:
                break
            members = int(rng.integers(*bundle_size, endpoint=True)) \
                if rng.random() < bundle_p else 1
            members = min(members, n - placed) if placed + 1 < n else members
            # The first of each kind lies roughly in the plane, so that even a thin box has one.
            line = self._centre_line(steep_p if placed else 0.0, persistence_nm, radius_nm,
                                     label, middle=placed == 0)
            if line is None:
                continue
            lines = [line] if members == 1 else self._bundle(line, members,
                                                             rng.uniform(*spacing_nm))
            for pts in lines:
                pts = self._free_run(pts, radius_nm)
                if pts is None:
                    continue
                lobes = np.concatenate([pts[::3], np.full((len(pts[::3]), 1), radius_nm)],
                                       axis=1)
                self.occ.mark_long(lobes)
                phase = float(rng.uniform(0, 2 * math.pi))
                self.model.filaments.append(Filament(label, pts, phase))
                placed += 1
                self.count(name)

    def _free_run(self, pts: np.ndarray, radius_nm: float, min_nm: float = 40.0
                  ) -> np.ndarray | None:
        """The line if it collides with nothing; else its longest collision-free stretch (a
        filament that ends where it meets a membrane or a particle), if long enough."""
        lobes = np.concatenate([pts[::3], np.full((len(pts[::3]), 1), radius_nm)], axis=1)
        if not self.occ.hits_long(lobes):
            return pts
        free = np.array([not self.occ.hits(lobes[i:i + 1]) for i in range(len(lobes))])
        best, start, best_range = 0, None, None
        for i, ok in enumerate(np.append(free, False)):
            if ok and start is None:
                start = i
            elif not ok and start is not None:
                if i - start > best:
                    best, best_range = i - start, (start, i)
                start = None
        if best_range is None or best * 3 < min_nm:
            return None
        # Drop one lobe at each end: the neighbours of a hit are within reach of it.
        a, b = best_range[0] + 1, best_range[1] - 1
        if (b - a) * 3 < min_nm:
            return None
        return pts[a * 3: b * 3]

    def _centre_line(self, steep_p: float, persistence_nm: tuple[float, float],
                     radius_nm: float, label: int, middle: bool = False) -> np.ndarray | None:
        """A worm-like chain through a random point, clipped to the box and the slab."""
        rng = self.rng
        if rng.random() < steep_p:
            elev = math.radians(rng.uniform(35.0, 85.0))  # steep to z
        else:
            elev = math.radians(rng.uniform(-5.0, 5.0) if middle else rng.uniform(-20.0, 20.0))
        az = rng.uniform(0, 2 * math.pi)
        d0 = np.array([math.sin(elev), math.cos(elev) * math.sin(az),
                       math.cos(elev) * math.cos(az)])
        lp = float(np.exp(rng.uniform(*np.log(persistence_nm))))
        step = 1.0
        half_len = float(np.linalg.norm(self.extent))
        if label == ACTIN:
            half_len = min(half_len, rng.uniform(50.0, 500.0))  # actin ends in view
        elif rng.random() < 0.3:
            half_len = rng.uniform(50.0, half_len)  # a microtubule end inside the view
        start = self.random_point(pad_nm=radius_nm)
        if middle:  # centred in z within the box and the slab
            lo = max(radius_nm, self.slab.centre[0] - self.slab.thickness_nm / 2 + radius_nm)
            hi = min(self.extent[0] - radius_nm,
                     self.slab.centre[0] + self.slab.thickness_nm / 2 - radius_nm)
            start[0] = rng.uniform(lo, hi) if hi > lo else self.extent[0] / 2
            if label == ACTIN:
                half_len = max(half_len, 0.4 * float(self.extent[1:].min()))
        sides = []
        for sign in (1.0, -1.0):
            d, pts, q = d0 * sign, [], start.copy()
            for _ in range(int(half_len / step)):
                d = _unit(d + rng.normal(scale=math.sqrt(2 * step / lp), size=3))
                q = q + step * d
                pts.append(q)
                if np.any(q < -radius_nm) or np.any(q > self.extent + radius_nm) or \
                        abs(float(self.slab.depth(q))) > self.slab.thickness_nm / 2 + radius_nm:
                    break
            sides.append(np.array(pts) if pts else np.zeros((0, 3)))
        pts = np.concatenate([sides[1][::-1], start[None], sides[0]])
        if len(pts) < 15:
            return None
        return pts

    def _bundle(self, line: np.ndarray, members: int, spacing: float) -> list[np.ndarray]:
        """Parallel copies on a hexagonal lattice around the centre line (parallel-transported)."""
        _, _, n, b = _frames(line)
        lattice = [(0.0, 0.0)]
        ring = 1
        while len(lattice) < members:
            for k in range(6 * ring):
                a = 2 * math.pi * k / (6 * ring)
                lattice.append((ring * math.cos(a), ring * math.sin(a)))
            ring += 1
        jitter = self.rng.normal(scale=0.05, size=(members, 2))
        return [line + spacing * ((u + ju) * n + (v + jv) * b)
                for (u, v), (ju, jv) in zip(lattice[:members], jitter, strict=True)]

    # particles

    def ribosomes(self, minimum_only: bool = False) -> None:
        p, rng = self.p, self.rng
        target = max(3, int(rng.poisson(p.ribosomes_per_um3 * self.cytosol_volume_um3())))
        if minimum_only:  # a few first, so that filaments cannot crowd them out of a small box
            target = 3
        target -= self.model.counts.get("ribosome", 0)
        pot = p.potential_v(p.ribosome_g_cm3)
        placed, tries = 0, 0
        while placed < target and tries < target * 40:
            tries += 1
            chain = int(rng.integers(3, 9)) if rng.random() < p.polysome_p and \
                not minimum_only else 1
            start = self.random_point(pad_nm=15.0)
            rot = _random_rotation(rng)
            step_rot = _random_rotation(rng) if chain > 1 else None
            direction = _unit(rng.normal(size=3))
            q = start
            for _ in range(min(chain, target - placed)):
                blob = _ribosome(rng, q, rot, pot)
                if self.inside(blob.lobes) and np.all(q >= 0) and np.all(q <= self.extent) \
                        and self.add_blob(blob):
                    _recentre(blob)  # < 1 nm, within the clearance just checked
                    placed += 1
                elif chain > 1:
                    break
                if step_rot is not None:
                    # Polysomes: neighbours ~30 nm apart with a roughly constant relative
                    # orientation (a helical or planar chain on the mRNA).
                    rot = _small_rotation(rng, 25.0) @ rot
                    direction = _unit(direction + rng.normal(scale=0.3, size=3))
                    q = q + direction * rng.uniform(27.0, 33.0)
        if placed < target and not minimum_only:
            self.count("ribosome_missing", target - placed)

    def gold(self) -> None:
        p, rng = self.p, self.rng
        area_um2 = float(self.extent[1] * self.extent[2]) / 1e6
        target = max(3, int(rng.poisson(p.gold_per_um2 * area_um2)))
        r0 = p.gold_diameter_nm / 2
        min_inside = 2
        placed = inside_box = 0
        for _ in range(target * 40):
            if placed >= target:
                break
            r = r0 * rng.uniform(0.93, 1.07)
            on_surface = rng.random() > p.gold_inside_p and inside_box >= min_inside
            q = self.random_point(pad_nm=r + 1.0)
            if on_surface:
                side = 1.0 if rng.random() < 0.5 else -1.0
                q = q + self.slab.normal * (side * (self.slab.thickness_nm / 2 + r * rng.uniform(
                    -0.6, 1.0)) - float(self.slab.depth(q)))
            lobes = np.array([[*q, r]])
            if np.any(q < 0) or np.any(q > self.extent):
                continue
            if not on_surface and not self.inside(lobes):
                continue
            blob = Blob(lobes, np.array([p.gold_mip_v]), GOLD, "gold", q.copy())
            if self.add_blob(blob, check_lumen=False):
                placed += 1
                inside_box += 1

    def contamination(self) -> None:
        rng = self.rng
        for _ in range(self.p.contamination):  # ice crystals sitting on a surface
            r = rng.uniform(10.0, 60.0)
            q = self.rng.random(3) * self.extent
            side = 1.0 if rng.random() < 0.5 else -1.0
            q = q + self.slab.normal * (side * (self.slab.thickness_nm / 2 + 0.7 * r)
                                        - float(self.slab.depth(q)))
            lobes = np.array([[*q, r], *[[*(q + _unit(rng.normal(size=3)) * r * 0.6),
                                          r * rng.uniform(0.4, 0.7)] for _ in range(3)]])
            blob = Blob(lobes, np.full(4, self.p.ice_mip_v), 0, "contamination")
            if not self.occ.hits(lobes):
                self.occ.mark(lobes)
                self.model.blobs.append(blob)
                self.count("contamination")

    def distractors(self, progress: Progress | None) -> None:
        """Crowd the cytosol with distractor shapes until the volume fraction is reached.

        Large shapes (> 16 nm) go first, one by one (random sequential placement); then
        medium and small ones on jittered lattices (20 nm, then 10 nm cells) whose objects fit
        their cells, so the objects of one lattice cannot collide with each other and a whole
        batch is tested against the occupancy grid in one vectorised pass.
        """
        rng = self.rng
        cyt_nm3 = self.cytosol_volume_um3() * 1e9
        want = self.p.crowding * cyt_nm3
        big_want = self.crowd_nm3 + 0.25 * want
        tries = 0
        while self.crowd_nm3 < big_want and tries < 40 + int(big_want / 1000.0):
            tries += 1
            kind, lobes, potential_v = self.template(LARGE_KINDS, min_extent_nm=16.0)
            q = self.random_point(pad_nm=2.0)
            if not self.occ.free_at(q):
                continue
            lobes = np.concatenate([q + lobes[:, :3] @ _random_rotation(rng).T, lobes[:, 3:]],
                                   axis=1)
            if self.inside(lobes, 0.5):
                factor = rng.uniform(0.95, 1.05) * rng.uniform(0.97, 1.03, len(lobes))
                self.add_blob(Blob(lobes, potential_v * factor, 0, kind), soft=True)
        if progress is not None:
            progress("specimen", 0.5)
        for cell_nm, kinds in ((20.0, MEDIUM_KINDS), (10.0, SMALL_KINDS), (20.0, MEDIUM_KINDS),
                               (10.0, SMALL_KINDS), (8.0, SMALL_KINDS)):
            self._lattice_fill(cell_nm, want, kinds)
            if progress is not None:
                progress("specimen", 0.75)
        self.model.crowding_achieved = self.crowd_nm3 / max(cyt_nm3, 1.0)

    def _lattice_fill(self, cell_nm: float, want_nm3: float, kinds: tuple[str, ...]) -> None:
        rng = self.rng
        axes = [np.arange(rng.uniform(0, cell_nm), e, cell_nm) for e in self.extent]
        sites = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        sites = sites[np.abs(self.slab.depth(sites)) < self.slab.thickness_nm / 2 - 3.0]
        sites = sites[rng.permutation(len(sites))]
        for b0 in range(0, len(sites), 2000):
            if self.crowd_nm3 >= want_nm3:
                return
            objs = []
            allowed = [i for i, (k, _) in enumerate(self.templates)
                       if k in kinds and self.template_extent[i] <= cell_nm - 1.0]
            for q in sites[b0: b0 + 2000]:
                t = allowed[int(rng.integers(len(allowed)))]
                kind, lobes = self.templates[t]
                ext = self.template_extent[t]
                q = q + rng.uniform(-0.5, 0.5, 3) * max(0.0, cell_nm - 1.0 - ext)
                lobes = np.concatenate([q + lobes[:, :3] @ _random_rotation(rng).T,
                                        lobes[:, 3:]], axis=1)
                objs.append((kind, lobes, float(self.template_v[t])))
            ok = self._batch_free([(kind, lobes) for kind, lobes, _ in objs])
            kept = [o for o, good in zip(objs, ok, strict=True) if good]
            if not kept:
                continue
            vols = self._batch_mark([(kind, lobes) for kind, lobes, _ in kept])
            cum = self.crowd_nm3 + np.cumsum(vols)
            n_take = int(np.searchsorted(cum, want_nm3)) + 1  # stop once the target is met
            for (kind, lobes, potential_v), vol in zip(kept[:n_take], vols[:n_take],
                                                       strict=False):
                factor = rng.uniform(0.95, 1.05) * rng.uniform(0.97, 1.03, len(lobes))
                self.model.blobs.append(Blob(lobes, potential_v * factor, 0, kind))
                self.count(kind)
                self.crowd_nm3 += float(vol)

    def _batch_mark(self, objs: list[tuple[str, np.ndarray]]) -> np.ndarray:
        """Mark the cores of non-overlapping objects; returns each one's volume (nm^3)."""
        lobes = np.concatenate([lb for _, lb in objs])
        ids = np.concatenate([np.full(len(lb), i) for i, (_, lb) in enumerate(objs)])
        occ = self.occ
        cells, _ = occ.cells_with_owner(lobes * np.array([1, 1, 1, 0.85]), 0.0, ids)
        occ.soft.reshape(-1)[cells] = True
        cells, owner = occ.cells_with_owner(lobes, 0.0, ids)
        key = np.unique(owner.astype(np.int64) * occ.hard.size + cells)
        return np.bincount(key // occ.hard.size, minlength=len(objs)) * GRID_NM**3

    def _batch_free(self, objs: list[tuple[str, np.ndarray]]) -> np.ndarray:
        """For objects that cannot overlap each other: which are clear of everything placed,
        inside the slab and outside vesicle lumens."""
        lobes = np.concatenate([lb for _, lb in objs])
        ids = np.concatenate([np.full(len(lb), i) for i, (_, lb) in enumerate(objs)])
        n = len(objs)
        bad = np.zeros(n, dtype=bool)
        depth_bad = np.abs(self.slab.depth(lobes[:, :3])) + lobes[:, 3] > \
            self.slab.thickness_nm / 2 - 0.5
        bad[ids[depth_bad]] = True
        li = np.clip(np.round(lobes[:, :3] / LUMEN_GRID_NM).astype(int), 0,
                     np.array(self.occ.lumen.shape) - 1)
        bad[ids[self.occ.lumen[li[:, 0], li[:, 1], li[:, 2]]]] = True
        occ = self.occ
        for grid, pad, scale in ((occ.hard, GAP_NM, 1.0), (occ.soft, 0.0, 0.85)):
            cells, owner = occ.cells_with_owner(lobes * np.array([1, 1, 1, scale]), pad, ids)
            bad[owner[grid.reshape(-1)[cells]]] = True
        return ~bad

    def carbon(self) -> None:
        if not self.p.carbon_edge:
            return
        rng = self.rng
        angle = rng.uniform(0, 2 * math.pi)
        self.model.carbon = {
            "direction_yx": [math.sin(angle), math.cos(angle)],
            "offset_nm": float(rng.uniform(0.25, 0.75) * min(self.extent[1:])),
            "side": float(rng.choice([-1.0, 1.0])),
            "thickness_nm": self.p.carbon_thickness_nm,
            "potential_v": self.p.potential_v(rng.uniform(1.8, 2.2)),  # amorphous carbon
        }

    def cytosol_volume_um3(self) -> float:
        if not hasattr(self, "_cyt"):
            axes = [np.arange(n) * LUMEN_GRID_NM for n in self.occ.lumen.shape]
            p = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
            inside = (np.abs(self.slab.depth(p)) < self.slab.thickness_nm / 2) & np.all(
                p <= self.extent, axis=-1)
            self._cyt_mask = inside
            self._cyt = float(inside.sum()) * LUMEN_GRID_NM**3 / 1e9
        free = self._cyt_mask & ~self.occ.lumen
        return float(free.sum()) * LUMEN_GRID_NM**3 / 1e9


def _frame_from(normal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Columns: normal (local z), two perpendicular directions, randomly spun."""
    a = _unit(np.cross(normal, rng.normal(size=3)))
    b = np.cross(normal, a)
    return np.stack([normal, a, b], axis=1)


def _small_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    axis = _unit(rng.normal(size=3))
    a = math.radians(rng.uniform(0, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


def _membrane_protein(rng: np.random.Generator, half_nm: float) -> np.ndarray:
    """Lobes in a local frame whose first axis is the membrane normal."""
    kind = int(rng.integers(0, 3))
    tm = [[0.0, 0.0, 0.0, rng.uniform(1.8, 3.5)]]
    if kind == 0:  # single-pass receptor with a globular ectodomain
        r = rng.uniform(2.5, 4.5)
        return np.array(tm + [[half_nm + 1.5 + r, 0, 0, r]])
    if kind == 1:  # ATP-synthase-like: stalk and a large head ~10 nm off the membrane
        r = rng.uniform(4.0, 5.5)
        return np.array(tm + [[half_nm + 2.0, 0, 0, 1.5], [half_nm + 4.0, 0, 0, 1.5],
                              [half_nm + 6.0 + r, 0, 0, r]])
    r = rng.uniform(2.0, 3.0)  # channel / transporter: caps on both sides
    return np.array(tm + [[half_nm + 1.0 + r, 1.5, 0, r], [-(half_nm + 1.0 + r), -1.5, 0, r]])


def _ribosome(rng: np.random.Generator, centre: np.ndarray, rot: np.ndarray,
              potential_v: float) -> Blob:
    """Large (~24 nm) and small (~20 x 12 nm) subunits, bumpy, centroid at `centre`."""
    large_r = rng.uniform(7.5, 8.5)
    lobes = [[0.0, 0.0, 0.0, large_r]]
    for d in _unit(rng.normal(size=(int(rng.integers(10, 15)), 3))):
        lobes.append([*(d * rng.uniform(4.0, 6.5) * np.array([0.9, 1.0, 1.1])),
                      rng.uniform(3.5, 5.0)])
    offset = rng.uniform(10.5, 12.5)
    for t in np.linspace(-1, 1, int(rng.integers(5, 8))):  # elongated small subunit
        lobes.append([offset + rng.normal(scale=0.5), 8.0 * t, 1.5 * t * t,
                      rng.uniform(3.5, 4.5)])
    lobes_a = np.array(lobes)
    # Centred on the volume-weighted lobe centre; `recentre` moves it to the exact centroid of
    # the body once a placement is accepted (the particle table gives the body's centroid).
    weights = lobes_a[:, 3] ** 3
    lobes_a[:, :3] -= (weights @ lobes_a[:, :3]) / weights.sum()
    placed = np.concatenate([centre + lobes_a[:, :3] @ rot.T, lobes_a[:, 3:]], axis=1)
    pot = potential_v * rng.uniform(0.95, 1.05, len(placed))
    return Blob(placed, pot, RIBOSOME, "ribosome", centre.copy())


def _recentre(blob: Blob) -> None:
    """Shift a blob so that its body's centroid is exactly its centre (sub-nm move)."""
    blob.lobes[:, :3] += blob.centre - _union_centroid(blob.lobes)


def _union_centroid(lobes: np.ndarray, step_nm: float = 0.75) -> np.ndarray:
    lo = (lobes[:, :3] - lobes[:, 3:]).min(axis=0)
    hi = (lobes[:, :3] + lobes[:, 3:]).max(axis=0)
    axes = [np.arange(a, b + step_nm, step_nm) for a, b in zip(lo, hi, strict=True)]
    p = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    inside = np.zeros(p.shape[:3], dtype=bool)
    for z, y, x, r in lobes:
        inside |= ((p - [z, y, x]) ** 2).sum(-1) <= r * r
    return p[inside].mean(axis=0)


DISTRACTOR_KINDS = ("globule", "dimer", "tetramer", "chaperonin", "proteasome20S",
                    "proteasome26S", "hexamer ring", "rod", "cage", "three-arm", "large complex",
                    "helical oligomer", "dumbbell")


def _extent(lobes: np.ndarray) -> float:
    """Diameter of the ball around the origin that holds every lobe."""
    return 2.0 * float((np.linalg.norm(lobes[:, :3], axis=1) + lobes[:, 3]).max())


SMALL_KINDS = ("globule", "dimer", "tetramer")
MEDIUM_KINDS = ("globule", "dimer", "tetramer", "chaperonin", "proteasome20S", "hexamer ring",
                "cage", "three-arm", "rod")
LARGE_KINDS = ("proteasome26S", "rod", "cage", "large complex", "helical oligomer", "dumbbell")


def _distractor_shape(rng: np.random.Generator, kinds: tuple[str, ...]
                      ) -> tuple[str, np.ndarray]:
    """One of 13 procedural macromolecule shapes (5-35 nm), lobes centred on the origin.

    """
    kind = kinds[int(rng.integers(len(kinds)))]
    u = rng.uniform
    if kind == "globule":  # 5-9 nm
        lobes = np.array([[0, 0, 0, u(2.5, 4.5)]])
    elif kind == "dimer":
        r = u(2.5, 4.0)
        lobes = np.array([[0, 0, -0.8 * r, r], [0, 0, 0.8 * r, r * u(0.7, 1.0)]])
    elif kind == "tetramer":
        r = u(2.5, 3.5)
        lobes = np.concatenate([fibonacci_sphere(4) * r * 0.9, np.full((4, 1), r)], axis=1)
    elif kind == "chaperonin":  # GroEL/TRiC-like: two heptameric rings, ~15 x 15 nm, hollow
        r = u(2.4, 2.8)
        lobes = np.concatenate([_ring(7, 5.2, r, -3.5), _ring(7, 5.2, r, 3.5, math.pi / 7)])
    elif kind == "proteasome20S":  # four heptameric rings: 11 x 15 nm barrel
        lobes = np.concatenate([_ring(7, 4.0, 2.2, z) for z in (-5.7, -1.9, 1.9, 5.7)])
    elif kind == "proteasome26S":  # 20S core with one or two regulatory caps: up to ~40 nm
        core = [_ring(7, 4.0, 2.2, z) for z in (-5.7, -1.9, 1.9, 5.7)]
        caps = [np.array([[s * 11.0 + rng.normal(scale=1.0), *rng.normal(scale=2.5, size=2),
                           u(2.5, 4.0)] for _ in range(6)])
                for s in ((-1, 1) if rng.random() < 0.5 else (1,))]
        lobes = np.concatenate(core + caps)
    elif kind == "hexamer ring":  # AAA+ (p97-like) double hexamer, ~13 nm
        lobes = np.concatenate([_ring(6, 4.5, 2.6, -2.5), _ring(6, 4.5, 2.6, 2.5)])
    elif kind == "rod":  # coiled-coil / short filament piece 15-35 nm
        r, n = u(1.2, 2.2), int(rng.integers(5, 12))
        z = (np.arange(n) - (n - 1) / 2) * 1.4 * r * 1.6
        lobes = np.stack([z, rng.normal(scale=0.3, size=n), np.zeros(n), np.full(n, r)], 1)
    elif kind == "cage":  # ferritin / encapsulin-like hollow shell, 12-24 nm
        radius = u(5.0, 10.0)
        n = int(4 * math.pi * radius**2 / 12.0)
        lobes = np.concatenate([fibonacci_sphere(n) * radius, np.full((n, 1), 2.0)], axis=1)
    elif kind == "three-arm":  # antibody / clathrin-triskelion-like, ~15 nm
        arms = [[0, 0, 0, 2.2]]
        for a in (0.0, 2.1, 4.2):
            d = np.array([0.0, math.sin(a), math.cos(a)])
            arms += [[*(d * 3.5), 2.2], [*(d * 6.5), 2.5]]
        lobes = np.array(arms)
    elif kind == "large complex":  # FAS / spliceosome-like: ribosome-sized hard negative
        n = int(rng.integers(8, 20))
        lobes = np.concatenate([rng.normal(scale=5.0, size=(n, 3)),
                                u(3.0, 5.0, (n, 1))], axis=1)
    elif kind == "helical oligomer":  # dynamin/septin-like spiral, 1-2 turns
        turns, radius = u(1.0, 2.0), u(5.0, 8.0)
        t = np.linspace(0, 2 * math.pi * turns, int(12 * turns))
        lobes = np.stack([t / (2 * math.pi) * 9.0, radius * np.sin(t), radius * np.cos(t),
                          np.full(len(t), 2.0)], 1)
    else:  # dumbbell: two domains on a linker, 20-30 nm
        length = u(14.0, 24.0)
        lobes = np.array([[0, 0, -length / 2, u(3.5, 5.0)], [0, 0, length / 2, u(3.0, 5.0)],
                          [0, 0, -length / 6, 1.5], [0, 0, length / 6, 1.5]])
    lobes = np.asarray(lobes, dtype=np.float64)
    lobes[:, :3] -= lobes[:, :3].mean(axis=0)
    return kind, lobes


def build_specimen(extent_nm: np.ndarray | tuple[float, float, float], params: SpecimenParams,
                   rng: np.random.Generator, progress: Progress | None = None) -> SpecimenModel:
    """Place everything in a box of `extent_nm` (z, y, x); deterministic for the generator."""
    b = _Builder(np.asarray(extent_nm, dtype=np.float64), params, rng)
    b.carbon()
    b.contamination()
    b.membranes()
    if progress is not None:
        progress("specimen", 0.1)
    b.ribosomes(minimum_only=True)
    b.filaments()
    b.ribosomes()
    b.gold()
    if progress is not None:
        progress("specimen", 0.3)
    b.distractors(progress)
    return b.model


# --- rendering on the voxel grid -------------------------------------------------------------

def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))


def _slab_occupancy(slab: Slab, p: np.ndarray, edge_nm: float) -> np.ndarray:
    return _sigmoid((slab.thickness_nm / 2 - np.abs(slab.depth(p))) / edge_nm)


def _block_points(sl: tuple[slice, ...], vs_nm: float) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(s.start, s.stop) * vs_nm for s in sl],
                                indexing="ij"), axis=-1)


def _render_base(model: SpecimenModel, shape: tuple[int, int, int], vs_nm: float,
                 edge_nm: float) -> np.ndarray:
    """Solvent: ice inside the slab, vacuum or ice outside, and the carbon support if any."""
    p = model.params
    slab = model.slab
    out_v = 0.0 if p.outside == "vacuum" else p.ice_mip_v
    y = np.arange(shape[1]) * vs_nm
    x = np.arange(shape[2]) * vs_nm
    yx_depth = ((y - slab.centre[1]) * slab.normal[1])[:, None] + \
        ((x - slab.centre[2]) * slab.normal[2])[None, :]
    potential = np.empty(shape, dtype=np.float32)
    carbon = model.carbon
    if carbon is not None:
        dy, dx = carbon["direction_yx"]
        in_half = _sigmoid((dy * y[:, None] + dx * x[None, :] - carbon["offset_nm"]) / edge_nm)
        c_mid = carbon["side"] * (slab.thickness_nm / 2 + carbon["thickness_nm"] / 2)
    for iz in range(shape[0]):
        depth = yx_depth + (iz * vs_nm - slab.centre[0]) * slab.normal[0]
        occ = _sigmoid((slab.thickness_nm / 2 - np.abs(depth)) / edge_nm)
        plane = p.ice_mip_v * occ + out_v * (1.0 - occ)
        if carbon is not None:
            occ_c = in_half * _sigmoid((carbon["thickness_nm"] / 2 - np.abs(depth - c_mid))
                                       / edge_nm)
            plane = plane * (1.0 - occ_c) + carbon["potential_v"] * occ_c
        potential[iz] = plane
    return potential


def _render_membrane(m: Membrane, model: SpecimenModel, potential: np.ndarray,
                     labels: np.ndarray, vs_nm: float, edge_nm: float) -> None:
    p = model.params
    half = p.bilayer_nm / 2
    h = p.head_separation_nm / 2
    sigma2 = 2 * (0.5**2 + (0.4 * vs_nm) ** 2)  # head-group layer ~1 nm wide, anti-aliased
    block = max(2, int(round(6.0 / vs_nm)))
    for sl, u in _band_cells(m.sdf, potential.shape, vs_nm, half + 3 * edge_nm, block):
        near = np.abs(u) < half + 3 * edge_nm
        if not near.any():
            continue
        slab_occ = _slab_occupancy(model.slab, _block_points(sl, vs_nm), edge_nm)
        heads = np.exp(-((u - h) ** 2) / sigma2) + np.exp(-((u + h) ** 2) / sigma2)
        v_mem = p.ice_mip_v * (p.tail_rel + (p.head_rel - p.tail_rel) * heads)
        occ = _sigmoid((half - np.abs(u)) / edge_nm) * slab_occ * near
        view = potential[sl]
        view[...] = view * (1.0 - occ) + occ * v_mem
        lab = labels[sl]
        lab[(np.abs(u) <= half) & (slab_occ > 0.5)] = MEMBRANE


def _render_filament(f: Filament, model: SpecimenModel, potential: np.ndarray,
                     labels: np.ndarray, vs_nm: float, edge_nm: float) -> None:
    """Protofilaments (microtubule) or a two-stranded helix (actin) along the centre line."""
    p = model.params
    outer = MT_OUTER_NM if f.label == MICROTUBULE else ACTIN_RADIUS_NM
    reach = outer + 3 * edge_nm
    s_arc, t, n, b = _frames(f.points)
    tree = cKDTree(f.points)
    shape = potential.shape
    block = max(2, int(round(6.0 / vs_nm)))
    lo = np.maximum(np.floor((f.points.min(0) - reach) / vs_nm).astype(int), 0)
    hi = np.minimum(np.ceil((f.points.max(0) + reach) / vs_nm).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return
    nb = np.ceil((hi - lo) / block).astype(int)
    grid = np.stack(np.meshgrid(*[np.arange(k) for k in nb], indexing="ij"), -1).reshape(-1, 3)
    centres = (lo + grid * block + (block - 1) / 2) * vs_nm
    half_diag = block * vs_nm * math.sqrt(3) / 2
    dist_c, _ = tree.query(centres, distance_upper_bound=reach + half_diag + 1.0)
    protein_v = p.potential_v(p.protein_g_cm3)
    for g in grid[np.isfinite(dist_c)]:
        a = lo + g * block
        sl = tuple(slice(int(i), int(min(i + block, e))) for i, e in zip(a, hi, strict=True))
        pts = _block_points(sl, vs_nm)
        dist, idx = tree.query(pts.reshape(-1, 3), distance_upper_bound=reach + 1.0)
        ok = np.isfinite(dist)
        if not ok.any():
            continue
        q = pts.reshape(-1, 3)[ok]
        i = idx[ok]
        v = q - f.points[i]
        along = np.einsum("ij,ij->i", v, t[i])
        vp = v - along[:, None] * t[i]
        d = np.linalg.norm(vp, axis=1)
        phi = np.arctan2(np.einsum("ij,ij->i", vp, b[i]), np.einsum("ij,ij->i", vp, n[i]))
        s = s_arc[i] + along
        open_end = ((i == 0) & (along < -0.5)) | ((i == len(f.points) - 1) & (along > 0.5))
        if f.label == MICROTUBULE:
            occ, mod, lab = _microtubule_profile(d, phi, s, f.phase, edge_nm, p.mt_label)
        else:
            occ, mod, lab = _actin_profile(d, phi, s, f.phase, edge_nm)
        slab_occ = _slab_occupancy(model.slab, q, edge_nm)
        occ = occ * slab_occ * ~open_end
        lab = lab & (slab_occ > 0.5) & ~open_end
        flat_view = potential[sl].reshape(-1)
        sub = flat_view[ok]
        flat_view[ok] = sub * (1.0 - occ) + occ * protein_v * mod
        potential[sl] = flat_view.reshape(potential[sl].shape)
        lab_view = labels[sl].reshape(-1)
        cur = lab_view[ok]
        cur[lab] = f.label
        lab_view[ok] = cur
        labels[sl] = lab_view.reshape(labels[sl].shape)


def _microtubule_profile(d: np.ndarray, phi: np.ndarray, s: np.ndarray, phase: float,
                         edge_nm: float, label_mode: str
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """13 protofilaments of ~5 nm on a 10 nm radius; 4 nm monomer / 8 nm dimer repeat
    along each, offset 0.92 nm between neighbours (the 3-start lattice)."""
    r_centre = (MT_OUTER_NM + MT_INNER_NM) / 2
    r_pf = (MT_OUTER_NM - MT_INNER_NM) / 2
    spacing = 2 * math.pi / MT_PF_COUNT
    k = np.round((phi - phase) / spacing)
    dpf2 = d * d + r_centre**2 - 2 * d * r_centre * np.cos(phi - phase - k * spacing)
    occ = _sigmoid((r_pf - np.sqrt(np.maximum(dpf2, 0.0))) / edge_nm)
    axial = s + k * 0.92
    mod = 1.0 - 0.15 * (0.5 + 0.5 * np.cos(2 * math.pi * axial / 4.0)) \
        + 0.05 * np.cos(2 * math.pi * axial / 8.0)
    if label_mode == "solid":
        lab = d <= MT_OUTER_NM
    else:
        lab = (d <= MT_OUTER_NM) & (d >= MT_INNER_NM)
    return occ, mod, lab


def _actin_profile(d: np.ndarray, phi: np.ndarray, s: np.ndarray, phase: float,
                   edge_nm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two strands (radius 2.1 nm, 1.4 nm off the axis) crossing over every ~36 nm, with
    5.5 nm subunits along each strand, staggered by half a subunit."""
    crossover = 36.0
    occ = np.zeros_like(d)
    mod = np.ones_like(d)
    for j in (0, 1):
        strand_phi = phase + math.pi * (s / crossover + j)
        dist2 = d * d + 1.4**2 - 2 * d * 1.4 * np.cos(phi - strand_phi)
        o = _sigmoid((2.1 - np.sqrt(np.maximum(dist2, 0.0))) / edge_nm)
        m = 1.0 - 0.15 * (0.5 + 0.5 * np.cos(2 * math.pi * s / 5.5 + j * math.pi))
        take = o > occ
        mod = np.where(take, m, mod)
        occ = np.maximum(occ, o)
    return occ, mod, d <= ACTIN_RADIUS_NM


def _render_blobs(blobs: list[Blob], potential: np.ndarray, labels: np.ndarray, vs_nm: float,
                  edge_nm: float) -> None:
    """All unions of spheres at once: lobes splatted with torch's scatter max.

    Objects do not overlap, so the maximum over lobes equals each object's own union. An object
    replaces the solvent in proportion to its occupancy: it adds occupancy x (its potential -
    the solvent's at its centre), which needs one extra volume, not two.
    """
    if not blobs:
        return
    lobes = np.concatenate([bl.lobes for bl in blobs])
    pot = np.concatenate([bl.potential_v for bl in blobs]).astype(np.float32)
    lab = np.concatenate([np.full(len(bl.lobes), bl.label, dtype=np.int8) for bl in blobs])
    dens_t = torch.zeros(potential.size, dtype=torch.float32)
    # The solvent (or membrane) each lobe displaces, read at its centre.
    centre_idx = np.clip(np.round(lobes[:, :3] / vs_nm).astype(int), 0,
                         np.array(potential.shape) - 1)
    solvent = potential[centre_idx[:, 0], centre_idx[:, 1], centre_idx[:, 2]]
    excess = np.maximum(pot - solvent, 0.0).astype(np.float32)
    lab_t = torch.from_numpy(labels.reshape(-1))
    k_all = np.ceil((2 * lobes[:, 3] + 6 * edge_nm) / vs_nm).astype(int) + 2
    nz, ny, nx = potential.shape
    with torch.inference_mode():
        for k in np.unique(k_all):
            sel = np.nonzero(k_all == k)[0]
            per_chunk = max(1, 4_000_000 // int(k) ** 3)
            ax = torch.arange(int(k))
            for c0 in range(0, len(sel), per_chunk):
                s = sel[c0: c0 + per_chunk]
                c = torch.from_numpy(lobes[s, :3])
                r = torch.from_numpy(lobes[s, 3].astype(np.float32))[:, None, None, None]
                i0 = torch.floor((c - torch.from_numpy(lobes[s, 3:]) - 3 * edge_nm)
                                 / vs_nm).long()
                # Separable per axis: index, validity and squared distance (n, k) each.
                idx_axes, ok_axes, d2_axes = [], [], []
                for a_, n_ in enumerate((nz, ny, nx)):
                    i = i0[:, a_:a_ + 1] + ax[None]
                    ok_axes.append((i >= 0) & (i < n_))
                    idx_axes.append(i.clamp(0, n_ - 1))
                    d2_axes.append(((i.double() * vs_nm - c[:, a_:a_ + 1]) ** 2).float())
                d2 = d2_axes[0][:, :, None, None] + d2_axes[1][:, None, :, None] \
                    + d2_axes[2][:, None, None, :]
                ok = ok_axes[0][:, :, None, None] & ok_axes[1][:, None, :, None] \
                    & ok_axes[2][:, None, None, :]
                idx = (idx_axes[0] * (ny * nx))[:, :, None, None] \
                    + (idx_axes[1] * nx)[:, None, :, None] + idx_axes[2][:, None, None, :]
                idx = idx.reshape(-1)
                dist = d2.sqrt_()
                occ = torch.sigmoid((r - dist) / edge_nm) * ok
                dens = occ * torch.from_numpy(excess[s])[:, None, None, None]
                dens_t.scatter_reduce_(0, idx, dens.reshape(-1), reduce="amax")
                if lab[s].any():
                    lab_vals = ((dist <= r) & ok) * torch.from_numpy(lab[s])[:, None, None, None]
                    lab_t.scatter_reduce_(0, idx, lab_vals.to(torch.int8).reshape(-1),
                                          reduce="amax")
    torch.from_numpy(potential.reshape(-1)).add_(dens_t)


def render_specimen(model: SpecimenModel, shape_zyx: tuple[int, int, int], voxel_size_a: float,
                    progress: Progress | None = None) -> Specimen:
    """Sample the specimen on a [z, y, x] grid of `voxel_size_a` (voxel i at i * size)."""
    vs_nm = voxel_size_a / 10.0
    edge_nm = max(0.2, 0.3 * vs_nm)  # logistic edge ~1.3 voxels 10-90 %: no aliasing
    shape = tuple(int(s) for s in shape_zyx)
    potential = _render_base(model, shape, vs_nm, edge_nm)
    labels = np.zeros(shape, dtype=np.int8)
    for m in model.membranes:
        _render_membrane(m, model, potential, labels, vs_nm, edge_nm)
    if progress is not None:
        progress("render", 0.2)
    for f in model.filaments:
        _render_filament(f, model, potential, labels, vs_nm, edge_nm)
    if progress is not None:
        progress("render", 0.5)
    _render_blobs(model.blobs, potential, labels, vs_nm, edge_nm)
    particles = [(SYNTH_CLASS_NAMES[bl.label - 1], *(float(v) for v in bl.centre[::-1] / vs_nm))
                 for bl in model.blobs if bl.label in (RIBOSOME, GOLD) and bl.centre is not None]
    filaments = []
    for f in model.filaments:
        keep = np.all((f.points >= 0) & (f.points <= model.extent_nm), axis=1) & (
            np.abs(model.slab.depth(f.points)) < model.slab.thickness_nm / 2)
        if keep.sum() >= 2:
            filaments.append((SYNTH_CLASS_NAMES[f.label - 1], f.points[keep][:, ::-1] / vs_nm))
    info = {"params": asdict(model.params), "counts": dict(model.counts),
            "crowding_achieved": round(model.crowding_achieved, 4),
            "slab_normal_zyx": [float(v) for v in model.slab.normal],
            "slab_centre_nm": [float(v) for v in model.slab.centre],
            "carbon": model.carbon}
    return Specimen(potential, labels, particles, filaments, float(voxel_size_a), info)
