"""daemon.gallery: rows from summaries, the row cache, the dataset index, the static gallery, and
the session page's routes over real HTTP (what may and may not be served)."""

from __future__ import annotations

import csv
import json
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import starfile
from PIL import Image
from tomolive.core.classes import default_class
from tomolive.core.export import write_outputs
from tomolive.core.filaments import Filament
from tomolive.core.particles import ParticleTable
from tomolive.core.segmentation import Segmentation
from tomolive.core.specimen_mask import SpecimenSlab, Surface
from tomolive.daemon import gallery, gallery_rows
from tomolive.daemon.failure_records import FailureRecords
from tomolive.daemon.http_server import HttpServer
from tomolive.daemon.leases import LeaseManager
from tomolive.daemon.metrics import Metrics

SHAPE = (8, 24, 32)


def publish(out_parent: Path, stem: str, n_ribosomes: int = 2,
            uncertain_fraction: float = float("nan"), snr_estimate: float = float("nan"),
            specimen: SpecimenSlab | None = None) -> Path:
    """A real result folder (core.export), tiny."""
    labels = np.zeros(SHAPE, dtype=np.int8)
    labels[2:4, 4:10, 4:12] = 1
    labels[5, 12, 2:30] = 2
    zyx = [[3.0 + i % 4, 5.0 + i, 6.0 + i] for i in range(n_ribosomes)]
    ribo = ParticleTable("ribosome", zyx, [0.9] * n_ribosomes, [20] * n_ribosomes)
    seg = Segmentation(
        stem=stem, labels=labels, voxel_size_a=10.0, origin_xyz_a=(0.0, 0.0, 0.0),
        classes=[default_class(n) for n in ("membrane", "microtubule", "ribosome")],
        particles={"ribosome": ribo},
        filaments={"microtubule": [Filament([[5, 12, 2], [5, 12, 29]], [[0, 0, 1]] * 2)]},
        class_fractions={"membrane": 0.05, "microtubule": 0.01, "ribosome": 0.0},
        confidence=0.87, uncertain_fraction=uncertain_fraction, snr_estimate=snr_estimate,
        specimen=specimen,
        timings_s={"inference": 1.0, "total": 2.5},
        model={"name": "tiny", "version": "3", "sha256": "cd" * 32},
        input={"path": f"/data/{stem}.mrc", "fingerprint": "x"}, settings={})
    tomogram = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    return write_outputs(out_parent, seg, tomogram)


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "outputs"
    folder.mkdir()
    return folder


def test_row_has_what_the_page_and_index_show(out):
    folder = publish(out / "session1", "TS_01", n_ribosomes=3)
    row = gallery_rows.row_for_folder(out, folder)
    assert row["rel"] == "session1/TS_01" and row["stem"] == "TS_01"
    assert row["particles"] == {"ribosome": 3}
    assert row["filaments"] == {"microtubule": 1}
    assert row["filament_length_nm"]["microtubule"] == pytest.approx(27.0)
    assert row["confidence"] == pytest.approx(0.87)
    assert row["seconds"] is not None and row["model"] == "tiny"
    assert row["preview"] == "TS_01_preview.png" and row["sweep"] == "TS_01_sweep.webp"


