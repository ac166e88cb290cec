"""Per-class cleanup of a label volume: opening, small-component removal, hole filling, priority.

Each class is processed inside its own bounding box (`scipy.ndimage.find_objects` on the label
volume itself), so a class that occupies a corner costs only that corner. Per class the steps are:

1. optional binary opening with a ball of `opening_radius_nm` (voxels it removes become
   background); done first because opening leaves debris that step 3 then removes;
2. optional closing along the beam axis: runs of other voxels shorter than `close_z_nm`
   between two voxels of the class in one (y, x) column join the class (a tube's lumen and
   side walls between its top and bottom walls);
3. connected components (6-connectivity) smaller than `min_component_nm3` become background;
   with `join_gap_nm`, pieces closer than that are sized together first (a thin class that
   the network found in fragments, a microtubule broken where its walls run along the beam,
   is one object of the total size, not many small ones to erase);
4. holes (background enclosed by the class, 6-connectivity, not touching the box border) smaller
   than `fill_holes_nm3` are filled.

Filling (steps 2 and 4) claims a voxel only if it is background or belongs to a class of
strictly lower `priority`, so gold fiducials fill holes over membrane but membrane never eats
gold. Classes are processed from the highest priority down, so lower-priority classes are
cleaned around what the higher ones claimed. Memory: one bool mask and one component map (uint16
when the count fits, else int32) per class box, and two int32 z-index maps per 4 M-voxel y-slab
for step 2; no float copies. The input array is modified in place and returned.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .classes import ClassSpec

_FACE = ndimage.generate_binary_structure(3, 1)  # 6-connectivity


def voxels_from_nm3(volume_nm3: float, voxel_size_a: float) -> float:
    """A physical volume in nm^3 as a number of voxels of `voxel_size_a` Å."""
    return volume_nm3 / (voxel_size_a / 10.0) ** 3


def clean_labels(labels: np.ndarray, classes: list[ClassSpec], voxel_size_a: float,
                 removed_fraction: dict[str, float] | None = None) -> np.ndarray:
    """Apply every class's cleanup rules to `labels` (int8 [z, y, x], value i + 1 = classes[i]).

    Works in place and returns `labels`. If `removed_fraction` is given, it receives, per class
    (0 for one the network did not find), the fraction of the class's voxels that its own
    opening and size rules removed (0 to 1; voxels a fill added are not subtracted): a high one
    says that cleanup, not the network, erased the class.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D [z, y, x], got shape {labels.shape}")
    if labels.dtype != np.int8:
        raise ValueError(f"labels must be int8, got {labels.dtype}")
    if voxel_size_a <= 0:
        raise ValueError(f"voxel_size_a must be positive, got {voxel_size_a}")
    if labels.size and (labels.min() < 0 or labels.max() > len(classes)):
        raise ValueError(
            f"labels hold values {labels.min()}..{labels.max()} but only 0..{len(classes)} "
            f"are defined ({len(classes)} classes)"
        )
    priority = _priority_table(classes)
    # One pass for all boxes: cleanup only shrinks classes or fills inside their own box, so a
    # box found now still contains its class later.
    boxes = ndimage.find_objects(labels, max_label=len(classes))
    order = sorted(range(len(classes)), key=lambda i: -classes[i].priority)
    for i in order:
        spec = classes[i]
        removed = 0.0
        if boxes[i] is not None and (spec.opening_radius_nm > 0 or spec.min_component_nm3 > 0
                                     or spec.fill_holes_nm3 > 0 or spec.close_z_nm > 0):
            removed = _clean_class(labels, i + 1, spec, voxel_size_a, priority, boxes[i])
        if removed_fraction is not None:
            removed_fraction[spec.name] = removed
    return labels


def _priority_table(classes: list[ClassSpec]) -> np.ndarray:
    """priority[label value]; background is below every class so any fill may claim it."""
    values = [c.priority for c in classes]
    lowest = min(values, default=0) - 1
    return np.array([lowest, *values], dtype=np.int64)


