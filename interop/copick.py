"""copick projects in and out: read a run's tomogram, write tomolive's results back through
copick (https://github.com/copick/copick, the CZ cryo-ET data portal's project format).

One job: copick I/O. Segmenting is `core.pipeline.segment`'s; `tomolive segment --copick`
(daemon/cli.py) joins the two.

Reading. A run's tomogram is chosen at one voxel spacing: the one given, else the spacing
nearest the model's voxel size among those holding a tomogram (of `tomo_type` when given,
else of any type; at that spacing the alphabetically first type, since copick lists types in
no fixed order). Only the OME-Zarr's first multiscale level (full resolution) is read, once,
into a float32 [z, y, x] array; the voxel size is the spacing's.

Writing, under user id `tomolive` and one session id (default: the model's name and version,
`tomolive-default-v1`), replacing what that user and session wrote before and nothing else:

- picks per particle class (one copick point per particle, `score` the particle's score,
  identity transforms, `trust_orientation` false: tomolive does not measure orientations);
- filament centre lines as picks of the filament's object, copick's filament pick
  convention: `instance_id` is the filament's number (from 1), points in order along it, and
  each point's transform turns +Z onto the local tangent. Picks rather than copick's
  `Filaments` records or meshes: every copick client reads picks;
- a multilabel segmentation `tomolive-labels` of the label volume, each voxel holding the
  matching pickable object's `label` (copick's multilabel convention; tomolive's class index
  where the project numbers its objects as the model does), 0 where no object matches;
- a binary segmentation (0/1) per non-particle class (membranes, filaments, other masks),
  named after its object.

Segmentations are on the tomogram's grid at its voxel spacing. The multilabel one is written
last: its presence marks a run done (`is_done`, for `segment --copick --watch`).

Coordinates: copick points are (x, y, z) in Ångström with the origin at voxel index 0,
`location = index * voxel_size` for 0-based indices on the tomogram's grid (copick's own
converters do exactly this: `points_angstrom = positions_px * voxel_size`, and RELION's centred
coordinates come back by adding `size / 2 * voxel_size`, the centre tomolive's STAR files
subtract). The file's MRC origin plays no part.

Pickable objects: copick refuses picks and binary segmentations of an object its config does
not list. A class without an object of the same name is skipped with one warning line (for a
particle class: no picks; for a mask class: no binary segmentation, 0 in the multilabel one).
The user's config is never rewritten: add the object to the config to get that class.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.classes import ClassSpec
from ..core.filaments import Filament
from ..core.segmentation import Segmentation
from ..core.volume import DEFAULT_VOXEL_SIZE_BOUNDS_A, MIN_DIM, Volume, check_voxel_size

USER_ID = "tomolive"
MULTILABEL_NAME = "tomolive-labels"
# Two voxel spacings closer than this are the same (copick stores them to 3 decimals).
_SPACING_TOLERANCE_A = 1e-3


@dataclass(frozen=True)
class Project:
    """An open copick project and the config file it came from (for messages)."""

    root: Any  # copick.models.CopickRoot
    config_path: Path

    @property
    def run_names(self) -> list[str]:
        return [run.name for run in self.root.runs]


@dataclass(frozen=True)
class TomogramSource:
    """The tomogram of one run chosen for segmenting."""

    run_name: str
    voxel_size_a: float
    tomo_type: str
    tomogram: Any  # copick.models.CopickTomogram


@dataclass(frozen=True)
class ObjectMatch:
    """Which copick object each model class is written as; None where the project has none."""

    objects: dict[str, Any]  # class name -> copick.models.CopickObject or None
    warnings: list[str] = field(default_factory=list)


def open_project(config_path: str | Path, require_runs: bool = True) -> Project:
    """Open a copick project from its config file; ValueError (one line, naming the file) for a
    missing or unreadable file, invalid JSON, a config copick refuses, or (`require_runs`) a
    project with no runs. Opening writes nothing."""
    try:
        import copick
    except ImportError:  # an optional dependency: the `copick` extra
        raise ValueError("copick is not installed: pip install 'tomolive[copick]' (or "
                         "pip install copick beside tomolive)") from None

    path = Path(config_path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"{path}: copick config not found") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot read the copick config ({error.strerror or error})")\
            from None
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a copick config (invalid JSON: {error})") from None
    try:
        root = copick.from_string(text)
    except Exception as error:  # pydantic's ValidationError, copick's ValueErrors, ...
        raise ValueError(f"{path}: not a usable copick config ({_first_line(error)})") from None
    project = Project(root=root, config_path=path)
    try:
        names = project.run_names
    except Exception as error:  # the storage behind the config (fsspec) failed
        raise ValueError(f"{path}: cannot list the project's runs ({_first_line(error)})")\
            from None
    if require_runs and not names:
        raise ValueError(f"{path}: the copick project has no runs ({_roots(root)})")
    return project


def find_tomogram(project: Project, run_name: str, model_voxel_a: float,
                  voxel_spacing_a: float | None = None,
                  tomo_type: str | None = None) -> TomogramSource:
    """The tomogram of `run_name` to segment (see the module docstring for the choice);
    ValueError naming the run when there is none."""
    where = f"{project.config_path}: run {run_name}"
    run = project.root.get_run(run_name)
    if run is None:
        raise ValueError(f"{where}: no such run in the project "
                         f"({_listed(project.run_names, 'runs')})")
    candidates = []  # (voxel size, spacing, tomogram types)
    try:
        for spacing in run.voxel_spacings:
            types = sorted({t.tomo_type for t in spacing.tomograms})
            if tomo_type is not None:
                types = [t for t in types if t == tomo_type]
            if types:
                candidates.append((float(spacing.voxel_size), spacing, types))
    except Exception as error:  # the storage behind the project (fsspec) failed
        raise ValueError(f"{where}: cannot list its tomograms ({_first_line(error)})") from None
    candidates.sort(key=lambda c: c[0])  # copick lists spacings in no fixed order
    what = f"no {tomo_type!r} tomogram" if tomo_type else "no tomogram"
    if not candidates:
        raise ValueError(f"{where}: {what} at any voxel spacing")
    if voxel_spacing_a is not None:
        chosen = [c for c in candidates if abs(c[0] - voxel_spacing_a) <= _SPACING_TOLERANCE_A]
        if not chosen:
            have = ", ".join(f"{c[0]:g}" for c in candidates)
            raise ValueError(f"{where}: {what} at voxel spacing {voxel_spacing_a:g} Å "
                             f"(tomograms at {have} Å)")
        voxel, spacing, types = chosen[0]
    else:
        voxel, spacing, types = min(candidates,
                                    key=lambda c: (abs(c[0] - model_voxel_a), c[0]))
    tomogram = next(t for t in spacing.tomograms if t.tomo_type == types[0])
    return TomogramSource(run_name=run_name, voxel_size_a=voxel, tomo_type=types[0],
                          tomogram=tomogram)


def read_tomogram(source: TomogramSource,
                  voxel_size_bounds_a: tuple[float, float] = DEFAULT_VOXEL_SIZE_BOUNDS_A
                  ) -> Volume:
    """The full-resolution level of `source` as a float32 [z, y, x] Volume, read once; checked
    as `core.volume.read_mrc` checks a file (plausible voxel size, 3-D, large enough, finite)."""
    import zarr

    where = f"run {source.run_name}: tomogram {source.tomo_type!r} at {source.voxel_size_a:g} Å"
    try:
        check_voxel_size(source.voxel_size_a, voxel_size_bounds_a)
    except ValueError as error:
        raise ValueError(f"{where}: voxel spacing {error}") from None
    try:
        group = zarr.open_group(source.tomogram.zarr(), mode="r")
        multiscales = group.attrs.get("multiscales") or [{}]
        datasets = multiscales[0].get("datasets") or [{"path": "0"}]
        level = str(datasets[0]["path"])  # OME-NGFF lists levels from the finest
        array = group[level]
        data = np.asarray(array[...])
    except Exception as error:  # zarr, fsspec and OME metadata errors alike
        raise ValueError(f"{where}: cannot read ({_first_line(error)})") from None
    if data.ndim != 3:
        raise ValueError(f"{where}: a {data.ndim}-D array {data.shape}, not a 3-D tomogram")
    if min(data.shape) < MIN_DIM:
        raise ValueError(f"{where}: too small to segment: {data.shape} (z, y, x); each axis "
                         f"needs at least {MIN_DIM} voxels")
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise ValueError(f"{where}: data type {data.dtype} is not a real number type")
    data = data.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise ValueError(f"{where}: holds NaN or infinite values")
    return Volume(data=data, voxel_size_a=source.voxel_size_a,
                  path=Path(_tomogram_location(source.tomogram)))


def default_session_id(model_name: str, model_version: int | str) -> str:
    """The session id results go under unless one is given: `NAME-vVERSION`
    (`tomolive-default-v1`), made valid."""
    from copick.util.escape import sanitize_name

    return sanitize_name(f"{model_name}-v{model_version}", suppress_warnings=True)


def check_session_id(session_id: str) -> str:
    """`session_id` if copick accepts it unchanged, else ValueError (never altered silently)."""
    from copick.util.escape import sanitize_name

    try:
        valid = sanitize_name(session_id, suppress_warnings=True)
    except ValueError:
        valid = ""
    if valid != session_id:
        raise ValueError(f"copick session id {session_id!r} is not valid (copick allows no "
                         "spaces, underscores or any of <>:\"/\\|?*)")
    return session_id


def match_objects(project: Project, classes: Sequence[ClassSpec]) -> ObjectMatch:
    """Each class's pickable object (same name), with one warning per class that has none."""
    objects = {}
    warnings = []
    for spec in classes:
        obj = project.root.get_object(spec.name)
        objects[spec.name] = obj
        if obj is None:
            skipped = ("no picks" if spec.is_particle else
                       "no binary segmentation, 0 in the multilabel one")
            warnings.append(f"{project.config_path}: class {spec.name} has no pickable object "
                            f"of that name in the project: {skipped} (add an object named "
                            f"{spec.name!r} to the config to write it)")
    return ObjectMatch(objects=objects, warnings=warnings)