def test_index_files_and_static_gallery_after_each_publish(out):
    g = gallery.Gallery(out, page_size=2)
    for i in range(3):
        g.add(publish(out, f"TS_{i:02d}", n_ribosomes=i + 1))
    with open(out / "index.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert [r["stem"] for r in records] == ["TS_00", "TS_01", "TS_02"]
    assert [r["particles_ribosome"] for r in records] == ["1", "2", "3"]
    assert records[0]["model"] == "tiny" and float(records[0]["voxel_size_a"]) == 10.0
    assert float(records[0]["confidence"]) == pytest.approx(0.87)
    star = starfile.read(out / "index.star")
    assert list(star["rlnTomoName"]) == ["TS_00", "TS_01", "TS_02"]
    assert list(star["tomoliveParticlesRibosome"]) == [1, 2, 3]
    assert list(star["tomoliveInputPath"])[0] == "/data/TS_00.mrc"
    index_html = (out / "index.html").read_text()
    # Newest first; thumbnails and per-tomogram pages by relative links (file:// works).
    assert index_html.index("TS_02") < index_html.index("TS_01")
    assert "TS_00" not in index_html  # the newest page_size only; older ones on archive pages
    thumb = gallery.thumbnail_path(out, "TS_02")
    assert f'src="{gallery.STATIC_DIR}/thumbs/{thumb.name}"' in index_html
    with Image.open(thumb) as image:  # small, whatever the preview's size
        assert image.format == "WEBP" and max(image.size) <= gallery.THUMB_MAX_PX
    pages = sorted(p.name for p in (out / gallery.STATIC_DIR).iterdir())
    assert "page-0001.html" in pages and "page-0002.html" in pages
    assert "TS_00" in (out / gallery.STATIC_DIR / "page-0001.html").read_text()
    tomo_pages = [p for p in pages if p.startswith("TS_01")]
    assert len(tomo_pages) == 1
    html = (out / gallery.STATIC_DIR / tomo_pages[0]).read_text()
    assert 'src="../TS_01/TS_01_sweep.webp"' in html
    assert not [p for p in out.rglob("*.tmp-*")]  # every rewrite was atomic


def test_row_cache_is_read_incrementally_and_the_last_line_wins(out):
    first = gallery.Gallery(out)
    first.add(publish(out, "TS_01"))
    reader = gallery_rows.RowIndex(out)
    assert reader.refresh() and [r["stem"] for r in reader.rows()] == ["TS_01"]
    assert not reader.refresh()  # nothing new: nothing read
    # Another daemon (its own Gallery) publishes; a resegmented tomogram keeps its place.
    second = gallery.Gallery(out)
    second.add(publish(out, "TS_02"))
    first.add(publish(out, "TS_01", n_ribosomes=5))
    assert reader.refresh()
    assert [r["stem"] for r in reader.rows()] == ["TS_01", "TS_02"]
    assert reader.get("TS_01")["particles"] == {"ribosome": 5}
    with open(reader.path, "ab") as handle:  # a line still being appended is not read yet
        handle.write(b'{"rel": "TS_03"')
    assert not reader.refresh()
    assert len(reader) == 2


def test_missing_row_cache_is_rebuilt_from_the_summaries(out):
    for stem in ("TS_01", "TS_02"):
        publish(out, stem)
    reader = gallery_rows.RowIndex(out)
    reader.refresh()
    assert sorted(r["stem"] for r in reader.rows()) == ["TS_01", "TS_02"]
    assert reader.path.is_file()


def test_throughput_today_counts_since_midnight():
    now = 1_700_000_000.0
    rows = [{"finished_s": now - 3600, "seconds": 10.0}, {"finished_s": now - 1800,
                                                         "seconds": 20.0},
            {"finished_s": now - 3 * 86400, "seconds": 99.0}]
    today = gallery.throughput_today(rows, now)
    import datetime as dt
    midnight = dt.datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0).timestamp()
    expected = sum(1 for r in rows if r["finished_s"] >= midnight)
    assert today["count"] == expected


# ---- over real HTTP ----------------------------------------------------------------------------

@pytest.fixture
def served(out):
    folder = publish(out / "session1", "TS_01")
    gallery.Gallery(out).add(folder)
    pages = gallery.SessionPages(out, local_state=lambda: {"host": "here", "waiting": 4})
    server = HttpServer(Metrics(process_metrics=False), port=0, pages=pages)
    yield server, out
    server.stop()


