"""The specimen mask on simulated lamellae (issue 21, item 1): per seed, a specimen drawn from
the documented ranges (core.specimen.SpecimenParams.sample) with its thickness set so that a
void lies above and below it in the box, imaged by the microscope simulator; the slab found
(core.specimen_mask) against the truth, and the shipped model's outputs with the mask off and
on, counted against the true slab. Prints JSON (one record per seed and a summary).

    python bench/specimen_mask.py                      # 8 seeds, 120 x 192 x 192 at 10 Å
    python bench/specimen_mask.py --seeds 0 1 2 --shape 120 256 256

The simulator is this project's own: it shows the method works on physics we modelled, not on
specimens we did not draw (see docs/specimen_mask.md for the validation tomograms).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import tomolive  # noqa: F401  (sets OMP_WAIT_POLICY before torch is imported)


def _true_surfaces_nm(info: dict, slab) -> tuple[np.ndarray, np.ndarray]:
    normal = np.asarray(info["slab_normal_zyx"])
    centre = np.asarray(info["slab_centre_nm"])
    half = info["params"]["thickness_nm"] / 2
    _, ny, nx = slab.extent_nm_zyx
    yy, xx = np.meshgrid(np.linspace(0, ny, 16), np.linspace(0, nx, 16), indexing="ij")
    def height(offset: float) -> np.ndarray:
        return centre[0] + (offset - (yy - centre[1]) * normal[1]
                            - (xx - centre[2]) * normal[2]) / normal[0]
    return height(-half), height(half)


def _outside_true(zyx_vox: np.ndarray, info: dict, voxel_nm: float) -> np.ndarray:
    depth = (np.asarray(zyx_vox).reshape(-1, 3) * voxel_nm
             - np.asarray(info["slab_centre_nm"])) @ np.asarray(info["slab_normal_zyx"])
    return np.abs(depth) > info["params"]["thickness_nm"] / 2


def _counts_outside(seg, info: dict, voxel_nm: float) -> dict:
    """Particles, filament points and foreground voxels beyond the true surfaces (gold is
    exempt: it sits on them)."""
    non_gold = [seg.class_index(s.name) for s in seg.classes if s.kind != "fiducial"]
    z, y, x = np.nonzero(np.isin(seg.labels, non_gold))
    voxels = np.column_stack([z, y, x])
    points = [f.points_zyx for name, found in seg.filaments.items() for f in found]
    return {
        "particles": {name: int(_outside_true(t.zyx, info, voxel_nm).sum())
                      for name, t in seg.particles.items() if name != "gold"},
        "particles_total": {name: len(t) for name, t in seg.particles.items()
                            if name != "gold"},
        "filament_points": int(sum(_outside_true(p, info, voxel_nm).sum() for p in points)),
        "foreground_voxels_outside_fraction": float(
            _outside_true(voxels, info, voxel_nm).mean()) if len(voxels) else 0.0,
    }


def run_seed(seed: int, shape: tuple[int, int, int], voxel_a: float, bundle, out: Path
             ) -> dict:
    from tomolive.core.infer import InferenceOptions
    from tomolive.core.microscope import simulate_tomogram
    from tomolive.core.pipeline import SegmentOptions, segment_file
    from tomolive.core.specimen import SpecimenParams
    from tomolive.core.specimen_mask import find_specimen
    from tomolive.core.volume import write_mrc

    rng = np.random.default_rng(seed)
    depth_nm = shape[0] * voxel_a / 10
    # Thick enough to hold the sample, thin enough to leave a void: 45-80 % of the box.
    params = replace(SpecimenParams.sample(rng),
                     thickness_nm=float(rng.uniform(0.45, 0.8) * depth_nm))
    t0 = time.perf_counter()
    result = simulate_tomogram(shape, voxel_a, seed=seed, specimen=params)
    simulate_s = time.perf_counter() - t0
    info = result.info["specimen"]
    voxel_nm = voxel_a / 10
    t0 = time.perf_counter()
    slab = find_specimen(result.tomogram, (voxel_nm,) * 3)
    find_s = time.perf_counter() - t0
    lower, upper = slab.heights_nm()
    true_lower, true_upper = _true_surfaces_nm(info, slab)
    clip = lambda a: np.clip(a, 0.0, depth_nm)  # noqa: E731  (inside the volume)
    true_tilt = math.degrees(math.acos(abs(info["slab_normal_zyx"][0])))
    record = {
        "seed": seed, "outside": params.outside, "carbon_edge": params.carbon_edge,
        "contamination": params.contamination, "thickness_true_nm": params.thickness_nm,
        "tilt_true_deg": true_tilt, "found": [slab.lower.found, slab.upper.found],
        "surface_error_nm": [float(np.abs(clip(lower) - clip(true_lower)).mean()),
                             float(np.abs(clip(upper) - clip(true_upper)).mean())],
        "thickness_nm": slab.thickness_nm()["mean"], "tilt_deg": slab.tilt_deg(),
        "contrast": slab.contrast, "simulate_s": simulate_s, "find_specimen_s": find_s,
    }
    record["thickness_error_fraction"] = (record["thickness_nm"] / params.thickness_nm - 1)
    path = out / f"lamella_{seed}.mrc"
    write_mrc(path, result.tomogram.astype(np.float32), voxel_a, (0.0, 0.0, 0.0))
    inference = InferenceOptions(device="cpu", precision="float32")
    for name, mask in (("mask_off", False), ("mask_on", True)):
        seg, _ = segment_file(path, out / name, bundle,
                              SegmentOptions(inference=inference, specimen_mask=mask))
        record[name] = _counts_outside(seg, info, voxel_nm)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--shape", type=int, nargs=3, default=(120, 192, 192),
                        metavar=("Z", "Y", "X"))
    parser.add_argument("--voxel-size", type=float, default=10.0, dest="voxel_size_a")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from tomolive.core.model import default_bundle_path, load_bundle

    torch.set_num_threads(args.threads)
    bundle = load_bundle(default_bundle_path())
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            records.append(run_seed(seed, tuple(args.shape), args.voxel_size_a, bundle,
                                    Path(tmp)))
            print(json.dumps(records[-1]), file=sys.stderr)
    both = [r for r in records if all(r["found"])]
    errors = [e for r in both for e in r["surface_error_nm"]]
    summary = {
        "seeds": len(records), "both_surfaces_found": len(both),
        "surface_error_nm_mean": float(np.mean(errors)) if errors else None,
        "surface_error_nm_max": float(np.max(errors)) if errors else None,
        "thickness_error_fraction_mean_abs": float(np.mean(
            [abs(r["thickness_error_fraction"]) for r in both])) if both else None,
        "particles_outside_off_on": [
            sum(sum(r[k]["particles"].values()) for r in records) for k in ("mask_off",
                                                                            "mask_on")],
        "filament_points_outside_off_on": [sum(r[k]["filament_points"] for r in records)
                                           for k in ("mask_off", "mask_on")],
        "foreground_outside_fraction_mean_off_on": [
            float(np.mean([r[k]["foreground_voxels_outside_fraction"] for r in records]))
            for k in ("mask_off", "mask_on")],
    }
    print(json.dumps({"benchmark": "specimen_mask", "shape_zyx": list(args.shape),
                      "voxel_size_a": args.voxel_size_a, "records": records,
                      "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
