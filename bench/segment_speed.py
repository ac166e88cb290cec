"""Segmentation speed and memory benchmark (issue 8): `segment_file` end to end on a synthetic
tomogram of a given shape, per stage, median of repeats. Prints JSON.

    python bench/segment_speed.py --shape 200 512 512 --repeats 3
    python bench/segment_speed.py --shape 300 1024 1024 --repeats 1      # the memory figure
    python bench/segment_speed.py --model M.safetensors --device cuda
    python bench/segment_speed.py --shape 96 256 256 --repick   # + repick from the saved maps

The tomogram: core.synth at the model's voxel size (realistic objects, so cleanup, particle
picking and filament tracing get a realistic load). Shapes larger than --tile-yx in y or x are
made by synthesizing ONE tile of (Z, tile, tile) and repeating it across y and x, written slab by
slab into a memory-mapped MRC, so that making a 300x1024x1024 input needs memory for one tile
only. The tomogram is a float32 MRC in a temporary folder, read memory-mapped as in production.

Each measurement runs in a fresh subprocess, because a process's resident high-water mark
(VmHWM) cannot be reset: per run we report ru_maxrss, VmHWM and the maximum of VmRSS sampled
every 50 ms. The network is prepared (BatchNorm folding, channels_last) before the timed run, as
the daemon keeps it between tomograms; its preparation time is reported apart.

--repick segments with every class's probability map saved and then, in the same process,
repicks the result with new thresholds (`tomolive repick`, core.repick): its stages, its time
and its ratio to the segmentation's (issue 21: under a tenth) come out under "repick".

Without --model the shipped default model is used when present; otherwise a random-weight
bundle of the same architecture (base_width 16, 5 levels, 31 slices, 6 classes) -- the
inference speed is the same, but post-processing times depend on what is predicted, so the JSON
says which model ran ("model_kind").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import tomolive  # noqa: F401  (sets OMP_WAIT_POLICY before torch is imported)

# isort: split
import mrcfile
import numpy as np
import torch
from tomolive.core.classes import SYNTH_CLASS_NAMES, default_class
from tomolive.core.infer import InferenceOptions, prepare_network, resolve_device
from tomolive.core.model import (
    BundleMeta,
    UNet25D,
    default_bundle_path,
    flops_per_voxel,
    load_bundle,
    save_bundle,
)
from tomolive.core.pipeline import SegmentOptions, segment_file
from tomolive.core.preprocess import DEFAULT_RECIPE
from tomolive.core.repick import repick_folder
from tomolive.core.stages import STAGES
from tomolive.core.synth import synthesize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak import device_name, measure_peak  # noqa: E402

# --- inputs ------------------------------------------------------------------------------------

def write_random_bundle(path: Path, voxel_size_a: float = 10.0) -> Path:
    """A random-weight bundle with the default model's architecture."""
    torch.manual_seed(0)
    # The shipped model's architecture (not the training defaults: they may differ from it).
    arch = dict(load_bundle(default_bundle_path()).meta.architecture)
    network = UNet25D(in_slices=arch["in_slices"], n_classes=arch["n_classes"],
                      base_width=arch["base_width"], levels=arch["levels"])
    meta = BundleMeta(name="bench-random", version=1, architecture=arch,
                      voxel_size_a=voxel_size_a,
                      classes=[default_class(n) for n in SYNTH_CLASS_NAMES],
                      preprocess=DEFAULT_RECIPE, description="random weights, for speed only")
    return save_bundle(path, network, meta)


def write_tomogram(path: Path, shape_zyx: tuple[int, int, int], voxel_size_a: float,
                   tile_yx: int, seed: int = 0) -> dict[str, Any]:
    """Synthesize (tiled in y/x beyond `tile_yx`) into a float32 MRC written slab by slab."""
    nz, ny, nx = shape_zyx
    tile_shape = (nz, min(ny, tile_yx), min(nx, tile_yx))
    start = time.perf_counter()
    tile = synthesize(tile_shape, voxel_size_a, seed=seed, simulator="cartoon")
    tile = tile.tomogram.astype(np.float32, copy=False)
    with mrcfile.new_mmap(path, shape=shape_zyx, mrc_mode=2, overwrite=True) as mrc:
        for y0 in range(0, ny, tile_shape[1]):
            for x0 in range(0, nx, tile_shape[2]):
                h, w = min(tile_shape[1], ny - y0), min(tile_shape[2], nx - x0)
                mrc.data[:, y0:y0 + h, x0:x0 + w] = tile[:, :h, :w]
        mrc.voxel_size = voxel_size_a
        mrc.update_header_stats()
    return {"tile_shape_zyx": list(tile_shape), "synth_s": round(time.perf_counter() - start, 2)}