def get(url: str) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def test_session_page_routes(served):
    server, out = served
    status, body, headers = get(server.url + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    html = body.decode()
    assert "session1/TS_01" in html and 'src="/thumb/session1/TS_01"' in html
    assert "waiting in the queue of here" in html
    status, body, _ = get(server.url + "/api/session.json?page=1")
    data = json.loads(body)
    assert data["total"] == 1 and data["tomograms"][0]["particles"] == {"ribosome": 2}
    status, body, _ = get(server.url + "/t/session1/TS_01")
    assert status == 200 and b"TS_01_sweep.webp" in body and b'id="particles"' in body
    status, body, headers = get(server.url + "/files/session1/TS_01/TS_01_sweep.webp")
    assert status == 200 and headers["Content-Type"] == "image/webp"
    assert body == (out / "session1/TS_01/TS_01_sweep.webp").read_bytes()
    status, body, headers = get(server.url + "/thumb/session1/TS_01")
    assert status == 200 and headers["Content-Type"] == "image/webp"
    assert body == gallery.thumbnail_path(out, "session1/TS_01").read_bytes()
    gallery.thumbnail_path(out, "session1/TS_01").unlink()  # none (older results): the preview
    status, body, headers = get(server.url + "/thumb/session1/TS_01")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert get(server.url + "/metrics")[0] == 200 and get(server.url + "/healthz")[0] == 200
    assert get(server.url + "/t/session1/nothing")[0] == 404


def test_running_and_failures_are_read_from_the_shared_folder(served):
    server, out = served
    lease = LeaseManager(out, 30.0).try_claim("session1__TS_09-0", "session1/TS_09", "cuda:1")
    assert lease is not None
    FailureRecords(out, max_attempts=1).record_failure(
        "bad-1", "fp", "/data/bad.mrc: not an MRC file (bad map word)", "bad")
    html = get(server.url + "/")[1].decode()
    assert "session1/TS_09" in html and "cuda:1" in html
    assert "quarantined" in html and "not an MRC file (bad map word)" in html


def write_outside(tmp_path: Path) -> Path:
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the output folder")
    return secret


ESCAPES = [
    "/files/../secret.txt",
    "/files/session1/TS_01/../../../secret.txt",
    "/files/session1/TS_01/%2e%2e/%2e%2e/%2e%2e/secret.txt",
    "/files/%2e%2e/secret.txt",
    "/files/session1%2fTS_01/TS_01_summary.json",
    "/files/session1/TS_01%2fTS_01_summary.json",
    "/files/session1/TS_01/..%2f..%2f..%2fsecret.txt",
    "/files/session1/TS_01/%5c..%5csecret.txt",
    "/files//etc/passwd",
    "/files/%2fetc%2fpasswd",
    "/files/session1/TS_01//etc/passwd",
    "/files/.tomolive/failures/x.json",
    "/files/session1/TS_01/link_out",
    "/files/session1/linked/linked_summary.json",
    "/files/session1/TS_01/%00",
    "/t/../secret",
    "/t/session1/%2e%2e/%2e%2e",
    "/t/session1/linked",
    "/thumb/../secret.txt",
    "/thumb/%2e%2e/secret",
    "/thumb/session1/linked",
]


@pytest.mark.parametrize("path", ESCAPES)
def test_nothing_outside_a_result_folder_is_served(served, tmp_path, path):
    server, out = served
    secret = write_outside(tmp_path)
    link = out / "session1/TS_01/link_out"
    if not link.is_symlink():
        link.symlink_to(secret)
    # A result-looking folder that is a symlink out of the output folder.
    outside = tmp_path / "elsewhere" / "linked"
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "linked_summary.json").write_text("{}")
    if not (out / "session1/linked").is_symlink():
        (out / "session1/linked").symlink_to(outside)
    status, body, _ = send_raw(server, path)
    assert status == 404, (path, body[:200])
    assert b"outside the output folder" not in body


def send_raw(server: HttpServer, path: str) -> tuple[int, bytes, dict]:
    """GET `path` exactly as written (urllib would not normalise it, but say so outright)."""
    import http.client

    connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        connection.close()


def test_a_symlink_that_stays_inside_is_served(served):
    server, out = served
    (out / "session1/TS_01/alias.png").symlink_to(out / "session1/TS_01/TS_01_preview.png")
    status, body, _ = send_raw(server, "/files/session1/TS_01/alias.png")
    assert status == 200 and body[:4] == b"\x89PNG"


