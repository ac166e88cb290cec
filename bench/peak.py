"""Attainable FLOP/s of a device: a large square matrix product in the precision inference uses
(float32 on CPU, bfloat16/float16 on CUDA, as core.infer's autocast). Prints JSON.

    python bench/peak.py                      # CPU, torch's default thread count
    python bench/peak.py --device cuda --n 8192
    python bench/peak.py --threads 2

The figure is the median over `repeats` timed products after one warm-up; FLOPs = 2 n^3.
It is the reference for the achieved inference FLOP/s reported by bench/segment_speed.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import tomolive  # noqa: F401  (sets OMP_WAIT_POLICY before torch is imported)

# isort: split
import torch


def inference_dtype(device: torch.device) -> torch.dtype:
    """The dtype the convolutions run in during inference on `device`."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return "CPU"


def measure_peak(device: str = "cpu", n: int | None = None, repeats: int = 7,
                 threads: int | None = None) -> dict[str, Any]:
    """Median FLOP/s of an n x n @ n x n product on `device` (JSON-ready dict)."""
    dev = torch.device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    n = n or (8192 if dev.type == "cuda" else 2048)
    dtype = inference_dtype(dev)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    seconds = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            a @ b
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i > 0:  # the first product is a warm-up (allocation, kernel selection)
                seconds.append(time.perf_counter() - start)
    flops = 2.0 * n**3
    median_s = statistics.median(seconds)
    return {
        "device": str(dev),
        "device_name": device_name(dev),
        "dtype": str(dtype).replace("torch.", ""),
        "n": n,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "seconds_all": [round(s, 5) for s in seconds],
        "seconds_median": round(median_s, 5),
        "flops_per_s_median": flops / median_s,
        "flops_per_s_best": flops / min(seconds),
        "gflops_per_s_median": round(flops / median_s / 1e9, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=None, help="matrix size (2048 CPU, 8192 CUDA)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    print(json.dumps(measure_peak(args.device, args.n, args.repeats, args.threads), indent=2))


if __name__ == "__main__":
    main()
