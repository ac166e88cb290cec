"""Reproduce the shipped default model, core/assets/default.safetensors.

It is trained ONLY on synthetic tomograms from `tomolive.core.synth` (fixed seeds, fully
annotated), for the five synthetic classes at 10 Å, with base width 16 (a few MB). It is a
demo and test model: it has never seen a real tomogram, and its metadata says so.

    python scripts/train_default_model.py          # writes core/assets/default.safetensors
    python scripts/train_default_model.py --out /tmp/d.safetensors --steps 50   # a quick look

A fixed step count (not a time budget) makes the run reproducible: same seeds, same steps,
same torch version and thread count on CPU give the same weights.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from tomolive.core.classes import SYNTH_CLASS_NAMES
from tomolive.core.model import default_bundle_path, save_bundle
from tomolive.core.synth import synthesize, write_synth
from tomolive.core.train import TrainingSource, TrainOptions, class_specs_for, train

# (seed, voxel size Å, stored dtype): two tomograms at the model's 10 Å and one at 13.2 Å
# stored as int16, so the model also learns from data that went through the Fourier rescale.
TOMOGRAMS = ((1001, 10.0, "float32"), (1002, 10.0, "float32"), (1003, 13.2, "int16"))
SHAPE_AT_10A = (64, 256, 256)
DEFAULT_STEPS = 1200


def _shape(voxel_a: float) -> tuple[int, ...]:
    # The same physical box at every voxel size.
    return tuple(int(round((n - 1) * 10.0 / voxel_a)) + 1 for n in SHAPE_AT_10A)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="train the shipped default model on synthetic data")
    p.add_argument("--out", type=Path, default=default_bundle_path())
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--max-minutes", type=float, default=None, help="optional time cap")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest on a busy machine; part of what "
                        "makes the weights reproducible)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tomolive-default-") as tmp:
        sources = []
        for seed, voxel_a, dtype in TOMOGRAMS:
            result = synthesize(_shape(voxel_a), voxel_a, seed=seed)
            tomo, labels = Path(tmp) / f"synth_{seed}.mrc", Path(tmp) / f"synth_{seed}_labels.mrc"
            write_synth(result, tomo, labels, dtype=dtype)
            sources.append(TrainingSource(tomo, labels))
        described = ", ".join(f"seed {s} at {v:g} Å ({d})" for s, v, d in TOMOGRAMS)
        options = TrainOptions(
            steps=args.steps, max_minutes=args.max_minutes, device=args.device, seed=0,
            base_width=16, model_voxel_size_a=10.0, validation_fraction=0.15, synthetic=True,
            # Pinned (they are also today's defaults), so that a later change of the training
            # defaults cannot change what this script reproduces.
            in_slices=31, rotate_any_angle=True,
            name="tomolive-default",
            description=(
                "Default demo model. Trained ONLY on synthetic data: tomolive.core.synth "
                f"tomograms ({described}; {SHAPE_AT_10A[0]}x{SHAPE_AT_10A[1]}x"
                f"{SHAPE_AT_10A[2]} at 10 Å), never on real tomograms. Reproduce with "
                "scripts/train_default_model.py."
            ),
        )

        def progress(report) -> None:
            if report.step % 50 == 0:
                dice = " ".join(f"{k}={v:.2f}" for k, v in (report.validation_dice or {}).items())
                print(f"step {report.step}/{report.total_steps} {report.elapsed_s:.0f}s "
                      f"loss {report.loss:.3f} val {dice}", file=sys.stderr, flush=True)

        trained = train(sources, class_specs_for(SYNTH_CLASS_NAMES), options, progress=progress)
    # Temporary paths mean nothing to a reader: record what made the data instead.
    for record, (seed, voxel_a, dtype) in zip(trained.meta.training["sources"], TOMOGRAMS,
                                              strict=True):
        record["tomogram"] = f"tomolive.core.synth seed={seed} voxel_size_a={voxel_a} {dtype}"
        record["labels"] = "synthetic ground truth (complete)"
    trained.meta.training["script"] = "scripts/train_default_model.py"
    trained.meta.training["threads"] = args.threads
    out = save_bundle(args.out, trained.network, trained.meta)
    t = trained.meta.training
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB, {t['steps']} steps in "
          f"{time.perf_counter() - start:.0f} s, validation Dice {t['validation_dice']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
