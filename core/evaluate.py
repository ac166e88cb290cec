"""Segmentation quality: Dice per class, particle precision/recall/F1 within a distance.

Conventions:
- Dice of a class that is absent from both prediction and truth is NaN (undefined; it would
  otherwise inflate averages); in `evaluate` results (JSON) it is None.
- Particle precision is undefined (NaN) without predictions, recall without truth; F1 is
  2tp / (2tp + fp + fn), NaN only when both tables are empty. None in `evaluate` results.
- Particles match one-to-one within `max_distance` voxels; the matching maximises the number of
  matched pairs (maximum bipartite matching on the pairs closer than the distance), so TP does
  not depend on table order. `evaluate` uses half the particle radius per class.
- Particle tables are `{class: (n, 3) array of x, y, z}` voxel indices (CSV column order).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching
from scipy.spatial import cKDTree

from .classes import ClassSpec
from .star import ParticleTables, read_particle_csv


def confusion_matrix(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """(n+1) x (n+1) voxel counts [pred, truth], slab by slab; values outside 0..n count as 0."""
    k = n_classes + 1
    counts = np.zeros(k * k, dtype=np.int64)
    step = max(1, 4_000_000 // max(1, int(np.prod(pred.shape[1:]))))
    for z0 in range(0, pred.shape[0], step):
        p = np.asarray(pred[z0: z0 + step]).astype(np.int32)
        t = np.asarray(truth[z0: z0 + step]).astype(np.int32)
        p[(p < 0) | (p > n_classes)] = 0
        t[(t < 0) | (t > n_classes)] = 0
        counts += np.bincount((p * k + t).ravel(), minlength=k * k)
    return counts.reshape(k, k)


def where_truth_goes(conf: np.ndarray, class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """For each truth class, the fractions of its voxels predicted as each class (background
    included), from a `confusion_matrix`: where a class's misses go."""
    names = ["background", *class_names]
    result = {}
    for t, truth_name in enumerate(names[1:], start=1):
        total = int(conf[:, t].sum())
        if total:
            result[truth_name] = {names[p]: round(float(conf[p, t]) / total, 4)
                                  for p in range(len(names)) if conf[p, t]}
    return result


def dice_per_class(pred: np.ndarray, truth: np.ndarray,
                   class_names: Sequence[str]) -> dict[str, float]:
    """Dice of label i (1..n) = class_names[i-1]; NaN where the class is in neither volume."""
    if pred.shape != truth.shape:
        raise ValueError(f"dice_per_class: shapes differ: pred {pred.shape}, truth {truth.shape}")
    conf = confusion_matrix(pred, truth, len(class_names))
    return {name: _dice_from(conf, i) for i, name in enumerate(class_names, start=1)}


def _dice_from(conf: np.ndarray, i: int) -> float:
    both = int(conf[i, i])
    total = int(conf[i, :].sum() + conf[:, i].sum())
    return 2.0 * both / total if total else math.nan


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def match_particles(pred_xyz: np.ndarray, truth_xyz: np.ndarray,
                    max_distance: float) -> dict[str, Any]:
    """One-to-one matching within `max_distance`: precision, recall, f1, tp, fp, fn, and the
    mean distance of the matched pairs (NaN when none)."""
    pred = np.asarray(pred_xyz, dtype=np.float64).reshape(-1, 3)
    truth = np.asarray(truth_xyz, dtype=np.float64).reshape(-1, 3)
    if not max_distance > 0:
        raise ValueError(f"match_particles: max_distance must be > 0, got {max_distance}")
    pairs = np.array([], dtype=[("i", "i8"), ("j", "i8"), ("v", "f8")])
    if len(pred) and len(truth):
        pairs = cKDTree(pred).sparse_distance_matrix(cKDTree(truth), max_distance,
                                                     output_type="ndarray")
    tp, mean_distance = 0, math.nan
    if len(pairs):
        # Distances of exactly 0 would vanish from a sparse matrix: store them shifted by 1.
        graph = csr_matrix((pairs["v"] + 1.0, (pairs["i"], pairs["j"])),
                           shape=(len(pred), len(truth)))
        match = maximum_bipartite_matching(graph, perm_type="column")  # pred i -> truth j
        matched = np.nonzero(match >= 0)[0]
        tp = len(matched)
        if tp:
            mean_distance = float(np.linalg.norm(pred[matched] - truth[match[matched]],
                                                 axis=1).mean())
    fp, fn = len(pred) - tp, len(truth) - tp
    return {
        "precision": _ratio(tp, len(pred)),
        "recall": _ratio(tp, len(truth)),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "tp": tp, "fp": fp, "fn": fn,
        "mean_distance": mean_distance,
    }


def particle_radii_vox(classes: Iterable[ClassSpec], voxel_size_a: float) -> dict[str, float]:
    """Radius in voxels of every particle/fiducial class (diameter_nm / 2 on this grid)."""
    if not voxel_size_a > 0:
        raise ValueError(f"particle_radii_vox: voxel_size_a must be > 0, got {voxel_size_a}")
    return {c.name: c.diameter_nm * 10.0 / voxel_size_a / 2.0
            for c in classes if c.is_particle and c.diameter_nm}