def test_pages_are_served_while_a_tomogram_is_added(served):
    """Requests from several threads while another daemon's gallery appends: every answer
    is a whole page."""
    server, out = served
    errors: list[str] = []

    def load() -> None:
        for _ in range(5):
            status, body, _ = get(server.url + "/")
            if status != 200 or not body.rstrip().endswith(b"</html>"):
                errors.append(f"{status} {body[-80:]!r}")

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    gallery.Gallery(out).add(publish(out, "TS_02"))
    for t in threads:
        t.join()
    assert not errors
    assert "TS_02" in get(server.url + "/")[1].decode()
    assert os.path.exists(out / "index.html")


def test_pages_newest_first_and_paginated(out):
    g = gallery.Gallery(out)
    for i in range(5):
        g.add(publish(out, f"TS_{i:02d}"))
    pages = gallery.SessionPages(out, page_size=2)
    server = HttpServer(Metrics(process_metrics=False), port=0, pages=pages)
    try:
        stems = {}
        for page in (1, 2, 3, 99):
            data = json.loads(get(f"{server.url}/api/session.json?page={page}")[1])
            stems[page] = [row["stem"] for row in data["tomograms"]]
            assert data["pages"] == 3 and data["page"] == min(page, 3)
        assert stems == {1: ["TS_04", "TS_03"], 2: ["TS_02", "TS_01"], 3: ["TS_00"],
                         99: ["TS_00"]}
        html = get(f"{server.url}/?page=2")[1].decode()
        assert 'href="/?page=1"' in html and 'href="/?page=3"' in html
        assert "TS_02" in html and "TS_04" not in html
        assert get(f"{server.url}/?page=abc")[0] == 200  # a bad number is page 1
    finally:
        server.stop()


def test_nothing_but_get_is_answered(served):
    """Read-only: no method that could change anything is served."""
    import http.client

    server, out = served
    for method in ("POST", "PUT", "DELETE"):
        connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
        try:
            connection.request(method, "/files/session1/TS_01/TS_01_summary.json", body=b"x")
            assert connection.getresponse().status == 501, method
        finally:
            connection.close()
    assert (out / "session1/TS_01/TS_01_summary.json").read_text().startswith("{")


def test_a_deleted_row_cache_is_rebuilt_by_a_running_reader_and_writer(out):
    """README: delete rows.jsonl to have it rebuilt; a daemon already running must not carry
    on with its old rows, nor start a cache of one row."""
    g = gallery.Gallery(out)
    for stem in ("TS_01", "TS_02"):
        g.add(publish(out, stem))
    reader = gallery_rows.RowIndex(out)
    reader.refresh()
    reader.path.unlink()
    publish(out, "TS_03")  # written by something that did not add it (segment --out)
    assert reader.refresh()
    assert sorted(r["stem"] for r in reader.rows()) == ["TS_01", "TS_02", "TS_03"]
    reader.path.unlink()
    g.add(publish(out, "TS_04"))
    with open(out / "index.csv", newline="") as handle:
        assert sorted(r["stem"] for r in csv.DictReader(handle)) == [
            "TS_01", "TS_02", "TS_03", "TS_04"]


HOSTILE_STEMS = ("a b", "it's", "$(touch PWNED)", '"dq" `touch PWNED`', "new\nline",
                 "semi;colon & amp", "per%cent %a", "<img src=x onerror=alert(1)>", "a%2fb")


def test_hostile_names_are_escaped_everywhere(out):
    """File names come from whoever writes into the watched folder: every page, link and
    index row keeps them as text."""
    from urllib.parse import quote

    g = gallery.Gallery(out)
    for stem in HOSTILE_STEMS:
        g.add(publish(out, stem))
    pages = gallery.SessionPages(out)
    server = HttpServer(Metrics(process_metrics=False), port=0, pages=pages)
    try:
        html = get(server.url + "/")[1].decode()
        assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
        for stem in HOSTILE_STEMS:
            status, body, _ = get(f"{server.url}/t/{quote(stem)}")
            assert status == 200, stem
            assert b"<img src=x" not in body
            status, body, _ = get(f"{server.url}/files/{quote(stem)}/{quote(stem)}_preview.png")
            assert status == 200 and body[:4] == b"\x89PNG", stem
            assert get(f"{server.url}/thumb/{quote(stem)}")[0] == 200, stem
    finally:
        server.stop()
    static = (out / "index.html").read_text()
    assert "<img src=x" not in static
    with open(out / "index.csv", newline="") as handle:
        assert sorted(r["stem"] for r in csv.DictReader(handle)) == sorted(HOSTILE_STEMS)
    star = starfile.read(out / "index.star")
    assert len(star) == len(HOSTILE_STEMS)
    assert not list(out.parent.rglob("PWNED"))


