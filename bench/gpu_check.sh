#!/usr/bin/env bash
# The GPU check (issue 18 item 5): everything the GPU path must show, in one run of under about
# 8 minutes on one GPU, written as one JSON (bench/results/gpu_check.json, or $OUT/gpu_check.json).
#
#   bash bench/gpu_check.sh                 # on a machine with a GPU, after .ci/run's install
#   DEVICE=cpu SHAPE="48 256 256" TOMOGRAMS=2 THROUGHPUT_SHAPE="32 128 128" bash bench/gpu_check.sh
#                                           # the same plumbing on a CPU (a dry run)
#
# Steps, each writing its own JSON into the work folder, merged at the end:
#   env          what the machine is (nvidia-smi, torch's CUDA build and devices)
#   agreement    one synthetic tomogram segmented on the device in float32 and in the fast
#                precision, and on the CPU in float32: the share of label voxels that agree
#   tests        the suite's device-sensitive tests (inference, model, pipeline mapping)
#   peak         bench/peak.py: the device's attainable FLOP/s
#   speed        bench/segment_speed.py --compare-precision on SHAPE: float32 and bfloat16
#   daemon_*     bench/daemon_throughput.py with one and two workers per GPU
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
device=${DEVICE:-cuda:0}
shape=${SHAPE:-"300 1024 1024"}
tomograms=${TOMOGRAMS:-6}
throughput_shape=${THROUGHPUT_SHAPE:-"200 1024 1024"}
out=${OUT:-bench/results}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
started=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - started )) s)" >&2; }

step env
{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; } > "$work/nvidia-smi.txt"
"$py" - "$work/nvidia-smi.txt" > "$work/env.json" <<'PY'
import json, sys, torch
print(json.dumps({"torch": torch.__version__, "cuda_build": torch.version.cuda,
                  "cuda_available": torch.cuda.is_available(),
                  "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                  "nvidia_smi": open(sys.argv[1]).read().strip()}))
PY

step agreement
"$py" -m tomolive synth "$work/agree.mrc" --shape 64 256 256 --pixel-size 10 --seed 3 > /dev/null
for run in "$device float32" "$device bfloat16" "cpu float32"; do
    set -- $run
    "$py" -m tomolive segment "$work/agree.mrc" --out "$work/agree-$1-$2" --device "$1" \
        --precision "$2" > /dev/null
done
"$py" - "$work" "$device" > "$work/agreement.json" <<'PY'
import json, sys
from pathlib import Path
import mrcfile, numpy as np
work, device = Path(sys.argv[1]), sys.argv[2]
def labels(run):
    with mrcfile.open(work / f"agree-{run}" / "agree" / "agree_labels.mrc") as mrc:
        return np.asarray(mrc.data)
reference = labels("cpu-float32")
print(json.dumps({f"{device} {p} vs cpu float32": float((labels(f"{device}-{p}") == reference).mean())
                  for p in ("float32", "bfloat16")}))
PY

step tests
set +e
"$py" -m pytest -q -p no:cacheprovider tests/test_infer.py tests/test_model.py \
    tests/test_pipeline_mapping.py > "$work/tests.txt" 2>&1
tests_rc=$?
set -e
"$py" - "$work/tests.txt" "$tests_rc" > "$work/tests.json" <<'PY'
import json, sys
print(json.dumps({"returncode": int(sys.argv[2]), "tail": open(sys.argv[1]).read()[-1500:]}))
PY

step peak
"$py" bench/peak.py --device "$device" > "$work/peak.json"

step "segment_speed, float32 against bfloat16"
"$py" bench/segment_speed.py --shape $shape --device "$device" --compare-precision \
    --repeats 1 --peak-json "$work/peak.json" --scratch "$work" > "$work/speed.json"

if [ "$device" = cpu ]; then devices=cpu; else devices=${device#cuda:}; fi
for workers in 1 2; do
    step "daemon, $workers worker(s) per GPU"
    "$py" bench/daemon_throughput.py --devices "$devices" --workers-per-gpu "$workers" \
        --tomograms "$tomograms" --shape $throughput_shape > "$work/daemon_${workers}.json"
done

step merge
"$py" - "$work" "$out/gpu_check.json" "$started" <<'PY'
import json, sys, time
from pathlib import Path
work, target, started = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
merged = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}
merged["total_s"] = round(time.time() - started, 1)
target.write_text(json.dumps(merged, indent=2))
print(f"wrote {target} ({merged['total_s']} s)")
PY