def write_results(project: Project, source: TomogramSource, seg: Segmentation,
                  session_id: str, match: ObjectMatch) -> list[str]:
    """Write `seg` (on `source`'s grid) into the run through copick; returns what was written,
    one short description each (`ribosome picks (12)`). A failure part way (a full disk, a
    read-only overlay) is a ValueError naming the run; what was written before it stays."""
    try:
        return _write_results(project, source, seg, session_id, match)
    except Exception as error:  # copick, zarr and fsspec raise what they like
        raise ValueError(f"{project.config_path}: run {source.run_name}: writing the results "
                         f"through copick failed ({_first_line(error)})") from None


def _write_results(project: Project, source: TomogramSource, seg: Segmentation,
                   session_id: str, match: ObjectMatch) -> list[str]:
    run = project.root.get_run(source.run_name)
    voxel = source.voxel_size_a
    written = []
    for spec in seg.classes:
        obj = match.objects.get(spec.name)
        if obj is None:
            continue
        if spec.is_particle:
            table = seg.particles.get(spec.name)
            zyx = table.zyx if table is not None else np.zeros((0, 3))
            scores = table.score if table is not None else np.zeros(0)
            _store_picks(run, obj.name, session_id, voxel, voxel_indices_to_xyz_a(zyx, voxel),
                         scores=scores, trust_orientation=False)
            written.append(f"{spec.name} picks ({len(zyx)})")
        elif spec.is_filament:
            found = seg.filaments.get(spec.name, [])
            xyz, transforms, ids = filament_points(found, voxel)
            _store_picks(run, obj.name, session_id, voxel, xyz, transforms=transforms,
                         instance_ids=ids, trust_orientation=True)
            written.append(f"{spec.name} centre lines ({len(found)}, {len(xyz)} points)")
    for index, spec in enumerate(seg.classes, start=1):
        obj = match.objects.get(spec.name)
        if obj is None or spec.is_particle:
            continue
        binary = run.new_segmentation(voxel, obj.name, session_id, is_multilabel=False,
                                      user_id=USER_ID, exist_ok=True)
        binary.from_numpy((seg.labels == index).view(np.uint8))
        written.append(f"{spec.name} segmentation")
    # Last: its presence says the run's results are complete (`is_done`, for --watch).
    lut = label_lookup(seg.classes, match)
    multilabel = run.new_segmentation(voxel, MULTILABEL_NAME, session_id, is_multilabel=True,
                                      user_id=USER_ID, exist_ok=True)
    multilabel.from_numpy(lut[seg.labels.view(np.uint8)])
    written.append(f"{MULTILABEL_NAME} segmentation")
    return written