def _grow(box: tuple[slice, ...], pad: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """`box` grown by `pad` voxels on every side, clipped to `shape`."""
    return tuple(
        slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(box, shape, strict=True)
    )


def _clean_class(
    labels: np.ndarray,
    value: int,
    spec: ClassSpec,
    voxel_size_a: float,
    priority: np.ndarray,
    box: tuple[slice, ...],
) -> float:
    """Clean one class inside its box; returns the fraction of its voxels removed."""
    radius_vox = spec.opening_radius_nm * 10.0 / voxel_size_a
    # Pad by the opening radius so that the opening sees background around the class, and by
    # one more so that enclosed holes are told apart from the outside at the box border.
    box = _grow(box, int(math.ceil(radius_vox)) + 1, labels.shape)
    sub = labels[box]  # a view: edits land in `labels`
    mask = sub == value
    found_by_network = mask.copy()
    found = int(np.count_nonzero(mask))
    if radius_vox >= 0.5:
        opened = open_ball(mask, radius_vox)
        sub[mask & ~opened] = 0
        mask = opened
    gap_vox = spec.close_z_nm * 10.0 / voxel_size_a
    if gap_vox > 1:
        _close_along_z(sub, mask, value, gap_vox, priority)
    min_vox = voxels_from_nm3(spec.min_component_nm3, voxel_size_a)
    if min_vox > 1:
        _remove_small(sub, mask, min_vox, spec.join_gap_nm * 10.0 / voxel_size_a)
    fill_vox = voxels_from_nm3(spec.fill_holes_nm3, voxel_size_a)
    if fill_vox > 0:
        _fill_holes(sub, mask, value, fill_vox, priority)
    # Of the voxels the network gave the class, those its rules took away. Counting the voxels
    # each rule removed instead gave more than all of them (1.04) when a component that the
    # z-closing had grown was then removed as too small.
    removed = int(np.count_nonzero(found_by_network & (sub != value)))
    return removed / found if found else 0.0


def _close_along_z(
    sub: np.ndarray, mask: np.ndarray, value: int, gap_vox: float, priority: np.ndarray
) -> None:
    """Give `value` to runs of other voxels shorter than `gap_vox` along z (axis 0) that have
    a voxel of the class both above and below in the same column, where priority allows.
    Updates `mask` too. Works on y-slabs of about 4 M voxels: two int32 index maps per slab."""
    nz = mask.shape[0]
    if nz < 3 or not mask.any():
        return
    z = np.arange(nz, dtype=np.int32)[:, None, None]
    step = max(1, (1 << 22) // max(1, nz * mask.shape[2]))
    for y0 in range(0, mask.shape[1], step):
        m, s = mask[:, y0:y0 + step], sub[:, y0:y0 + step]
        # Nearest class voxel at or before z, and at or after z (nz when there is none).
        before = np.where(m, z, -1)
        np.maximum.accumulate(before, axis=0, out=before)
        after = np.where(m, z, nz)[::-1]
        after = np.minimum.accumulate(after, axis=0)[::-1]
        gap = ~m & (before >= 0) & (after < nz) & ((after - before - 1) < gap_vox)
        where = np.nonzero(gap)
        wins = priority[s[where]] < priority[value]
        claimed = tuple(w[wins] for w in where)
        s[claimed] = value
        m[claimed] = True


def _ball(radius_vox: float) -> np.ndarray:
    r = int(math.floor(radius_vox))
    zz, yy, xx = np.ogrid[-r : r + 1, -r : r + 1, -r : r + 1]
    return (zz * zz + yy * yy + xx * xx) <= radius_vox * radius_vox


def dilate_ball(mask: np.ndarray, radius_vox: float) -> np.ndarray:
    """`ndimage.binary_dilation(mask, structure=_ball(radius_vox))`, exactly (outside the
    array counts as background), 10-20 times faster for radii of 2.5-6 voxels.

    A ball is a union of rows along x, one per (dz, dy) offset, of half-width
    floor(sqrt(r^2 - dz^2 - dy^2)): the mask is dilated along x once per distinct half-width
    (a running maximum) and each such result ORed in at its (dz, dy) shifts. That costs about
    pi r^2 passes over the array, where binary_dilation visits every voxel of the ball per voxel
    of the array (4/3 pi r^3): on a 112x256x256 mask at r = 6 (microtubule's 12 nm join gap at
    10 A), 0.49 s against 6.4 s. Memory: the result and one row-dilated copy (bool).
    """
    ball = _ball(radius_vox)
    r = ball.shape[0] // 2
    offsets_by_half_width: dict[int, list[tuple[int, int]]] = {}
    for dz in range(-r, r + 1):
        for dy in range(-r, r + 1):
            row = np.flatnonzero(ball[dz + r, dy + r])
            if len(row):
                offsets_by_half_width.setdefault(int(row[-1]) - r, []).append((dz, dy))
    out = np.zeros(mask.shape, dtype=bool)
    source = mask if mask.dtype == bool else mask != 0
    for half_width, offsets in offsets_by_half_width.items():
        rows = source if half_width == 0 else ndimage.maximum_filter1d(
            source.view(np.uint8), 2 * half_width + 1, axis=2, mode="constant").view(bool)
        for dz, dy in offsets:
            out[_shifted(dz, mask.shape[0]), _shifted(dy, mask.shape[1])] |= \
                rows[_shifted(-dz, mask.shape[0]), _shifted(-dy, mask.shape[1])]
        del rows
    return out


def _shifted(offset: int, n: int) -> slice:
    """The part of an axis of length n that a shift by `offset` keeps: out[_shifted(d)] takes
    in[_shifted(-d)], i.e. out[i] = in[i - d]."""
    return slice(min(offset, n), n) if offset >= 0 else slice(0, max(n + offset, 0))


def open_ball(mask: np.ndarray, radius_vox: float) -> np.ndarray:
    """`ndimage.binary_opening(mask, structure=_ball(radius_vox))`, exactly: an erosion (the
    complement of the background's dilation, with outside the array counting as background,
    as binary_erosion's border_value=0 does) then a dilation, both by `dilate_ball`."""
    r = int(math.floor(radius_vox))
    outside = np.pad(~mask.astype(bool, copy=False), r, constant_values=True)
    eroded = ~dilate_ball(outside, radius_vox)[r:r + mask.shape[0], r:r + mask.shape[1],
                                               r:r + mask.shape[2]]
    del outside
    return dilate_ball(eroded, radius_vox)


def component_sizes(comps: np.ndarray, n: int, weights: np.ndarray | None = None
                    ) -> np.ndarray:
    """Voxels per label 0..n of a non-negative int label array (with `weights`, an array of
    the same shape: the sum of the weights over each label's voxels, float64), slab by slab.

    np.bincount casts its input to intp and its weights to float64: on the whole array that
    is 8 (16) bytes per voxel at once (2.5 GB for a 300x1024x1024 class box); per slab it
    stays a few MB.
    """
    sizes = np.zeros(n + 1, dtype=np.int64 if weights is None else np.float64)
    flat = comps.reshape(comps.shape[0], -1) if comps.ndim > 1 else comps.reshape(1, -1)
    flat_weights = None if weights is None else weights.reshape(flat.shape)
    step = max(1, (1 << 22) // max(1, flat.shape[1]))
    for z0 in range(0, flat.shape[0], step):
        slab_weights = None if flat_weights is None else flat_weights[z0:z0 + step].ravel()
        sizes += np.bincount(flat[z0:z0 + step].ravel(), weights=slab_weights, minlength=n + 1)
    return sizes


def label_compact(mask: np.ndarray, structure: np.ndarray) -> tuple[np.ndarray, int]:
    """`ndimage.label(mask, structure)` into uint16 when the components surely fit (2 bytes per
    voxel instead of int32's 4: 0.6 GB less for a 300x1024x1024 box); int32 otherwise.

    Same label numbers either way. `structure` must connect at least the 6 face neighbours.
    uint16 is only tried under a proven bound: asked for uint16 and given more than 65535
    components, scipy retries in int32 itself and compares, 7 bytes per voxel at once (seen:
    the cleanup stage of a 300x1024x1024 tomogram peaked there).
    """
    if _component_bound(mask, _UINT16_LABELS) <= _UINT16_LABELS:
        return ndimage.label(mask, structure=structure, output=np.uint16)
    return ndimage.label(mask, structure=structure)


_UINT16_LABELS = 65535


def _component_bound(mask: np.ndarray, stop_above: int) -> int:
    """An upper bound on the number of components of `mask` (any connectivity that includes the
    faces): voxels with no mask voxel before them along z, y or x. The first voxel of every
    component in raster order is one of them. Counted slab by slab; stops once above
    `stop_above`."""
    count = 0
    step = max(1, (1 << 22) // max(1, mask[0].size)) if mask.ndim == 3 and len(mask) else 1
    for z0 in range(0, mask.shape[0], step):
        slab = mask[z0:z0 + step]
        first = slab.copy()
        if z0 > 0:
            first[0] &= ~mask[z0 - 1]
        first[1:] &= ~slab[:-1]
        first[:, 1:] &= ~slab[:, :-1]
        first[:, :, 1:] &= ~slab[:, :, :-1]
        count += int(np.count_nonzero(first))
        if count > stop_above:
            break
    return count


def _remove_small(sub: np.ndarray, mask: np.ndarray, min_vox: float,
                  join_gap_vox: float = 0.0) -> None:
    """Set components of `mask` smaller than `min_vox` to background (updates `mask` too).

    With `join_gap_vox` >= 1, pieces less than that apart count as one component: components
    are labelled on the mask dilated by half the gap, and each is sized by the class voxels
    it holds (the dilation only decides what belongs together; it adds no voxels).
    """
    if join_gap_vox >= 1:
        joined = dilate_ball(mask, max(1.0, join_gap_vox / 2))
        comps, n = label_compact(joined, _FACE)
        del joined
        comps[~mask] = 0  # count only the class's own voxels
    else:
        comps, n = label_compact(mask, _FACE)
    if n == 0:
        return
    sizes = component_sizes(comps, n)
    small = sizes < min_vox
    small[0] = False
    if not small.any():
        return
    kill = small[comps]
    sub[kill] = 0
    mask[kill] = False


def _fill_holes(
    sub: np.ndarray, mask: np.ndarray, value: int, fill_vox: float, priority: np.ndarray
) -> None:
    """Fill enclosed non-class regions smaller than `fill_vox`, respecting class priority."""
    holes, n = label_compact(~mask, _FACE)
    if n == 0:
        return
    sizes = component_sizes(holes, n)
    fill = sizes < fill_vox
    fill[0] = False
    # A region touching the box border continues outside the box: it is not enclosed.
    for face in _faces(holes):
        fill[np.unique(face)] = False
    if not fill.any():
        return
    where = np.nonzero(fill[holes])
    # Look priorities up only on the (few) hole voxels: no int64 copy of the whole box.
    wins = priority[sub[where]] < priority[value]
    sub[tuple(w[wins] for w in where)] = value


def _faces(a: np.ndarray) -> list[np.ndarray]:
    return [a[0], a[-1], a[:, 0], a[:, -1], a[:, :, 0], a[:, :, -1]]
