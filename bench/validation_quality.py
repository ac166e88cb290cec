"""Validation quality benchmark (issue 14 item 3): segment every validation tomogram of
`shared/validation` with one model exactly as `tomolive segment` does (same SegmentOptions,
prepared network reused across tomograms, on CPU by default), then score each output folder with
the validation set's own independent scorer (`score.py`, run as a subprocess). Prints JSON.

    python bench/validation_quality.py                          # the shipped default model
    python bench/validation_quality.py --model M.safetensors --tta
    python bench/validation_quality.py --names val_1 --out /tmp/val   # keep the outputs

Measure only: never train on val_2 / val_3, nor on val_1 outside its annotated slices z 48:64
(shared/validation/README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np
import torch
from tomolive.core.evaluate import confusion_matrix, where_truth_goes
from tomolive.core.infer import InferenceOptions, prepare_network
from tomolive.core.model import ModelBundle, default_bundle_path, load_bundle
from tomolive.core.pipeline import SegmentOptions, segment_file
from tomolive.core.result_folder import read_summary

# Label value i + 1 of the truth volumes is TRUTH_CLASSES[i] (validation README).
TRUTH_CLASSES = ("membrane", "microtubule", "actin", "ribosome", "gold")
PARTICLE_CLASSES = ("ribosome", "gold")
DEFAULT_NAMES = ("val_1", "val_2", "val_3")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VALIDATION_DIR = REPO_ROOT.parent / "shared" / "validation"


def label_lookup(model_classes: list[str]) -> np.ndarray | None:
    """Model label value -> truth label value (by class name; classes the truth lacks -> 0), or
    None when the model's labels already mean what the truth's do (no remap needed)."""
    if list(model_classes) == list(TRUTH_CLASSES[:len(model_classes)]):
        return None
    lookup = np.zeros(256, dtype=np.int8)
    for i, name in enumerate(model_classes):
        if name in TRUTH_CLASSES:
            lookup[i + 1] = TRUTH_CLASSES.index(name) + 1
    return lookup


def scoring_folder(out_dir: Path, lookup: np.ndarray | None, scratch: Path) -> Path:
    """The folder score.py reads: it takes label value i as the i-th name of --classes and reads
    OUT/STEM/STEM_labels.mrc and OUT/STEM/STEM_particles.csv (STEM = the folder's name). When the
    model orders its classes differently, or has other ones, its labels would be scored against
    the wrong truth class; so a remapped copy of the labels (and the particle CSV, whose rows
    are matched by class name and need no remap) goes into scratch/STEM instead. The pipeline's
    own outputs are never modified."""
    if lookup is None:
        return out_dir
    stem = out_dir.name
    folder = scratch / stem
    folder.mkdir(parents=True, exist_ok=True)
    with mrcfile.open(out_dir / f"{stem}_labels.mrc", permissive=True) as mrc:
        labels = lookup[np.asarray(mrc.data).astype(np.int64) & 0xFF]
        voxel_size = mrc.voxel_size.copy()
    with mrcfile.new(folder / f"{stem}_labels.mrc", overwrite=True) as mrc:
        mrc.set_data(labels)
        mrc.voxel_size = voxel_size
    csv = out_dir / f"{stem}_particles.csv"
    if csv.exists():
        shutil.copyfile(csv, folder / csv.name)
    return folder


def run_scorer(score_py: Path, folder: Path, truth_stem: Path) -> dict:
    """score.py's JSON for one output folder."""
    cmd = [sys.executable, str(score_py), str(folder), f"{truth_stem}_labels.mrc",
           f"{truth_stem}_particles.csv", "--classes", ",".join(TRUTH_CLASSES)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"score.py failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    result = json.loads(lines[-1])
    if done.returncode or "error" in result:
        raise RuntimeError(f"score.py failed ({done.returncode}): {result.get('error', '')}")
    return result


def _clean(value: float | None) -> float | None:
    """NaN (a class absent from both volumes) -> None, so the JSON stays strict."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), 4)


def tomogram_record(name: str, scores: dict, model_classes: list[str], segment_s: float,
                    score_s: float, timings_s: dict[str, float]) -> dict:
    missing = [c for c in TRUTH_CLASSES if c not in model_classes]
    particles = {cls: dict(rec) for cls, rec in scores["particles"].items()}
    return {
        "tomogram": name, "segment_s": round(segment_s, 1), "score_s": round(score_s, 1),
        "stages_s": {k: round(v, 2) for k, v in timings_s.items()},
        "pred_voxel_size_a": scores.get("pred_voxel_size"),
        "dice_tol1": {c: None if c in missing else _clean(scores["dice_tol1"][c])
                      for c in TRUTH_CLASSES},
        "dice": {c: None if c in missing else _clean(scores["dice"][c]) for c in TRUTH_CLASSES},
        "particles": particles, "missing_classes": missing, "files": scores.get("files", []),
    }


def segment_and_score(name: str, args: argparse.Namespace, bundle: ModelBundle, network,
                      out_parent: Path, scratch: Path) -> dict:
    truth_stem = args.validation_dir / name
    options = SegmentOptions(inference=segment_inference_options(args),
                             specimen_mask=args.specimen_mask)
    start = time.perf_counter()
    seg, out_dir = segment_file(args.validation_dir / f"{name}.mrc", out_parent, bundle,
                                options, network=network)
    segment_s = time.perf_counter() - start
    names = [c.name for c in bundle.classes]
    start = time.perf_counter()
    folder = scoring_folder(out_dir, label_lookup(names), scratch)
    scores = run_scorer(args.validation_dir / "score.py", folder, truth_stem)
    score_s = time.perf_counter() - start
    # The summary's stages include the write and the total, which seg.timings_s lacks.
    summary = read_summary(out_dir)
    record = tomogram_record(name, scores, names, segment_s, score_s, summary["timings_s"])
    record["remapped_labels"] = folder != out_dir
    record["truth_voxels_predicted_as"] = truth_breakdown(folder, truth_stem)
    return record


def truth_breakdown(folder: Path, truth_stem: Path) -> dict[str, dict[str, float]]:
    """Where each truth class's voxels went (fractions per predicted class), on the labels
    score.py scored: the error analysis issue 14 asks for, per tomogram."""
    with mrcfile.open(folder / f"{folder.name}_labels.mrc", permissive=True) as mrc:
        pred = np.asarray(mrc.data)
        with mrcfile.open(f"{truth_stem}_labels.mrc", permissive=True) as truth:
            conf = confusion_matrix(pred, np.asarray(truth.data), len(TRUTH_CLASSES))
    return where_truth_goes(conf, TRUTH_CLASSES)


def segment_inference_options(args: argparse.Namespace) -> InferenceOptions:
    """What daemon/cli.py's _segment_options builds for `tomolive segment --device D [--tta]`."""
    inference = InferenceOptions(device=args.device, tta_flips=args.tta,
                                 precision=getattr(args, "precision", "auto"))
    if args.batch_size:
        inference.batch_size = args.batch_size
    return inference


def class_means(tests: list[dict]) -> dict:
    """Per class: the mean over tomograms of each measure (None where any is None)."""
    def mean(values: list[float | None]) -> float | None:
        return None if not values or any(v is None for v in values) else \
            round(float(np.mean(values)), 4)

    out: dict = {key: {c: mean([t[key][c] for t in tests]) for c in TRUTH_CLASSES}
                 for key in ("dice_tol1", "dice")}
    out["particles"] = {cls: {k: mean([t["particles"].get(cls, {}).get(k) for t in tests])
                              for k in ("precision", "recall", "f1")}
                        for cls in PARTICLE_CLASSES}
    return out


def summary_line(tests: list[dict]) -> str:
    def series(values: list[float | None]) -> str:
        return "/".join("-" if v is None else f"{v:.2f}" for v in values)

    dice = " ".join(f"{c} {series([t['dice_tol1'][c] for t in tests])}" for c in TRUTH_CLASSES)
    f1 = " ".join(f"{c} {series([t['particles'].get(c, {}).get('f1') for t in tests])}"
                  for c in PARTICLE_CLASSES)
    names = "/".join(t["tomogram"] for t in tests)
    return f"validation ({names}): tolerant Dice {dice} | F1 {f1}"


def model_record(bundle: ModelBundle) -> dict:
    return {"path": str(bundle.path), "name": bundle.meta.name, "version": bundle.meta.version,
            "sha256": bundle.sha256, "voxel_size_a": bundle.meta.voxel_size_a,
            "classes": [c.name for c in bundle.classes]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None,
                   help="model bundle (default: the shipped default model)")
    p.add_argument("--validation-dir", type=Path, default=DEFAULT_VALIDATION_DIR,
                   help=f"folder of val_N.mrc, truth and score.py (default "
                        f"{DEFAULT_VALIDATION_DIR})")
    p.add_argument("--names", nargs="+", default=list(DEFAULT_NAMES), metavar="NAME")
    p.add_argument("--out", type=Path, default=None, help="keep the outputs in this folder")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation (--tta)")
    p.add_argument("--specimen-mask", action="store_true",
                   help="drop what the network finds outside the specimen slab")
    p.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="as tomolive segment --precision")
    args = p.parse_args(argv)
    args.validation_dir = args.validation_dir.expanduser().resolve()
    missing = [n for n in args.names if not (args.validation_dir / f"{n}.mrc").exists()]
    if not (args.validation_dir / "score.py").exists() or missing:
        p.error(f"{args.validation_dir}: no score.py or no {' '.join(missing)}.mrc")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bundle = load_bundle(args.model or default_bundle_path())
    t0 = time.perf_counter()
    network = prepare_network(bundle, args.device)  # once, as `tomolive segment` does
    prepare_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="tomolive-val-") as tmp:
        out_parent = args.out or Path(tmp) / "out"
        tests = []
        for name in args.names:
            tests.append(segment_and_score(name, args, bundle, network, out_parent,
                                           Path(tmp) / "scoring"))
            print(f"{name}: segmented in {tests[-1]['segment_s']}s", file=sys.stderr, flush=True)
    report = {"benchmark": "validation_quality", "command": " ".join(sys.argv),
              "model": model_record(bundle), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "device": args.device, "tta": args.tta,
              "validation_dir": str(args.validation_dir), "classes": list(TRUTH_CLASSES),
              "prepare_network_s": round(prepare_s, 2), "tests": tests,
              "mean": class_means(tests), "wall_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(report, indent=2))
    print(summary_line(tests), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
