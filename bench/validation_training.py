"""Few-slice training on realistic data (issue 20): train on the annotated slices z 48:64 of
val_1 as a user would (`tomolive train` in a subprocess, a CPU-minute budget), segment val_2 and
val_3 with the result and score them with the validation set's own score.py.

Routes, each at the same budget of `--minutes` per run:
  scratch   `tomolive train` from random weights (the joint five-class model)
  init      `tomolive train --init default` (or `--init-model FILE`): fine-tune a shipped model
  distill   Pom's route: one single-feature model each for membrane, microtubule and ribosome
            (a fifth of the budget each), then `tomolive distill` into one joint model on val_1
            (the remaining two fifths)

    python bench/validation_training.py --routes scratch init --seeds 0 1 2 --minutes 10
    python bench/validation_training.py --routes init --option class_weight_power=0.5

Prints JSON: per route and seed the training's own validation Dice and the scores on each test
tomogram; per route the mean and spread (sample standard deviation) over seeds. The rule of the
validation set holds: nothing here trains on val_2 or val_3, or on val_1 outside z 48:64.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tomolive.core.infer import prepare_network
from tomolive.core.model import load_bundle
from tomolive.core.volume import read_mrc, write_mrc
from validation_quality import DEFAULT_VALIDATION_DIR, TRUTH_CLASSES, segment_and_score

TRAIN_TOMOGRAM = "val_1"
REGION = "48:64,0:256,0:256"  # the only slices of the validation set training may use
TEST_TOMOGRAMS = ("val_2", "val_3")
DISTILL_SINGLES = ("membrane", "microtubule", "ribosome")  # as in the Pom comparison


def tomolive(args: list[str], threads: int) -> None:
    """One `tomolive` command as a user runs it; its threads are pinned through OMP."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    run = subprocess.run([sys.executable, "-m", "tomolive", *map(str, args)], env=env,
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"tomolive {args[0]} failed: {run.stderr.strip()[-2000:]}")


def train(labels: Path, classes: list[str], minutes: float, seed: int, out: Path,
          args: argparse.Namespace, init: str | None = None) -> Path:
    command = ["train", "--tomogram", args.validation_dir / f"{TRAIN_TOMOGRAM}.mrc",
               "--labels", labels, "--classes", ",".join(classes), "--region", REGION,
               "--max-minutes", minutes, "--device", "cpu", "--seed", seed, "--out", out]
    if init:
        command += ["--init", init]
    for option in args.option:
        command += ["--option", option]
    tomolive(command, args.threads)
    return out


def single_class_labels(truth: np.ndarray, name: str, folder: Path, voxel_a: float) -> Path:
    """val_1's labels reduced to one class (1) against everything else (0)."""
    path = folder / f"{TRAIN_TOMOGRAM}_{name}_labels.mrc"
    if not path.exists():
        mask = (truth == TRUTH_CLASSES.index(name) + 1).astype(np.int8)
        write_mrc(path, mask, voxel_a)
    return path


def trained_model(route: str, seed: int, folder: Path, args: argparse.Namespace) -> Path:
    labels = args.validation_dir / f"{TRAIN_TOMOGRAM}_labels.mrc"
    out = folder / f"{route}_{seed}.safetensors"
    if route == "scratch":
        return train(labels, list(TRUTH_CLASSES), args.minutes, seed, out, args)
    if route == "init":
        return train(labels, list(TRUTH_CLASSES), args.minutes, seed, out, args,
                     init=str(args.init_model) if args.init_model else "default")
    truth = read_mrc(labels)
    singles = [train(single_class_labels(np.asarray(truth.data), name, folder,
                                         truth.voxel_size_a),
                     [name], args.minutes / 5, seed, folder / f"single_{name}_{seed}.st", args)
               for name in DISTILL_SINGLES]
    tomolive(["distill", "--models", *singles, "--tomograms",
              args.validation_dir / f"{TRAIN_TOMOGRAM}.mrc", "--max-minutes",
              args.minutes * 2 / 5, "--device", "cpu", "--seed", seed, "--out", out],
             args.threads)
    return out


