"""Training quality benchmark (issue 4): train on a 16-slice region of ONE synthetic tomogram
within a CPU time budget, segment two OTHER synthetic tomograms (one at 10 Å float32, one at
13.2 Å stored as int16) with the pipeline `tomolive segment` uses, and score them with
core.evaluate (Dice per class; particle F1 for ribosome and gold, matched within half the
particle radius). Prints JSON.

    python bench/train_quality.py                  # 10-minute budget (the issue's setting)
    python bench/train_quality.py --minutes 3      # shorter
    python bench/train_quality.py --model M.safetensors   # score an existing model, no training
    python bench/train_quality.py --train-seeds 11        # train on seed 11, no choice

Which tomogram is annotated: the protocol's user paints a few slices of a tomogram where every
feature is present. The benchmark does the same reproducibly and from the training labels only
(never the test tomograms): of the candidate seeds (--train-seeds), the one whose best window
(choose_window) holds the most voxels of every class (the largest geometric mean of its class
counts). Every candidate's counts are in the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tomolive.core.classes import SYNTH_CLASS_NAMES
from tomolive.core.evaluate import evaluate, particle_radii_vox
from tomolive.core.infer import InferenceOptions
from tomolive.core.model import load_bundle, save_bundle
from tomolive.core.pipeline import SegmentOptions, segment_file
from tomolive.core.synth import SynthResult, synthesize, write_synth
from tomolive.core.training import (
    TrainingSource,
    TrainOptions,
    class_specs_for,
    parse_option,
    parse_region,
    train,
)

# The cartoon scenes this benchmark's targets and history were set on (issue 4); realistic data
# are measured by validation_quality.py on tomograms this project did not make.
SIMULATOR = "cartoon"
TARGETS = {"dice": {"membrane": 0.75, "microtubule": 0.75, "gold": 0.75, "actin": 0.5,
                    "ribosome": 0.5},
           "particle_f1": {"ribosome": 0.8, "gold": 0.8}}


# Candidate training tomograms: seed 11 (the first sessions' fixed choice) and 14..20, every
# seed from 11 to 20 that is not a test tomogram. Fixed before any of them was scored.
DEFAULT_TRAIN_SEEDS = [11, 14, 15, 16, 17, 18, 19, 20]


def physical_shape(shape_zyx: tuple[int, int, int], voxel_a: float, ref_voxel_a: float
                   ) -> tuple[int, ...]:
    """The shape that covers the same physical box ((n - 1) * voxel) at another voxel size,
    so that synth puts the same objects in it."""
    return tuple(int(round((n - 1) * ref_voxel_a / voxel_a)) + 1 for n in shape_zyx)


def choose_window(labels: np.ndarray, n_classes: int, slices: int) -> tuple[int, list[int]]:
    """The start of the `slices`-slice z-window with the largest geometric mean (over classes)
    of the share of each class's voxels in the tomogram that it holds, and its voxel count per
    class. The protocol's user paints a portion where every class is present; this picks such
    a portion reproducibly."""
    per_z = np.stack([np.bincount(labels[z].reshape(-1).astype(np.int64), minlength=256)
                      [1:n_classes + 1] for z in range(labels.shape[0])])
    totals = np.maximum(per_z.sum(axis=0), 1)
    windows = [per_z[z:z + slices].sum(axis=0) for z in range(labels.shape[0] - slices + 1)]
    # Geometric mean of the shares: every class must be well represented (a zero share loses),
    # without one rare class (gold: a few beads) alone deciding, as a plain minimum would.
    z0 = max(range(len(windows)),
             key=lambda z: (float(np.sum(np.log(windows[z] / totals + 1e-9))), -z))
    return z0, [int(c) for c in windows[z0]]


def choose_tomogram(seeds: list[int], shape: tuple[int, int, int], slices: int
                    ) -> tuple[SynthResult, dict, list[dict]]:
    """The candidate whose best window (choose_window) holds the most of every class: the
    largest geometric mean of its per-class voxel counts (ties: the lower seed). Decided on the
    candidates' own labels only. Returns its tomogram, its record and every candidate's."""
    records: list[dict] = []
    best: tuple[SynthResult, dict] | None = None
    for seed in seeds:
        result = synthesize(shape, 10.0, seed=seed, simulator=SIMULATOR)
        z0, counts = choose_window(result.labels, len(SYNTH_CLASS_NAMES), slices)
        geometric_mean = float(np.exp(np.mean(np.log(np.maximum(counts, 1)))))
        record = {"seed": seed, "window_z0": z0, "geometric_mean_voxels": round(geometric_mean),
                  "class_voxels": dict(zip(SYNTH_CLASS_NAMES, counts, strict=True))}
        records.append(record)
        if best is None or (record["geometric_mean_voxels"], -seed) > \
                (best[1]["geometric_mean_voxels"], -best[1]["seed"]):
            best = (result, record)  # only the leader's volumes are kept
    assert best is not None, "at least one candidate seed"
    return best[0], best[1], records


def train_model(folder: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    overlap = sorted(set(args.train_seeds) & set(args.test_seeds))
    if overlap:
        raise SystemExit(f"train_quality: seeds {overlap} are both training candidates and tests")
    result, chosen, candidates = choose_tomogram(args.train_seeds, tuple(args.shape),
                                                 args.slices)
    train_seed, z0 = chosen["seed"], chosen["window_z0"]
    write_synth(result, folder / "train.mrc", folder / "train_labels.mrc")
    region = parse_region(f"{z0}:{z0 + args.slices},:,:")
    settings = dict(max_minutes=args.minutes, steps=args.steps, device=args.device,
                    seed=args.seed, base_width=args.base_width, synthetic=True,
                    name="bench-train-quality",
                    description="train_quality benchmark: 16 slices of one tomogram")
    options = TrainOptions(**{**settings, **dict(args.set)})  # --option wins over --base-width
    last = {"t": 0.0}

    def progress(report) -> None:
        if report.elapsed_s - last["t"] >= 30 and report.validation_dice is not None:
            last["t"] = report.elapsed_s
            dice = " ".join(f"{k}={v:.2f}" for k, v in report.validation_dice.items())
            print(f"step {report.step} {report.elapsed_s:.0f}s loss {report.loss:.3f} "
                  f"val {dice}", file=sys.stderr, flush=True)

    trained = train([TrainingSource(folder / "train.mrc", folder / "train_labels.mrc", region)],
                    class_specs_for(SYNTH_CLASS_NAMES), options, progress=progress)
    path = save_bundle(folder / "model.safetensors", trained.network, trained.meta)
    t = trained.meta.training
    return path, {"steps": t["steps"], "elapsed_s": t["elapsed_s"], "kept": t["kept"],
                  "kept_step": t["kept_step"], "best_validation_step": t["best_validation_step"],
                  "validation_dice": t["validation_dice"],
                  "train_seed": train_seed,
                  "tomogram_rule": "of the candidate seeds, the one whose best window holds "
                                   "the most voxels of every class (largest geometric mean of "
                                   "the per-class counts); training labels only",
                  "candidates": candidates,
                  "region": {"zyx": f"{z0}:{z0 + args.slices},:,:",
                             "rule": "the z-window of --slices slices maximising the geometric "
                                     "mean over classes of its share of the class's voxels "
                                     "(every class painted, as the protocol's user would)",
                             "class_voxels": chosen["class_voxels"]}}


def score(bundle_path: Path, folder: Path, seed: int, voxel_a: float, dtype: str,
          args: argparse.Namespace) -> dict:
    shape = physical_shape(tuple(args.shape), voxel_a, 10.0)
    result = synthesize(shape, voxel_a, seed=seed, simulator=SIMULATOR)
    stem = f"test_s{seed}_{voxel_a:g}A_{dtype}"
    write_synth(result, folder / f"{stem}.mrc", dtype=dtype)
    bundle = load_bundle(bundle_path)
    options = SegmentOptions(inference=InferenceOptions(device=args.device, tta_flips=args.tta))
    start = time.perf_counter()
    seg, _ = segment_file(folder / f"{stem}.mrc", folder / "out", bundle, options)
    seconds = time.perf_counter() - start
    names = [c.name for c in bundle.classes]
    pred = {name: table.zyx[:, ::-1] for name, table in seg.particles.items()}
    scores = evaluate(seg.labels, result.labels, names, pred, result.particles,
                      particle_radii_vox(bundle.classes, voxel_a))
    return {
        "tomogram": stem, "shape_zyx": list(shape), "segment_s": round(seconds, 1),
        "dice": {k: _round(v) for k, v in scores["dice"].items()},
        "particle_f1": {k: _round(v["f1"]) for k, v in scores["particles"].items()},
        "particles": {k: {"tp": v["tp"], "fp": v["fp"], "fn": v["fn"]}
                      for k, v in scores["particles"].items()},
        "predicted_as": predicted_as(seg.labels, result.labels, names),
    }


def predicted_as(pred: np.ndarray, truth: np.ndarray, names: list[str]) -> dict:
    """Per true class: the share of its voxels given each label (where the errors go)."""
    labels = ["background", *names]
    n = len(labels)
    counts = np.bincount(truth.reshape(-1).astype(np.int64) * n + pred.reshape(-1).astype(np.int64),
                         minlength=n * n).reshape(n, n)
    return {labels[t]: {labels[p]: round(float(counts[t, p] / max(counts[t].sum(), 1)), 3)
                        for p in range(n) if counts[t, p]} for t in range(1, n)}


def _option(text: str) -> tuple[str, object]:
    """A TrainOptions tuning field, as `tomolive train --option` reads it."""
    try:
        return parse_option(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


def verdict(tests: list[dict]) -> dict:
    """Per target: the worst value over the test tomograms and whether it meets the target."""
    out = {}
    for kind, targets in TARGETS.items():
        for name, target in targets.items():
            values = [t[kind].get(name) for t in tests]
            worst = min((v if v is not None else 0.0) for v in values)
            out[f"{kind}:{name}"] = {"target": target, "worst": worst, "met": worst >= target}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="training budget (CPU minutes)")
    p.add_argument("--steps", type=int, default=None, help="also stop after this many steps")
    p.add_argument("--model", type=Path, help="score this bundle instead of training one")
    p.add_argument("--shape", type=int, nargs=3, default=[64, 256, 256], metavar=("Z", "Y", "X"))
    p.add_argument("--slices", type=int, default=16, help="annotated z-slices (region depth)")
    p.add_argument("--train-seeds", type=int, nargs="+", default=DEFAULT_TRAIN_SEEDS,
                   help="candidate training tomograms (one seed: no choice)")
    p.add_argument("--test-seeds", type=int, nargs=2, default=[12, 13])
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--base-width", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tta", action="store_true",
                   help="segment with flip test-time augmentation (tomolive segment --tta)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--keep", type=Path, help="keep the files in this folder")
    p.add_argument("--option", "--set", dest="set", type=_option, action="append", default=[],
                   metavar="NAME=VALUE",
                   help="a TrainOptions tuning field, as `tomolive train --option` takes it")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="tomolive-bench-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        training = None
        bundle_path = args.model
        if bundle_path is None:
            bundle_path, training = train_model(folder, args)
        tests = [score(bundle_path, folder, args.test_seeds[0], 10.0, "float32", args),
                 score(bundle_path, folder, args.test_seeds[1], 13.2, "int16", args)]
    report = {"benchmark": "train_quality", "budget_minutes": args.minutes,
              "options": dict(args.set), "command": " ".join(sys.argv),
              "device": args.device, "threads": torch.get_num_threads(), "tta": args.tta,
              "training": training, "tests": tests, "targets": verdict(tests)}
    report["all_met"] = all(v["met"] for v in report["targets"].values())
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
