"""The session page and the dataset index at scale (issue 16): N finished tomograms.

Creates N finished-tomogram folders (a summary JSON as the daemon writes it, from one real
result, and a tiny preview PNG) in a temporary output folder, then measures, over real HTTP
against a `HttpServer` with the session pages:

- the first request, which finds no row cache and rebuilds it from the N summaries (once per
  output folder, when results predate the cache),
- the session page `/` (page 1 and the last page), `/api/session.json` and a `/t/REL` page:
  the median of --requests GETs each,
- the update after one more tomogram (`Gallery.add`: row appended, index.csv / index.star,
  the static index and archive page and the tomogram's own page rewritten), in a daemon that
  has not read the row cache yet (its first update after a start) and in one that has,
- that the page then shows the new tomogram.

Targets: page < 0.5 s, index update < 1 s. Prints JSON.

    .venv/bin/python bench/session_page.py --tomograms 5000
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image
from tomolive.core.classes import default_class
from tomolive.core.export import write_outputs
from tomolive.core.filaments import Filament
from tomolive.core.particles import ParticleTable
from tomolive.core.result_folder import read_summary, summary_name, summary_path
from tomolive.core.segmentation import Segmentation
from tomolive.daemon import gallery
from tomolive.daemon.http_server import HttpServer
from tomolive.daemon.metrics import Metrics

SHAPE_ZYX = (8, 32, 32)


def _template(scratch: Path) -> dict:
    """The summary of one real (tiny) result, to copy N times."""
    labels = np.zeros(SHAPE_ZYX, dtype=np.int8)
    labels[2:4, 4:10, 4:12] = 1
    seg = Segmentation(
        stem="template", labels=labels, voxel_size_a=10.0, origin_xyz_a=(0.0, 0.0, 0.0),
        classes=[default_class(n) for n in ("membrane", "microtubule", "ribosome", "gold")],
        particles={"ribosome": ParticleTable("ribosome", [[3, 5, 6]], [0.9], [20])},
        filaments={"microtubule": [Filament([[5, 12, 2], [5, 12, 29]], [[0, 0, 1]] * 2)]},
        class_fractions={"membrane": 0.05}, confidence=0.9, timings_s={"total": 30.0},
        model={"name": "bench", "version": "1", "sha256": "ef" * 32},
        input={"path": "/data/template.mrc", "fingerprint": "x"}, settings={})
    folder = write_outputs(scratch, seg)
    return read_summary(folder)


def _tiny_png() -> bytes:
    path = Path(tempfile.mkstemp(suffix=".png")[1])
    Image.new("RGB", (48, 32), (90, 90, 90)).save(path)
    data = path.read_bytes()
    path.unlink()
    return data


def make_folders(out: Path, n: int, start: int, template: dict, png: bytes) -> list[Path]:
    """Folders `session_K/TS_NNNNN/` (100 per session) with a summary and a tiny preview."""
    folders = []
    t0 = time.time() - 86400
    for i in range(start, start + n):
        stem = f"TS_{i:05d}"
        folder = out / f"session_{i // 100:03d}" / stem
        folder.mkdir(parents=True)
        summary = dict(template, stem=stem,
                       written_utc=time.strftime("%Y-%m-%dT%H:%M:%S+00:00",
                                                 time.gmtime(t0 + i)),
                       input={"path": f"/data/{stem}.mrc", "fingerprint": str(i)},
                       counts={"particles": {"ribosome": i % 17, "gold": i % 5},
                               "filaments": {"microtubule": i % 3}},
                       files=[f"{stem}_preview.png", summary_name(stem)])
        (folder / f"{stem}_preview.png").write_bytes(png)
        summary_path(folder).write_text(json.dumps(summary))
        folders.append(folder)
    return folders


def timed_get(url: str) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        body = response.read()
        assert response.status == 200, url
    return time.perf_counter() - t0, body


def median_get(url: str, repeats: int) -> dict:
    times = [timed_get(url)[0] for _ in range(repeats)]
    return {"median_s": round(statistics.median(times), 4), "max_s": round(max(times), 4),
            "requests": repeats}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tomograms", type=int, default=5000)
    parser.add_argument("--requests", type=int, default=9)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tomolive-session-bench-"))
    try:
        out = root / "outputs"
        out.mkdir()
        template = _template(root / "scratch")
        png = _tiny_png()
        t0 = time.perf_counter()
        make_folders(out, args.tomograms, 0, template, png)
        print(f"{args.tomograms} folders in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

        pages = gallery.SessionPages(out, local_state=lambda: {"host": "bench", "waiting": 0})
        server = HttpServer(Metrics(process_metrics=False), port=0, pages=pages)
        try:
            rebuild_s, _ = timed_get(server.url + "/")
            last_page = -(-args.tomograms // gallery.PAGE_SIZE)
            rel = "session_000/TS_00000"
            results = {
                "page_1": median_get(server.url + "/", args.requests),
                "page_last": median_get(server.url + f"/?page={last_page}", args.requests),
                "session_json": median_get(server.url + "/api/session.json", args.requests),
                "tomogram_page": median_get(server.url + f"/t/{rel}", args.requests),
            }
            # One more tomogram, in a daemon whose Gallery has not read the cache yet...
            cold = gallery.Gallery(out)
            (new,) = make_folders(out, 1, args.tomograms, template, png)
            cold_s = cold.add(new)
            # ... and the next one in the same (warm) daemon.
            (newer,) = make_folders(out, 1, args.tomograms + 1, template, png)
            warm_s = cold.add(newer)
            _, body = timed_get(server.url + "/")
            shown = newer.name.encode() in body
            after = median_get(server.url + "/", args.requests)
        finally:
            server.stop()
        csv_rows = (out / "index.csv").read_text().count("\n") - 1
        report = {
            "tomograms": args.tomograms,
            "first_request_rebuilding_row_cache_s": round(rebuild_s, 3),
            **results,
            "page_1_after_update": after,
            "index_update_first_after_start_s": round(cold_s, 4),
            "index_update_s": round(warm_s, 4),
            "new_tomogram_on_page": shown,
            "index_csv_rows": csv_rows,
            "index_csv_bytes": (out / "index.csv").stat().st_size,
            "index_html_bytes": (out / "index.html").stat().st_size,
            "page_1_bytes": len(body),
            "targets": {"page_s": 0.5, "index_update_s": 1.0},
            "pass": (results["page_1"]["median_s"] < 0.5 and after["median_s"] < 0.5
                     and warm_s < 1.0 and cold_s < 1.0 and shown
                     and csv_rows == args.tomograms + 2),
        }
        print(json.dumps(report, indent=2))
        return 0 if report["pass"] else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