def score(model: Path, folder: Path, args: argparse.Namespace) -> dict:
    bundle = load_bundle(model)
    network = prepare_network(bundle, "cpu")
    # Scored as `tomolive segment` runs by default (no specimen mask, automatic precision).
    scoring_args = argparse.Namespace(validation_dir=args.validation_dir, device="cpu",
                                      tta=False, batch_size=None, specimen_mask=False)
    tests = [segment_and_score(name, scoring_args, bundle, network, folder / "out",
                               folder / "scoring") for name in TEST_TOMOGRAMS]
    return {"model": bundle.meta.name, "training_validation_dice":
            bundle.meta.training.get("validation_dice"),
            "training_steps": bundle.meta.training.get("steps"), "tests": tests}


def spread(runs: list[dict]) -> dict:
    """Per test tomogram and class: mean and sample std over seeds of tolerant Dice, and of
    particle F1 for ribosome and gold."""
    out: dict = {}
    for index, name in enumerate(TEST_TOMOGRAMS):
        per_class = {}
        for cls in TRUTH_CLASSES:
            values = [r["tests"][index]["dice_tol1"][cls] for r in runs]
            per_class[cls] = _mean_sd([v for v in values if v is not None])
        for cls in ("ribosome", "gold"):
            values = [r["tests"][index]["particles"].get(cls, {}).get("f1") for r in runs]
            per_class[f"f1_{cls}"] = _mean_sd([v for v in values if v is not None])
        out[name] = per_class
    return out


def _mean_sd(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": round(float(np.mean(values)), 4),
            "sd": None if sd is None else round(sd, 4), "n": len(values)}


def summary_line(route: str, stats: dict) -> str:
    parts = []
    for cls in (*TRUTH_CLASSES, "f1_ribosome", "f1_gold"):
        means = [stats[name][cls]["mean"] for name in TEST_TOMOGRAMS]
        parts.append(f"{cls} " + "/".join("-" if m is None else f"{m:.2f}" for m in means))
    return f"{route}: " + " ".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--routes", nargs="+", default=["scratch", "init", "distill"],
                   choices=("scratch", "init", "distill"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--minutes", type=float, default=10.0, help="CPU budget of one run")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of every command (1 thread = the minutes are CPU-minutes)")
    p.add_argument("--init-model", type=Path, default=None,
                   help="route init fine-tunes this bundle (default: the shipped default model)")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="passed to every `tomolive train` (a TrainOptions tuning field)")
    p.add_argument("--validation-dir", type=Path, default=DEFAULT_VALIDATION_DIR)
    p.add_argument("--keep", type=Path, default=None, help="keep models and outputs here")
    args = p.parse_args(argv)
    args.validation_dir = args.validation_dir.expanduser().resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report: dict = {"benchmark": "validation_training", "command": " ".join(sys.argv),
                    "region": f"{TRAIN_TOMOGRAM} {REGION}", "minutes": args.minutes,
                    "threads": args.threads, "train_options": args.option,
                    "torch": torch.__version__, "routes": {}}
    with tempfile.TemporaryDirectory(prefix="tomolive-valtrain-") as tmp:
        root = args.keep or Path(tmp)
        for route in args.routes:
            runs = []
            for seed in args.seeds:
                folder = root / f"{route}_{seed}"
                folder.mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                model = trained_model(route, seed, folder, args)
                train_s = time.perf_counter() - t0
                runs.append({"seed": seed, "train_s": round(train_s, 1),
                             **score(model, folder, args)})
                print(f"{route} seed {seed}: trained in {train_s:.0f} s", file=sys.stderr,
                      flush=True)
            stats = spread(runs)
            report["routes"][route] = {"runs": runs, "spread": stats}
            print(summary_line(route, stats), file=sys.stderr, flush=True)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