def as_tables(particles: ParticleTables | Iterable[tuple] | None) -> ParticleTables:
    """`{class: (n, 3) xyz}` from such a dict or from rows (class, x, y, z[, ...])."""
    if particles is None:
        return {}
    if isinstance(particles, dict):
        return {k: np.asarray(v, dtype=np.float64).reshape(-1, 3) for k, v in particles.items()}
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for row in particles:
        rows.setdefault(str(row[0]), []).append((float(row[1]), float(row[2]), float(row[3])))
    return {k: np.array(v, dtype=np.float64).reshape(-1, 3) for k, v in rows.items()}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def evaluate(
    pred_labels: np.ndarray,
    truth_labels: np.ndarray,
    class_names: Sequence[str],
    pred_particles: ParticleTables | Iterable[tuple] | None = None,
    truth_particles: ParticleTables | Iterable[tuple] | None = None,
    particle_radius_vox: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Dice per class and, for each class in `particle_radius_vox`, particle matching within
    half its radius. Undefined scores are None (JSON null). Keys: dice, mean_dice, voxels
    (per class: pred, truth), particles (per class: match_particles + max_distance)."""
    if pred_labels.shape != truth_labels.shape:
        raise ValueError(f"evaluate: label shapes differ: pred {pred_labels.shape}, "
                         f"truth {truth_labels.shape}")
    conf = confusion_matrix(pred_labels, truth_labels, len(class_names))
    dice = {name: _dice_from(conf, i) for i, name in enumerate(class_names, start=1)}
    defined = [d for d in dice.values() if not math.isnan(d)]
    voxels = {name: {"pred": int(conf[i, :].sum()), "truth": int(conf[:, i].sum())}
              for i, name in enumerate(class_names, start=1)}
    result: dict[str, Any] = {
        "dice": dice,
        "mean_dice": float(np.mean(defined)) if defined else math.nan,
        "voxels": voxels,
        "particles": {},
    }
    if particle_radius_vox and (pred_particles is not None or truth_particles is not None):
        pred_t, truth_t = as_tables(pred_particles), as_tables(truth_particles)
        empty = np.zeros((0, 3))
        for name, radius in particle_radius_vox.items():
            stats = match_particles(pred_t.get(name, empty), truth_t.get(name, empty),
                                    radius / 2.0)
            result["particles"][name] = {**stats, "max_distance": radius / 2.0}
    return _json_safe(result)


def evaluate_files(
    pred_path: str | os.PathLike,
    truth_path: str | os.PathLike,
    classes: Sequence[ClassSpec],
    pred_particles: str | os.PathLike | None = None,
    truth_particles: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """`evaluate` on two label MRC files (and optional particle CSVs); radii from `classes` and
    the truth's voxel size."""
    from .volume import read_mrc

    pred = read_mrc(pred_path)
    truth = read_mrc(truth_path)
    if pred.data.shape != truth.data.shape:
        raise ValueError(f"{pred_path}: shape {pred.data.shape} differs from {truth_path} "
                         f"{truth.data.shape}")
    if abs(pred.voxel_size_a - truth.voxel_size_a) > 0.01 * truth.voxel_size_a:
        raise ValueError(f"{pred_path}: voxel size {pred.voxel_size_a:g} Å differs from "
                         f"{truth_path} {truth.voxel_size_a:g} Å")
    pred_t = read_particle_csv(pred_particles) if pred_particles else None
    truth_t = read_particle_csv(truth_particles) if truth_particles else None
    result = evaluate(pred.data, truth.data, [c.name for c in classes], pred_t, truth_t,
                      particle_radii_vox(classes, truth.voxel_size_a))
    result["files"] = {"pred": str(pred_path), "truth": str(truth_path),
                       "pred_particles": str(pred_particles) if pred_particles else None,
                       "truth_particles": str(truth_particles) if truth_particles else None}
    result["voxel_size_a"] = truth.voxel_size_a
    return result


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_table(result: dict[str, Any]) -> str:
    """Plain-text tables of an `evaluate` result, for the command line."""
    lines = [f"{'class':<14}{'dice':>8}{'pred vox':>12}{'truth vox':>12}"]
    for name, dice in result["dice"].items():
        vox = result.get("voxels", {}).get(name, {})
        lines.append(f"{name:<14}{_fmt(dice):>8}{vox.get('pred', ''):>12}"
                     f"{vox.get('truth', ''):>12}")
    lines.append(f"{'mean':<14}{_fmt(result.get('mean_dice')):>8}")
    if result.get("particles"):
        lines.append("")
        lines.append(f"{'particles':<14}{'prec':>8}{'recall':>8}{'f1':>8}{'tp':>6}{'fp':>6}"
                     f"{'fn':>6}{'within':>8}")
        for name, s in result["particles"].items():
            lines.append(f"{name:<14}{_fmt(s['precision']):>8}{_fmt(s['recall']):>8}"
                         f"{_fmt(s['f1']):>8}{s['tp']:>6}{s['fp']:>6}{s['fn']:>6}"
                         f"{_fmt(s['max_distance'], 1):>8}")
    return "\n".join(lines)