def is_done(project: Project, source: TomogramSource, session_id: str) -> bool:
    """Whether tomolive's results for `source` are in the project under `session_id`: the
    multilabel segmentation, written last, exists at the tomogram's voxel spacing."""
    run = project.root.get_run(source.run_name)
    if run is None:
        return False
    found = run.get_segmentations(user_id=USER_ID, session_id=session_id,
                                  name=MULTILABEL_NAME, is_multilabel=True,
                                  voxel_size=source.voxel_size_a)
    return bool(found)


def tomogram_fingerprint(source: TomogramSource) -> tuple | None:
    """What the tomogram's store holds now (every file's name and size, and mtime where the
    filesystem has one), or None while it has no OME-Zarr metadata yet. Two equal fingerprints
    a poll apart: the tomogram is no longer being written (--watch)."""
    tomogram = source.tomogram
    read_only = getattr(tomogram, "read_only", False)
    fs = tomogram.fs_static if read_only else tomogram.fs_overlay
    path = tomogram.static_path if read_only else tomogram.overlay_path
    try:
        files = fs.find(path, detail=True)
    except (FileNotFoundError, OSError):
        return None
    root_attrs = f"{path.rstrip('/')}/.zattrs"  # the group's: ome-zarr writes it after the data
    if not any(name.rstrip("/") == root_attrs for name in files):
        return None
    return tuple(sorted((name, info.get("size"), info.get("mtime") or info.get("LastModified"))
                        for name, info in files.items()))


