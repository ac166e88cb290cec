"""Where each particle sits: its distance to the nearest membrane and to the specimen's surface,
and the compartment around it (issue 21, item 5): extra columns of the particle tables, for
picking membrane-bound ribosomes, the contents of vesicles, or leaving out particles damaged
at a lamella's surface (FIB milling damages the outer 10-20 nm) without another tool.

- `specimen_surface_distance_nm`: perpendicular distance from the particle's centre to the
  nearer surface of the specimen slab (core.specimen_mask), positive inside; NaN when the
  slab's surfaces were not found (the specimen fills the volume).

The other two are measured on the model grid, from the cleaned labels of the membrane-kind
classes:

- `membrane_distance_nm`: from the particle's centre to the centre of the nearest membrane
  voxel. Exact within `EXACT_WITHIN_VOX` voxels (where binding questions live); farther away
  it is measured to 2x2x2 blocks holding membrane, within 2 voxels of the exact figure. NaN
  when the tomogram has no membrane voxel (or the model no membrane class).
- `compartment`: 0 in the cytosol (or on a membrane), otherwise a number shared by the
  particles inside one membrane-enclosed space. Enclosure is judged slice by slice (a region
  of a z-slice walled off by membrane from the slice's edges): in 3-D, the missing wedge leaves
  every vesicle open at its top and bottom, so a 3-D test would find no enclosure at all. The
  enclosed regions of neighbouring slices are then joined in 3-D to number the compartments.
  An organelle cut by the edge of the field of view counts as open.

Memory: a boolean membrane mask and its 2x downsampled copies; nothing float per voxel.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .classes import ClassSpec
from .particles import ParticleTable
from .specimen_mask import SpecimenSlab

CONTEXT_COLUMNS = ("membrane_distance_nm", "specimen_surface_distance_nm", "compartment")
EXACT_WITHIN_VOX = 20.0
_BLOCK = 2  # downsampling of the coarse membrane grid, per axis


def add_particle_context(tables: dict[str, ParticleTable], labels: np.ndarray,
                         classes: list[ClassSpec], voxel_size_a: float,
                         specimen: SpecimenSlab | None = None) -> dict[str, ParticleTable]:
    """`tables` (model-grid coordinates) with the context columns filled in; without a
    `specimen` slab (or with one whose surfaces were not found) the surface distance is NaN."""
    membrane_values = [i + 1 for i, spec in enumerate(classes) if spec.kind == "membrane"]
    membrane = (np.isin(labels, membrane_values) if membrane_values
                else np.zeros(labels.shape, dtype=bool))
    points = [table.zyx for table in tables.values()]
    all_zyx = np.concatenate(points) if points else np.zeros((0, 3))
    distance_vox = membrane_distance_vox(membrane, all_zyx)
    compartment = compartments(membrane, all_zyx)
    surface_nm = (specimen.depth_nm(all_zyx, labels.shape) if specimen is not None
                  else np.full(len(all_zyx), math.nan))
    out, start = {}, 0
    for name, table in tables.items():
        stop = start + len(table)
        out[name] = replace(table, context={
            "membrane_distance_nm": distance_vox[start:stop] * voxel_size_a / 10.0,
            "specimen_surface_distance_nm": surface_nm[start:stop],
            "compartment": compartment[start:stop]})
        start = stop
    return out


def _any_in_blocks(mask: np.ndarray, block_zyx: tuple[int, int, int]) -> np.ndarray:
    """True where a block of `block_zyx` voxels holds any True (edges padded with False)."""
    padded = np.pad(mask, [(0, (-n) % k) for n, k in zip(mask.shape, block_zyx, strict=True)])
    shape = [n // k for n, k in zip(padded.shape, block_zyx, strict=True)]
    return padded.reshape(shape[0], block_zyx[0], shape[1], block_zyx[1], shape[2],
                          block_zyx[2]).any(axis=(1, 3, 5))


def membrane_distance_vox(membrane: np.ndarray, zyx: np.ndarray) -> np.ndarray:
    """Per point (n, 3), voxels to the nearest True voxel of `membrane`; NaN without any."""
    result = np.full(len(zyx), math.nan)
    if not len(zyx) or not membrane.any():
        return result
    blocks = np.argwhere(_any_in_blocks(membrane, (_BLOCK,) * 3))
    centres = blocks * _BLOCK + (_BLOCK - 1) / 2.0  # a block's centre in voxels
    coarse_distance, _ = cKDTree(centres).query(zyx)
    # A membrane voxel lies within sqrt(3) * (BLOCK - 1) / 2 of its block's centre.
    slack = math.sqrt(3.0) * (_BLOCK - 1) / 2.0
    for i, (point, estimate) in enumerate(zip(zyx, coarse_distance, strict=True)):
        if estimate > EXACT_WITHIN_VOX:
            result[i] = estimate
            continue
        reach = int(math.ceil(estimate + slack)) + 1
        low = np.maximum(np.floor(point).astype(int) - reach, 0)
        high = np.minimum(np.ceil(point).astype(int) + reach + 1, membrane.shape)
        box = membrane[tuple(slice(a, b) for a, b in zip(low, high, strict=True))]
        near = np.argwhere(box) + low
        result[i] = float(np.sqrt(((near - point) ** 2).sum(axis=1).min()))
    return result


def compartments(membrane: np.ndarray, zyx: np.ndarray) -> np.ndarray:
    """Per point (n, 3), 0 outside any membrane-enclosed space, else its compartment number
    (1, 2, ... in order of first appearance among the points)."""
    result = np.zeros(len(zyx), dtype=np.int64)
    if not len(zyx) or not membrane.any():
        return result
    # In-plane 2x downsampling closes one-voxel gaps in a membrane and quarters the work.
    coarse = _any_in_blocks(membrane, (1, _BLOCK, _BLOCK))
    z_of = np.clip(np.round(zyx[:, 0]).astype(int), 0, membrane.shape[0] - 1)
    z_low, z_high = int(z_of.min()), int(z_of.max()) + 1
    enclosed = np.zeros((z_high - z_low, *coarse.shape[1:]), dtype=bool)
    for z in range(z_low, z_high):
        enclosed[z - z_low] = _enclosed_in_slice(coarse[z])
    numbered, _ = ndimage.label(enclosed)
    y_of = np.clip((zyx[:, 1] // _BLOCK).astype(int), 0, coarse.shape[1] - 1)
    x_of = np.clip((zyx[:, 2] // _BLOCK).astype(int), 0, coarse.shape[2] - 1)
    raw = numbered[z_of - z_low, y_of, x_of]
    order = {label: k + 1 for k, label in enumerate(dict.fromkeys(int(v) for v in raw if v))}
    return np.array([order.get(int(v), 0) for v in raw], dtype=np.int64)


def _enclosed_in_slice(wall: np.ndarray) -> np.ndarray:
    """The pixels of a 2-D slice cut off by `wall` from the slice's edges."""
    regions, n = ndimage.label(~wall)
    if n == 0:
        return np.zeros(wall.shape, dtype=bool)
    edge = np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]])
    open_regions = np.zeros(n + 1, dtype=bool)
    open_regions[edge] = True
    open_regions[0] = True  # the wall itself
    return ~open_regions[regions]
