"""Speed of the microscope simulator (issue 14): one tomogram of a given shape, per stage.
Prints JSON.

    python bench/synth_speed.py                       # 128 x 512 x 512 at 10 Å, 2 threads
    python bench/synth_speed.py --shape 64 256 256 --seed 3 --threads 2

Stages: specimen (placing and rendering the sample), projection (the tilt series' line
integrals), ctf+noise (exit wave, lens, attenuation, shot noise per tilt), reconstruction
(weighted back-projection and normalisation). Peak memory is the process's ru_maxrss. The
target is at most 120 s for 128 x 512 x 512 on two cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import tomolive  # noqa: F401  (sets OMP_WAIT_POLICY before torch is imported)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 512, 512),
                        metavar=("Z", "Y", "X"))
    parser.add_argument("--voxel-size", type=float, default=10.0, dest="voxel_size_a")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from tomolive.core.synth import synthesize

    start = time.perf_counter()
    result = synthesize(tuple(args.shape), args.voxel_size_a, args.seed)
    total = time.perf_counter() - start
    t = result.info["timings"]
    shape = tuple(args.shape)
    voxels = shape[0] * shape[1] * shape[2]
    out = {
        "shape_zyx": list(shape), "voxel_size_a": args.voxel_size_a, "seed": args.seed,
        "threads": args.threads,
        "seconds": {"specimen": round(t["specimen_s"], 2),
                    "projection": round(t["projection_s"], 2),
                    "ctf+noise": round(t["ctf_noise_s"], 2),
                    "reconstruction": round(t["reconstruction_s"], 2),
                    "total": round(total, 2)},
        "n_tilts": len(result.info["acquisition"]["angles_deg"]),
        "objects": sum(v for k, v in result.info["counts"].items() if k != "ribosome_missing"),
        "crowding": result.info["specimen"]["crowding_achieved"],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "volume_float32_mib": round(voxels * 4 / 2**20, 1),
        "target_total_s": 120.0 if shape == (128, 512, 512) else None,
    }
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
