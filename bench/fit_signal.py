"""Model-fit signal benchmark (issue 21 item 2): does `uncertain_fraction` (and, for comparison,
the older `confidence`) separate tomograms a model fits from tomograms it does not?

Segments, exactly as `tomolive segment` does, and reads each summary:
- the model's own kind of data: tomograms of the simulator it was trained on (`--own`);
- tomograms it did not see the like of: `shared/validation` (measured only, never trained on);
- the same tomograms with the header's voxel size off by 2x (`--voxel-size` overridden).
Prints JSON (one record per case, then the ranges per group) and one summary line.

    python bench/fit_signal.py                                   # the shipped default model
    python bench/fit_signal.py --model M.safetensors --own microscope
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from tomolive.core.infer import InferenceOptions, prepare_network
from tomolive.core.model import default_bundle_path, load_bundle
from tomolive.core.pipeline import SegmentOptions, segment_file
from tomolive.core.result_folder import read_summary
from tomolive.core.synth import synthesize, write_synth
from tomolive.core.volume import read_header

OWN_SHAPE_ZYX = (64, 256, 256)
OWN_SEEDS = (11, 12, 13)  # not the seeds any shipped model was trained on


def cases(args: argparse.Namespace, scratch: Path) -> list[tuple[str, str, Path, float | None]]:
    """(group, label, file, voxel size override) for every case."""
    found = []
    for seed in OWN_SEEDS:
        path = scratch / f"own_{seed}.mrc"
        write_synth(synthesize(OWN_SHAPE_ZYX, 10.0, seed=seed, simulator=args.own), path)
        found.append(("fits", f"{args.own} seed {seed}", path, None))
    for name in args.names:
        found.append(("does not fit", name, args.validation_dir / f"{name}.mrc", None))
    for _, label, path, _ in list(found):
        voxel_a = read_header(path).voxel_size_a
        found.append(("header voxel size 2x", f"{label}, header x2", path, 2.0 * voxel_a))
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--own", choices=("cartoon", "microscope"), default="cartoon",
                   help="the simulator the model was trained on (the shipped default: cartoon)")
    p.add_argument("--validation-dir", type=Path,
                   default=Path(__file__).resolve().parents[2] / "shared" / "validation")
    p.add_argument("--names", nargs="+", default=["val_1", "val_2", "val_3"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.model or default_bundle_path())
    options = SegmentOptions(inference=InferenceOptions(device="cpu"))
    network = prepare_network(bundle, "cpu")
    records = []
    with tempfile.TemporaryDirectory(prefix="tomolive-fit-") as tmp:
        scratch = Path(tmp)
        for i, (group, label, path, voxel_a) in enumerate(cases(args, scratch)):
            start = time.perf_counter()
            run_options = SegmentOptions(inference=options.inference, voxel_size_a=voxel_a)
            _, out_dir = segment_file(path, scratch / f"out{i}", bundle, run_options,
                                      network=network)
            summary = read_summary(out_dir)
            records.append({"group": group, "case": label, "voxel_size_a": voxel_a,
                            "uncertain_fraction": summary["uncertain_fraction"],
                            "confidence": summary["confidence"],
                            "seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(records[-1]), file=sys.stderr, flush=True)
    groups = {}
    for key in ("uncertain_fraction", "confidence"):
        for group in dict.fromkeys(r["group"] for r in records):
            values = [r[key] for r in records if r["group"] == group and r[key] is not None]
            groups.setdefault(group, {})[key] = [round(min(values), 4), round(max(values), 4)]
    print(json.dumps({"benchmark": "fit_signal", "model": bundle.meta.name,
                      "model_sha256": bundle.sha256, "own": args.own, "cases": records,
                      "ranges": groups}, indent=1))
    print("uncertain_fraction " + " | ".join(
        f"{g}: {v['uncertain_fraction'][0]:.3f}-{v['uncertain_fraction'][1]:.3f}"
        for g, v in groups.items()) + "   (confidence " + " | ".join(
        f"{g}: {v['confidence'][0]:.3f}-{v['confidence'][1]:.3f}" for g, v in groups.items())
        + ")", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
