"""Writing one tomogram's results: the output folder (README, "Output files"), published atomically.

Everything is written into a temporary folder beside it (summary last; the names are
core.result_folder's), then that folder is renamed to `out_parent/STEM`: readers see the whole
folder or none of it. An existing `out_parent/STEM` is renamed aside first and deleted after
the new one is in place. Any failure removes the temporary folder and leaves an existing
result untouched. Folders are created 0777 and files 0666, both less the process umask
(0755/0644 under the default 022), so that other users (and a daemon running as another
user) can read the results.

The STAR and CSV tables' columns and coordinate conventions are core.star's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from . import result_folder, star
from .atomic import fsync_dir
from .classes import ClassSpec
from .context import CONTEXT_COLUMNS
from .filaments import Filament
from .imod import write_filament_model, write_particle_model
from .particles import ParticleTable
from .result_folder import SWEEP_FRAMES, output_file_names, sweep_planes
from .segmentation import Segmentation
from .volume import release_pages, write_mrc

PREVIEW_MAX_PX = 1200
PREVIEW_MIN_PX = 480  # small test volumes are enlarged (nearest) so the preview stays readable
OVERLAY_ALPHA = 0.5
# The sweep through z (STEM_sweep.webp) is for a web page: few frames, small, lossy, slightly
# blurred. Measured on synthetic tomograms (microscope simulator, 64x512x512 and a 1024 px one):
# 24 frames (SWEEP_FRAMES, core.result_folder) of at most 256 px at WebP quality 60 after a 1 px
# blur stay under ~300 kB.
SWEEP_MAX_PX = 256
SWEEP_BLUR_PX = 1.0
SWEEP_FRAME_MS = 150
# libwebp's encoder effort: 0 wrote 24 frames of 256 px in 0.06 s against method 4's 0.22 s, at
# about the same size (256 kB against 249 kB, measured on a 64x256x256 synthetic tomogram).
SWEEP_WEBP_METHOD = 0
SWEEP_QUALITY = 60
# zlib's level for the preview and sweep-label PNGs. Measured on a 96x256x256 result (5 saves
# each): the 480x510 preview took 27 ms at 3 against 47 ms at the default 6 and came out
# smaller (212 kB against 287 kB); the 256x6144 label strip took 15 ms against `optimize`'s 160
# ms, at 52 kB against 35 kB.
PNG_COMPRESS_LEVEL = 3


def write_outputs(
    out_parent: str | Path,
    seg: Segmentation,
    tomogram: np.ndarray | None = None,
    *,
    start_time: float | None = None,
    before_publish: Callable[[], None] | None = None,
) -> Path:
    """Write `out_parent/STEM/` for `seg` atomically and return that folder.

    `tomogram` ([z, y, x] on the input grid; only three central slices are read, so a memmap is
    fine) is the preview's background; without it the preview shows the labels on black.
    The time spent here is added to `timings_s['write']` in the summary; `start_time` (a
    `time.perf_counter()` value) adds a 'total' timing.
    `before_publish` runs just before the rename; if it raises, nothing is published.
    """
    _check(seg, tomogram)
    out_parent = Path(out_parent)
    out_parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = _make_temporary_folder(out_parent, seg.stem)
    try:
        maps = seg.probabilities.names if seg.probabilities is not None else ()
        files = {key: tmp / name for key, name in
                 output_file_names(seg.stem, seg.classes, maps, seg.masks_specimen).items()}
        _write_files(files, seg, tomogram)
        timings_s = dict(seg.timings_s)
        # 'write' may already hold the mapping back to the input grid (core.pipeline): add to it.
        timings_s["write"] = timings_s.get("write", 0.0) + time.perf_counter() - t0
        if start_time is not None:
            timings_s["total"] = time.perf_counter() - start_time
        _write_summary(files["summary"], seg, timings_s, [p.name for p in files.values()])
        fsync_dir(tmp)
        if before_publish is not None:
            before_publish()
        final = _publish(tmp, out_parent / seg.stem)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _make_temporary_folder(out_parent: Path, stem: str) -> Path:
    """A new empty temporary folder for `stem` (core.result_folder names it and recovers it).

    Not tempfile.mkdtemp: it always makes 0700, so published results were unreadable to
    everyone else whatever the umask. os.mkdir with 0o777 lets the umask decide.
    """
    for _ in range(100):
        tmp = out_parent / result_folder.temporary_folder_name(stem, result_folder.new_token())
        try:
            os.mkdir(tmp, 0o777)
        except FileExistsError:  # another writer drew the same name: draw again
            continue
        return tmp
    raise FileExistsError(f"{out_parent}: no free temporary folder name for {stem}")


def _check(seg: Segmentation, tomogram: np.ndarray | None) -> None:
    if seg.labels.ndim != 3 or seg.labels.dtype != np.int8:
        raise ValueError(
            f"{seg.stem}: labels must be int8 [z, y, x], got {seg.labels.dtype} {seg.labels.shape}"
        )
    if tomogram is not None and tomogram.shape != seg.labels.shape:
        raise ValueError(
            f"{seg.stem}: tomogram shape {tomogram.shape} differs from labels {seg.labels.shape}"
        )
    if not seg.stem or "/" in seg.stem or seg.stem in (".", ".."):
        raise ValueError(f"output stem {seg.stem!r} is not a usable folder name")


def _write_files(files: dict[str, Path], seg: Segmentation, tomogram: np.ndarray | None) -> None:
    write_mrc(files["labels"], seg.labels, seg.voxel_size_a, seg.origin_xyz_a)
    if seg.masks_specimen:
        write_mrc(files["specimen_mask"], seg.specimen_mask(), seg.voxel_size_a,
                  seg.origin_xyz_a)
    if seg.probabilities is not None:
        for name in seg.probabilities.names:  # one class at a time: bounded memory
            seg.probabilities.write(name, files[f"prob:{name}"], seg.voxel_size_a,
                                    seg.origin_xyz_a)
    for index, spec in enumerate(seg.classes, start=1):
        if spec.is_filament:
            # A bool array viewed as int8 is already 0/1: no extra copy.
            mask = (seg.labels == index).view(np.int8)
            write_mrc(files[f"mask:{spec.name}"], mask, seg.voxel_size_a, seg.origin_xyz_a)
            del mask
    tables = {
        spec.name: seg.particles.get(spec.name) or ParticleTable.empty(spec.name)
        for spec in seg.classes if spec.is_particle
    }
    tomo_name = seg.tilt_series_name or seg.stem  # what RELION and Warp know it as
    for name, table in tables.items():
        write_particle_star(files[f"star:{name}"], table, tomo_name, seg.labels.shape,
                            seg.voxel_size_a)
    write_particle_csv(files["particles_csv"], list(tables.values()))
    for spec in seg.classes:
        if spec.is_filament:
            write_filament_star(files[f"filaments:{spec.name}"], seg.filaments.get(spec.name, []),
                                tomo_name, seg.labels.shape, seg.voxel_size_a)
    for spec in seg.classes:  # for 3dmod: imod.py
        if spec.is_particle:
            write_particle_model(files[f"imod:{spec.name}"], tables[spec.name], spec,
                                 seg.labels.shape, seg.voxel_size_a)
        elif spec.is_filament:
            write_filament_model(files[f"imod:{spec.name}"], seg.filaments.get(spec.name, []),
                                 spec, seg.labels.shape, seg.voxel_size_a)
    write_preview(files["preview"], seg.labels, seg.classes, tomogram)
    write_sweep(files, seg.labels, seg.classes, tomogram)


def _publish(tmp: Path, final: Path) -> Path:
    """Rename `tmp` to `final`; an existing `final` is moved aside first, then deleted."""
    old = None
    if final.exists():
        old = final.with_name(result_folder.set_aside_folder_name(final.name,
                                                                  result_folder.new_token()))
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)  # put the previous result back
        raise
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---- STAR and CSV (their text is core.star's) -------------------------------------------------

def write_particle_star(
    path: Path, table: ParticleTable, stem: str, shape_zyx: tuple[int, ...], voxel_size_a: float
) -> None:
    _write_text(path, star.particle_star_text(table, stem, shape_zyx, voxel_size_a))


def write_particle_csv(path: Path, tables: list[ParticleTable]) -> None:
    # The context columns any table carries (core.context), in their documented order.
    context = [name for name in CONTEXT_COLUMNS if any(name in t.context for t in tables)]
    _write_text(path, star.particle_csv_text(star.table_rows(tables, context), context=context))


def write_filament_star(path: Path, filaments: list[Filament], stem: str,
                        shape_zyx: tuple[int, ...], voxel_size_a: float) -> None:
    _write_text(path, star.filament_star_text(filaments, stem, shape_zyx, voxel_size_a))


# ---- preview -----------------------------------------------------------------------------------

def _rgb(color: str) -> tuple[int, int, int]:
    c = color.lstrip("#")
    if len(c) != 6:
        return (255, 255, 255)
    try:
        return (int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16))
    except ValueError:
        return (255, 255, 255)


def _gray(slices: list[np.ndarray]) -> list[np.ndarray]:
    """uint8 versions of the slices, contrast from the 1st-99th percentile over all three."""
    floats = [np.asarray(s, dtype=np.float32) for s in slices]
    values = np.concatenate([f.ravel() for f in floats])
    lo, hi = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return [np.clip((f - lo) * scale, 0, 255).astype(np.uint8) for f in floats]


def _central_slices(tomogram: np.ndarray) -> list[np.ndarray]:
    """The central xy, yz (transposed to (y, z)) and xz slices of a [z, y, x] volume.

    The yz and xz slices take a little from every z plane, and the kernel maps file pages in
    large folios, so on a memory map they make most of the file resident (measured: the whole
    input for yz, 140 of 200 MiB for xz at 200x512x512). Gathered slab by slab, dropping the
    map's pages after each, their resident cost stays one slab.
    """
    nz, ny, nx = tomogram.shape
    yz = np.empty((nz, ny), dtype=tomogram.dtype)
    xz = np.empty((nz, nx), dtype=tomogram.dtype)
    step = max(1, (16 << 20) // max(1, ny * nx * tomogram.itemsize))
    for z0 in range(0, nz, step):
        yz[z0:z0 + step] = tomogram[z0:z0 + step, :, nx // 2]
        xz[z0:z0 + step] = tomogram[z0:z0 + step, ny // 2, :]
        release_pages(tomogram)
    xy = np.array(tomogram[nz // 2])
    release_pages(tomogram)
    return [xy, yz.T, xz]


def write_preview(
    path: Path, labels: np.ndarray, classes: list[ClassSpec], tomogram: np.ndarray | None
) -> None:
    """Orthogonal central slices (xy top left, zy right, xz below) with classes overlaid, and a
    legend strip."""
    nz, ny, nx = labels.shape
    lab = [labels[nz // 2], labels[:, :, nx // 2].T, labels[:, ny // 2, :]]  # (y,x) (y,z) (z,x)
    if tomogram is not None:
        gray = _gray(_central_slices(tomogram))
    else:
        gray = [np.zeros(s.shape, dtype=np.uint8) for s in lab]
    palette = np.zeros((len(classes) + 1, 3), dtype=np.float32)
    for i, spec in enumerate(classes, start=1):
        palette[i] = _rgb(spec.color)
    gap = 2
    canvas = np.full((ny + gap + nz, nx + gap + nz, 3), 40, dtype=np.uint8)
    origins = [(0, 0), (0, nx + gap), (ny + gap, 0)]
    for (r, c), g, lb in zip(origins, gray, lab, strict=True):
        rgb = np.repeat(g[..., None].astype(np.float32), 3, axis=2)
        sel = lb > 0
        rgb[sel] = (1 - OVERLAY_ALPHA) * rgb[sel] + OVERLAY_ALPHA * palette[lb[sel]]
        canvas[r : r + g.shape[0], c : c + g.shape[1]] = rgb.astype(np.uint8)
    image = Image.fromarray(canvas)
    longest = max(image.size)
    scale = min(PREVIEW_MAX_PX / longest, max(1.0, PREVIEW_MIN_PX / longest))
    if scale != 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        resample = Image.NEAREST if scale > 1 else Image.BILINEAR
        image = image.resize(size, resample)
    _legend(image, classes).save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def _legend(image: Image.Image, classes: list[ClassSpec]) -> Image.Image:
    """The image with a strip below it: a colour box and the name of every class."""
    font = ImageFont.load_default()
    row_h, box, pad = 18, 12, 6
    # Lay names out left to right, wrapping to a new row when the width is used up.
    items, x, y = [], pad, pad
    for spec in classes:
        width = box + 4 + int(math.ceil(font.getlength(spec.name))) + 2 * pad
        if x + width > image.width and x > pad:
            x, y = pad, y + row_h
        items.append((x, y, spec))
        x += width
    strip_h = (y + row_h + pad) if classes else 0
    out = Image.new("RGB", (image.width, image.height + strip_h), (20, 20, 20))
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    for x, y, spec in items:
        top = image.height + y
        draw.rectangle([x, top + 2, x + box, top + 2 + box], fill=_rgb(spec.color))
        draw.text((x + box + 4, top), spec.name, fill=(230, 230, 230), font=font)
    return out


# ---- sweep through z ---------------------------------------------------------------------------

def sweep_layers(labels: np.ndarray, tomogram: np.ndarray | None, frames: int = SWEEP_FRAMES,
                 max_px: int = SWEEP_MAX_PX) -> list[tuple[np.ndarray, np.ndarray]]:
    """(gray uint8, label values uint8) of xy planes from top to bottom, at most `max_px` on a
    side: what the sweep shows, before the classes are painted on.

    One plane is read at a time (a memmap stays mostly unmapped) and shrunk first (gray by
    area averaging, labels by nearest neighbour), so a 1024 px plane costs little more than a
    small one; the contrast comes from the central plane so that it does not flicker from
    frame to frame.
    """
    nz, ny, nx = labels.shape
    if tomogram is not None:
        centre = np.asarray(tomogram[nz // 2], dtype=np.float32)
        lo, hi = np.percentile(centre, [1, 99])
        del centre
        release_pages(tomogram)
    scale = min(1.0, max_px / max(ny, nx))
    size = (max(1, round(nx * scale)), max(1, round(ny * scale)))
    layers = []
    for z in sweep_planes(nz, frames):
        if tomogram is None:
            gray = np.zeros((size[1], size[0]), dtype=np.float32)
        else:
            plane = Image.fromarray(np.asarray(tomogram[z], dtype=np.float32), mode="F")
            release_pages(tomogram)
            plane = np.asarray(plane.resize(size, Image.BOX) if scale < 1.0 else plane)
            # Pixel noise is what makes a tomogram's frames incompressible (1.3 MB for 32
            # frames of a synthetic 512 px one); a one-pixel blur at display size halves it.
            plane = ndimage.gaussian_filter(plane, SWEEP_BLUR_PX)
            gray = np.clip((plane - lo) * (255.0 / (hi - lo) if hi > lo else 0.0), 0, 255)
        lab = np.asarray(labels[z]).astype(np.uint8)
        if scale < 1.0:
            lab = np.asarray(Image.fromarray(lab, mode="L").resize(size, Image.NEAREST))
        layers.append((gray.astype(np.uint8), lab))
    return layers


def sweep_frames(layers: list[tuple[np.ndarray, np.ndarray]], classes: list[ClassSpec]
                 ) -> list[Image.Image]:
    """The sweep's frames: each gray plane with the classes painted on in their colours."""
    palette = np.zeros((len(classes) + 1, 3), dtype=np.float32)
    for i, spec in enumerate(classes, start=1):
        palette[i] = _rgb(spec.color)
    images = []
    for gray, lab in layers:
        rgb = np.repeat(gray.astype(np.float32)[..., None], 3, axis=2)
        sel = lab > 0
        rgb[sel] = (1 - OVERLAY_ALPHA) * rgb[sel] + OVERLAY_ALPHA * palette[lab[sel]]
        images.append(Image.fromarray(rgb.astype(np.uint8)))
    return images