def test_a_page_that_fails_answers_500_and_the_server_goes_on(served, monkeypatch):
    server, out = served

    def broken(page: int = 1) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(server._server.pages, "session_html", broken)
    assert get(server.url + "/")[0] == 500
    assert get(server.url + "/metrics")[0] == 200
    assert get(server.url + "/t/session1/TS_01")[0] == 200


def test_snr_and_measured_thickness_are_shown_and_indexed(out):
    extent_nm = tuple(float(n) for n in SHAPE)  # 10 Å voxels
    slab = SpecimenSlab(Surface(1.5, 0.0, 0.0, True), Surface(6.5, 0.0, 0.0, True),
                        extent_nm, 3.0)  # type: ignore[arg-type]
    one_side = SpecimenSlab(Surface(1.5, 0.0, 0.0, True), Surface(9.0, 0.0, 0.0, False),
                            extent_nm, 3.0)  # type: ignore[arg-type]
    publish(out, "TS_slab", snr_estimate=2.46, specimen=slab)
    publish(out, "TS_one_side", snr_estimate=1.5, specimen=one_side)
    thick = SpecimenSlab(Surface(50.0, 0.0, 0.0, True), Surface(850.0, 0.0, 0.0, True),
                         (900.0, 24.0, 32.0), 3.0)  # the record of a 900 nm deep field
    publish(out, "TS_thick", specimen=thick)
    publish(out, "TS_older")  # a summary from before both: no values
    rows = {r["stem"]: r for r in (gallery_rows.row_for_folder(out, out / s)
                                   for s in ("TS_slab", "TS_one_side", "TS_older"))}
    assert rows["TS_slab"]["snr_estimate"] == pytest.approx(2.46)
    assert rows["TS_slab"]["specimen_thickness_nm"] == pytest.approx(5.0)
    assert rows["TS_one_side"]["specimen_thickness_nm"] is None  # a lower bound is no measure
    assert rows["TS_older"]["snr_estimate"] is None
    html = gallery.SessionPages(out).session_html()
    assert ">2.46<" in html and 'class="num">5 nm<' in html
    assert 'class="num error">800 nm<' in html  # over THICK_SPECIMEN_NM
    assert "2.46" in gallery.SessionPages(out).tomogram_html("TS_slab")
    gallery.Gallery(out).add(out / "TS_slab")
    header, *lines = (out / "index.csv").read_text().splitlines()
    columns = header.split(",")
    cells = dict(zip(columns, next(r for r in lines if r.startswith("TS_slab")).split(","),
                     strict=True))
    assert cells["snr_estimate"] == "2.460" and cells["specimen_thickness_nm"] == "5.0"


def test_the_model_fit_signal_is_shown_and_flagged_when_the_model_does_not_fit(out):
    publish(out, "TS_fits", uncertain_fraction=0.07)
    publish(out, "TS_misfit", uncertain_fraction=0.25)
    publish(out, "TS_older")  # a summary from before the signal: no value
    pages = gallery.SessionPages(out)
    html = pages.session_html()
    assert ">0.070<" in html and "n/a" in html
    assert 'class="num error">0.250<' in html  # over the alert's 0.15
    gallery.Gallery(out).add(out / "TS_misfit")
    header, *rows = (out / "index.csv").read_text().splitlines()
    assert "uncertain_fraction" in header.split(",")
    assert "0.2500" in next(r for r in rows if r.startswith("TS_misfit"))
    assert "0.250" in pages.tomogram_html("TS_misfit")