# --- one measurement (child process) -----------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class _RssSampler(threading.Thread):
    """Samples VmRSS every `period_s`; `peak_kib` is the largest value seen."""

    def __init__(self, period_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.period_s, self.peak_kib, self._done = period_s, 0, threading.Event()
        self.stage = "read"
        self.stage_peak_kib: dict[str, int] = {}

    def progress(self, stage: str, fraction: float) -> None:
        """segment_file's progress callback: a finished stage moves on to the next one."""
        if fraction >= 1.0 and stage in STAGES and stage != STAGES[-1]:
            stage = STAGES[STAGES.index(stage) + 1]
        self.stage = stage

    def run(self) -> None:
        while not self._done.is_set():
            rss = _status_kib("VmRSS")
            self.peak_kib = max(self.peak_kib, rss)
            self.stage_peak_kib[self.stage] = max(self.stage_peak_kib.get(self.stage, 0), rss)
            self._done.wait(self.period_s)

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak_kib = max(self.peak_kib, _status_kib("VmRSS"))
        return self.peak_kib


def run_once(tomogram: Path, model: Path, device: str, voxel_size_a: float | None,
             threads: int | None, precision: str = "auto",
             labels_copy: Path | None = None, repick: bool = False) -> dict[str, Any]:
    """One `segment_file` run in this (fresh) process: timings and memory; with `repick`, the
    maps are saved and a repick of the result follows."""
    if threads is not None:
        torch.set_num_threads(threads)
    rss_before_kib = _status_kib("VmRSS")
    bundle = load_bundle(model)
    options = SegmentOptions(inference=InferenceOptions(device=device, precision=precision),
                             voxel_size_a=voxel_size_a, save_probabilities=repick)
    t0 = time.perf_counter()
    network = prepare_network(bundle, device)
    prepare_s = time.perf_counter() - t0
    rss_model_kib = _status_kib("VmRSS")
    sampler = _RssSampler()
    sampler.start()
    with tempfile.TemporaryDirectory(prefix="segspeed-out-", dir=tomogram.parent) as out:
        start = time.perf_counter()
        seg, out_dir = segment_file(tomogram, out, bundle, options, network=network,
                                    progress=sampler.progress)
        end_to_end_s = time.perf_counter() - start
        summary = json.loads(next(out_dir.glob("*summary*.json")).read_text())
        if labels_copy is not None:  # for --compare-precision's label agreement
            np.save(labels_copy, seg.labels)
        repicked = _time_repick(out_dir, end_to_end_s) if repick else None
    sampled_kib = sampler.stop()
    return {
        **({"repick": repicked} if repicked else {}),
        "timings_s": {k: summary["timings_s"].get(k, 0.0) for k in STAGES},
        "end_to_end_s": end_to_end_s,
        "prepare_network_s": prepare_s,
        "model_grid_shape_zyx": seg.input["model_grid_shape_zyx"],
        "class_fractions": seg.class_fractions,
        "n_particles": {k: len(v) for k, v in seg.particles.items()},
        "n_filaments": {k: len(v) for k, v in seg.filaments.items()},
        "rss_before_load_mib": rss_before_kib / 1024,
        "rss_after_model_mib": rss_model_kib / 1024,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "vm_hwm_mib": _status_kib("VmHWM") / 1024,
        "sampled_rss_peak_mib": sampled_kib / 1024,
        "sampled_rss_peak_by_stage_mib": {k: round(v / 1024, 1)
                                          for k, v in sampler.stage_peak_kib.items()},
        "torch_threads": torch.get_num_threads(),
        "precision_used": (summary.get("settings") or {}).get("precision_used"),
    }


# Thresholds that change the result (a lower bar for membrane, a higher one for ribosomes), so
# that the repick's cleanup and picking see a different label volume.
REPICK_THRESHOLDS = {"membrane": 0.35, "ribosome": 0.7}


def _time_repick(folder: Path, segment_s: float) -> dict[str, Any]:
    summary_path = next(folder.glob("*summary*.json"))
    names = {c["name"] for c in json.loads(summary_path.read_text())["classes"]}
    start = time.perf_counter()
    seg, _ = repick_folder(folder, thresholds={name: value for name, value
                                               in REPICK_THRESHOLDS.items() if name in names})
    repick_s = time.perf_counter() - start
    summary = json.loads(summary_path.read_text())
    return {"timings_s": {k: round(v, 3) for k, v in summary["timings_s"].items()},
            "end_to_end_s": round(repick_s, 3),
            "segment_with_maps_s": round(segment_s, 3),
            "repick_over_segment": round(repick_s / segment_s, 3),
            "n_particles": {k: len(v) for k, v in seg.particles.items()}}


# --- driver ------------------------------------------------------------------------------------

def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def summarize(runs: list[dict[str, Any]], shape: tuple[int, int, int], model: Path,
              model_kind: str, device: str, peak: dict[str, Any] | None,
              made: dict[str, Any]) -> dict[str, Any]:
    bundle = load_bundle(model)
    fpv = flops_per_voxel(bundle.meta.architecture)
    stages = {k: {"median": round(_median([r["timings_s"][k] for r in runs]), 3),
                  "all": [round(r["timings_s"][k], 3) for r in runs]} for k in STAGES}
    e2e = [r["end_to_end_s"] for r in runs]
    model_voxels = int(np.prod(runs[0]["model_grid_shape_zyx"]))
    inference_s = stages["inference"]["median"]
    non_inference = [(r["end_to_end_s"] - r["timings_s"]["inference"]) / r["end_to_end_s"]
                     for r in runs]
    achieved = model_voxels * fpv / inference_s if inference_s else None
    input_bytes = int(np.prod(shape)) * 4
    model_bytes = model.stat().st_size
    peak_mib = max(max(r["vm_hwm_mib"], r["sampled_rss_peak_mib"]) for r in runs)
    out: dict[str, Any] = {
        "shape_zyx": list(shape),
        "device": device,
        "precision_used": runs[0].get("precision_used"),
        "device_name": device_name(resolve_device(device)),
        "torch_threads": runs[0]["torch_threads"],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "model": str(model),
        "model_kind": model_kind,
        "tomogram": made,
        "repeats": len(runs),
        "stages_s": stages,
        "end_to_end_s": {"median": round(_median(e2e), 3), "all": [round(v, 3) for v in e2e]},
        "voxels_per_s": int(np.prod(shape)) / _median(e2e),
        "model_grid_shape_zyx": runs[0]["model_grid_shape_zyx"],
        "flops_per_voxel": fpv,
        "inference_flops_per_s": achieved,
        "non_inference_fraction": {"median": round(_median(non_inference), 4),
                                   "all": [round(v, 4) for v in non_inference]},
        "input_float32_bytes": input_bytes,
        "model_bytes": model_bytes,
        "memory_mib": {k: [round(r[k], 1) for r in runs] for k in
                       ("ru_maxrss_mib", "vm_hwm_mib", "sampled_rss_peak_mib",
                        "rss_after_model_mib")},
        "sampled_rss_peak_by_stage_mib": [r["sampled_rss_peak_by_stage_mib"] for r in runs],
        "peak_rss_over_input_float32": round(peak_mib * 2**20 / input_bytes, 3),
        "peak_rss_above_model_loaded_over_input_float32": round(
            (peak_mib - runs[0]["rss_after_model_mib"]) * 2**20 / input_bytes, 3),
        "prepare_network_s": [round(r["prepare_network_s"], 3) for r in runs],
        "class_fractions": runs[0]["class_fractions"],
        "n_particles": runs[0]["n_particles"],
        "n_filaments": runs[0]["n_filaments"],
    }
    if "repick" in runs[0]:
        ratios = [r["repick"]["repick_over_segment"] for r in runs]
        out["repick"] = {"runs": [r["repick"] for r in runs],
                         "repick_over_segment": {"median": round(_median(ratios), 3),
                                                 "all": ratios}}
    if peak is not None:
        out["peak"] = peak
        if achieved:
            out["fraction_of_attainable"] = {
                "vs_median": round(achieved / peak["flops_per_s_median"], 3),
                "vs_best": round(achieved / peak["flops_per_s_best"], 3)}
    return out


def _child(args: argparse.Namespace) -> None:
    result = run_once(Path(args.child_tomogram), Path(args.child_model), args.device,
                      args.voxel_size, args.threads, args.precision,
                      Path(args.child_labels) if args.child_labels else None, args.repick)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", nargs=3, type=int, default=[200, 512, 512],
                        metavar=("Z", "Y", "X"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="inference precision (InferenceOptions.precision)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="bundle (default: the shipped model)")
    parser.add_argument("--voxel-size", type=float, default=None,
                        help="tomogram voxel size in Å (default: the model's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--tile-yx", type=int, default=512,
                        help="synthesize tiles of at most this y/x size and repeat them")
    parser.add_argument("--peak-json", default=None,
                        help="bench/peak.py output to use instead of measuring it here")
    parser.add_argument("--scratch", default=None, help="folder for the temporary MRC")
    parser.add_argument("--child-tomogram", help=argparse.SUPPRESS)
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    parser.add_argument("--child-labels", help=argparse.SUPPRESS)
    parser.add_argument("--compare-precision", action="store_true",
                        help="run float32 and bfloat16 alternately; report both and their "
                             "ratios (speed, memory, label agreement)")
    parser.add_argument("--repick", action="store_true",
                        help="save the probability maps and time a repick after each run")
    args = parser.parse_args()
    if args.child_tomogram:
        _child(args)
        return
    with tempfile.TemporaryDirectory(prefix="segspeed-", dir=args.scratch) as tmp_text:
        tmp = Path(tmp_text)
        if args.model:
            model, kind = Path(args.model), "given"
        elif default_bundle_path().exists():
            model, kind = default_bundle_path(), "shipped default"
        else:
            model, kind = write_random_bundle(tmp / "random.safetensors"), \
                "random weights, default architecture (shipped model absent)"
        voxel_a = args.voxel_size or load_bundle(model).meta.voxel_size_a
        shape = tuple(args.shape)
        tomogram = tmp / "bench.mrc"
        made = write_tomogram(tomogram, shape, voxel_a, args.tile_yx)
        # --compare-precision: float32 and bfloat16 alternate run by run, so that a change in
        # the machine's load touches both alike.
        precisions = ["float32", "bfloat16"] if args.compare_precision else [args.precision]
        runs: dict[str, list[dict[str, Any]]] = {p: [] for p in precisions}
        for i in range(args.repeats):
            for precision in precisions:
                labels_copy = tmp / f"labels-{precision}.npy" if i == 0 else None
                runs[precision].append(_run_child(tomogram, model, voxel_a, precision, args,
                                                  labels_copy))
                print(f"run {i + 1}/{args.repeats} {precision}: "
                      f"{runs[precision][-1]['end_to_end_s']:.1f} s", file=sys.stderr)
        if args.peak_json:
            peak = json.loads(Path(args.peak_json).read_text())
        else:
            peak = measure_peak(args.device, threads=args.threads)
        results = {p: summarize(runs[p], shape, model, kind, args.device, peak, made)
                   for p in precisions}
        if args.compare_precision:
            result = {**results, "fast_vs_float32": _comparison(
                results["float32"], results["bfloat16"],
                np.load(tmp / "labels-float32.npy"), np.load(tmp / "labels-bfloat16.npy"))}
        else:
            result = results[args.precision]
    print(json.dumps(result, indent=2))


def _run_child(tomogram: Path, model: Path, voxel_a: float, precision: str,
               args: argparse.Namespace, labels_copy: Path | None) -> dict[str, Any]:
    """One run in a fresh process (its memory high-water mark is its own)."""
    cmd = [sys.executable, __file__, "--child-tomogram", str(tomogram),
           "--child-model", str(model), "--device", args.device,
           "--voxel-size", str(voxel_a), "--precision", precision]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if labels_copy is not None:
        cmd += ["--child-labels", str(labels_copy)]
    if args.repick:
        cmd += ["--repick"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{precision} run failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _comparison(exact: dict[str, Any], fast: dict[str, Any], exact_labels: np.ndarray,
                fast_labels: np.ndarray) -> dict[str, Any]:
    """The issue's figures: speed ratios (fast over float32), memory, and label agreement."""
    def inference_voxels_per_s(result: dict[str, Any]) -> float:
        return np.prod(result["model_grid_shape_zyx"]) / result["stages_s"]["inference"]["median"]

    def peak_mib(result: dict[str, Any]) -> float:
        return max(max(result["memory_mib"]["vm_hwm_mib"]),
                   max(result["memory_mib"]["sampled_rss_peak_mib"]))

    return {
        "precision_used": fast["precision_used"],
        "inference_speed_ratio": round(inference_voxels_per_s(fast)
                                       / inference_voxels_per_s(exact), 3),
        "end_to_end_speed_ratio": round(exact["end_to_end_s"]["median"]
                                        / fast["end_to_end_s"]["median"], 3),
        "non_inference_fraction_fast": fast["non_inference_fraction"]["median"],
        "peak_memory_ratio": round(peak_mib(fast) / peak_mib(exact), 3),
        "label_voxels_agreeing": float((exact_labels == fast_labels).mean()),
    }


if __name__ == "__main__":
    main()