def voxel_indices_to_xyz_a(zyx: np.ndarray, voxel_size_a: float) -> np.ndarray:
    """0-based (z, y, x) voxel positions -> copick (x, y, z) Ångström (index * voxel size)."""
    zyx = np.asarray(zyx, dtype=np.float64).reshape(-1, 3)
    return zyx[:, ::-1] * float(voxel_size_a)


def xyz_a_to_voxel_indices(xyz_a: np.ndarray, voxel_size_a: float) -> np.ndarray:
    """The inverse of `voxel_indices_to_xyz_a`."""
    xyz = np.asarray(xyz_a, dtype=np.float64).reshape(-1, 3)
    return xyz[:, ::-1] / float(voxel_size_a)


def filament_points(filaments: Sequence[Filament], voxel_size_a: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre-line points of `filaments` as copick filament picks: (x, y, z) Å, transforms
    whose +Z is the tangent, and instance ids (the filament's number, from 1)."""
    xyz, transforms, ids = [np.zeros((0, 3))], [np.zeros((0, 4, 4))], [np.zeros(0, np.int64)]
    for number, filament in enumerate(filaments, start=1):
        points = voxel_indices_to_xyz_a(filament.points_zyx, voxel_size_a)
        xyz.append(points)
        transforms.append(tangent_transforms(filament.directions_zyx[:, ::-1]))
        ids.append(np.full(len(points), number, dtype=np.int64))
    return np.concatenate(xyz), np.concatenate(transforms), np.concatenate(ids)


def tangent_transforms(tangents_xyz: np.ndarray) -> np.ndarray:
    """4x4 transforms (no translation) whose rotation turns +Z onto each unit tangent (x, y, z);
    the rotation about the tangent is arbitrary but fixed (filaments carry no twist here)."""
    t = np.asarray(tangents_xyz, dtype=np.float64).reshape(-1, 3)
    norms = np.linalg.norm(t, axis=1, keepdims=True)
    t = np.where(norms > 0, t / np.where(norms > 0, norms, 1.0), [0.0, 0.0, 1.0])
    # A helper axis not parallel to the tangent, then an orthonormal right-handed frame.
    helper = np.where(np.abs(t[:, 2:3]) < 0.9, [[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]])
    u = np.cross(helper, t)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = np.cross(t, u)
    out = np.zeros((len(t), 4, 4))
    out[:, :3, 0], out[:, :3, 1], out[:, :3, 2] = u, v, t
    out[:, 3, 3] = 1.0
    return out


def label_lookup(classes: Sequence[ClassSpec], match: ObjectMatch) -> np.ndarray:
    """tomolive label value -> the copick object's label (0 for background and unmatched)."""
    labels = [0] * 256
    for index, spec in enumerate(classes, start=1):
        obj = match.objects.get(spec.name)
        labels[index] = int(obj.label) if obj is not None and obj.label is not None else 0
    return np.array(labels, dtype=np.uint16 if max(labels) > 255 else np.uint8)


def _store_picks(run: Any, object_name: str, session_id: str, voxel_size_a: float,
                 xyz_a: np.ndarray, *,
                 scores: np.ndarray | None = None, transforms: np.ndarray | None = None,
                 instance_ids: np.ndarray | None = None, trust_orientation: bool) -> None:
    picks = run.new_picks(object_name, session_id, user_id=USER_ID, exist_ok=True)
    picks.meta.voxel_spacing = voxel_size_a  # the tomogram's; the coordinates are Å
    picks.meta.trust_orientation = trust_orientation
    picks.from_numpy(np.asarray(xyz_a, dtype=np.float64).reshape(-1, 3), transforms=transforms,
                     instance_ids=instance_ids,
                     scores=None if scores is None else np.asarray(scores, dtype=np.float64))


def _tomogram_location(tomogram: Any) -> str:
    if getattr(tomogram, "read_only", False):
        return str(getattr(tomogram, "static_path", tomogram.tomo_type))
    return str(getattr(tomogram, "overlay_path", tomogram.tomo_type))


def _roots(root: Any) -> str:
    config = root.config
    parts = [f"overlay_root {getattr(config, 'overlay_root', None)}"]
    if getattr(config, "static_root", None):
        parts.append(f"static_root {config.static_root}")
    return ", ".join(parts)


def _listed(names: Sequence[str], what: str, limit: int = 8) -> str:
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{len(names)} {what}: {shown}"


def _first_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return " ".join(text.split())[:300]