def write_sweep(files: dict[str, Path], labels: np.ndarray, classes: list[ClassSpec],
                tomogram: np.ndarray | None) -> None:
    """The sweep through z, as the session page shows it: `sweep`, an animated WebP with the
    classes overlaid (downsampled and lossy: a few hundred kB at most); and its layers for the
    page's per-class toggles, each plane stacked below the last: `sweep_planes` (the gray
    planes, lossy WebP) and `sweep_labels` (the label value of each pixel as a gray level,
    lossless PNG: a browser paints only the classes someone ticked)."""
    layers = sweep_layers(labels, tomogram)
    images = sweep_frames(layers, classes)
    images[0].save(files["sweep"], format="WEBP", save_all=True, append_images=images[1:],
                   duration=SWEEP_FRAME_MS, loop=0, quality=SWEEP_QUALITY,
                   method=SWEEP_WEBP_METHOD)
    Image.fromarray(np.concatenate([gray for gray, _ in layers])).save(
        files["sweep_planes"], format="WEBP", quality=SWEEP_QUALITY, method=SWEEP_WEBP_METHOD)
    Image.fromarray(np.concatenate([lab for _, lab in layers]), mode="L").save(
        files["sweep_labels"], format="PNG", compress_level=PNG_COMPRESS_LEVEL)


