"""Labels back to the input grid: nearest neighbour against the refined mapping the pipeline
uses (core.resample.labels_to_input_refined), on synthetic tomograms at other voxel sizes than
the model's. One prediction per tomogram, both mappings applied to it; Dice per class against
the synthetic truth (core.evaluate) and the seconds each mapping took. Prints JSON.

    python bench/label_mapping.py --model M.safetensors                       # seeds 13 21 22 23
    python bench/label_mapping.py --model M.safetensors --cases 13:13.2:int16 30:7.5:float32

A case is SEED:VOXEL_A:DTYPE; the box is the same physical one as train_quality's tests
(64 x 256 x 256 voxels at 10 Å). The prediction runs exactly as in core.pipeline.segment
(rescale, recipe, predict, clean_labels on the model grid).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from tomolive.core.cleanup import clean_labels
from tomolive.core.evaluate import dice_per_class
from tomolive.core.infer import InferenceOptions, predict, prepare_network
from tomolive.core.model import load_bundle
from tomolive.core.preprocess import apply_recipe
from tomolive.core.resample import (
    fourier_rescale,
    grid_for,
    labels_to_input,
    labels_to_input_refined,
)
from tomolive.core.synth import synthesize, write_synth
from tomolive.core.volume import read_mrc
from train_quality import physical_shape  # this folder: the same test boxes as train_quality

DEFAULT_CASES = ["13:13.2:int16", "21:13.2:int16", "22:13.2:int16", "23:13.2:int16"]


def score_case(bundle, network, case: str, folder: Path) -> dict:
    seed_text, voxel_text, dtype = case.split(":")
    seed, voxel_a = int(seed_text), float(voxel_text)
    result = synthesize(physical_shape((64, 256, 256), voxel_a, 10.0), voxel_a, seed=seed,
                        simulator="cartoon")  # the scenes its earlier figures were measured on
    path = folder / f"s{seed}.mrc"
    write_synth(result, path, dtype=dtype)  # through a file, as the pipeline reads it
    volume = read_mrc(path)
    model_a = float(bundle.meta.voxel_size_a)
    grid = grid_for(volume.data.shape, volume.voxel_size_a, model_a)
    data = apply_recipe(fourier_rescale(volume.data, grid), model_a, bundle.meta.preprocess)
    prediction = predict(network, data, bundle.meta.in_slices, InferenceOptions(device="cpu"),
                         z_edge=bundle.meta.z_edge)
    labels = clean_labels(prediction.labels, bundle.classes, model_a)
    names = [c.name for c in bundle.classes]
    out = {"case": case, "input_shape_zyx": list(grid.input_shape),
           "model_shape_zyx": list(grid.model_shape)}
    for name, mapping in (("nearest", lambda: labels_to_input(labels, grid)),
                          ("refined", lambda: labels_to_input_refined(
                              labels, prediction.confidence, grid))):
        start = time.perf_counter()
        mapped = mapping()
        seconds = time.perf_counter() - start
        dice = dice_per_class(mapped, result.labels, names)
        out[name] = {"seconds": round(seconds, 3),
                     "dice": {k: round(float(v), 4) for k, v in dice.items()}}
    out["refined_minus_nearest"] = {k: round(out["refined"]["dice"][k] - v, 4)
                                    for k, v in out["nearest"]["dice"].items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, metavar="SEED:VOXEL_A:DTYPE")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.model)
    network = prepare_network(bundle, "cpu")
    with tempfile.TemporaryDirectory(prefix="tomolive-bench-") as tmp:
        cases = [score_case(bundle, network, case, Path(tmp)) for case in args.cases]
    print(json.dumps({"benchmark": "label_mapping", "model": str(args.model),
                      "model_voxel_size_a": bundle.meta.voxel_size_a,
                      "threads": torch.get_num_threads(), "cases": cases}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