# ---- summary -----------------------------------------------------------------------------------

def jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays converted, NaN/Inf as null."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _write_summary(
    path: Path, seg: Segmentation, timings_s: dict[str, float], files: list[str]
) -> None:
    from tomolive import __version__

    counts = {
        "particles": {s.name: len(seg.particles.get(s.name) or []) for s in seg.classes
                      if s.is_particle},
        "filaments": {s.name: len(seg.filaments.get(s.name, [])) for s in seg.classes
                      if s.is_filament},
    }
    summary = {
        "stem": seg.stem,
        "tilt_series_name": seg.tilt_series_name or seg.stem,
        "tomolive_version": __version__,
        "written_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": seg.input,
        "model": seg.model,
        "settings": seg.settings,
        "shape_zyx": list(seg.labels.shape),
        "voxel_size_a": seg.voxel_size_a,
        "origin_xyz_a": list(seg.origin_xyz_a),
        "classes": [spec.to_json() for spec in seg.classes],
        "timings_s": timings_s,
        "class_fractions": seg.class_fractions,
        "counts": counts,
        # Total traced length per filament class: what the session page and index show.
        "filament_length_nm": {
            s.name: sum(_polyline_length_vox(f.points_zyx) for f in seg.filaments.get(s.name, []))
            * seg.voxel_size_a / 10 for s in seg.classes if s.is_filament},
        "confidence": seg.confidence,
        "uncertain_fraction": seg.uncertain_fraction,
        "snr_estimate": seg.snr_estimate,
        "class_confidence": seg.class_confidence,
        "cleanup_removed_fraction": seg.cleanup_removed_fraction,
        "specimen": _specimen_record(seg),
        "warnings": seg.warnings,
        "files": files,
        **seg.summary_extra,
    }
    _write_text(path, json.dumps(jsonable(summary), indent=2, allow_nan=False) + "\n")


def _specimen_record(seg: Segmentation) -> dict[str, Any] | None:
    """The slab's figures and surfaces (core.specimen_mask), whether it masked the outputs,
    and what it removed."""
    if seg.specimen is None:
        return None
    return {**seg.specimen.summary(), "mask_applied": seg.masks_specimen,
            "outside_specimen": seg.outside_specimen}


def _polyline_length_vox(points_zyx: Any) -> float:
    """Length of a traced filament in voxels (the sum of its steps)."""
    points = np.asarray(points_zyx, dtype=np.float64)
    return float(np.linalg.norm(np.diff(points, axis=0), axis=1).sum()) if len(points) > 1 else 0.0


def _write_text(path: Path, text: str) -> None:
    """Write and fsync: the folder rename publishes it, so its content must be on disk first."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
