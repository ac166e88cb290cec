#!/usr/bin/env bash
# A wheel built from the repo installs and imports in a clean virtual environment, ships the
# default model, the napari manifest and the page templates, and its `tomolive` command runs.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$python" -m build --wheel --outdir "$work/dist" . > "$work/build.log" 2>&1 || {
    cat "$work/build.log"; exit 1; }
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet torch==2.13.0 "$work"/dist/tomolive-*.whl 2>&1 \
    | grep -v "^WARNING: Location" || true
cd "$work"  # away from the source tree, so only the installed package can be imported
"$work/venv/bin/python" - <<'PY'
import tomolive.core.pipeline, tomolive.daemon.service, tomolive.interop.napari  # noqa: F401
from importlib.metadata import entry_points
from importlib.resources import files
from tomolive.core.model import default_bundle_path, load_bundle
bundle = load_bundle(default_bundle_path())
print(f"wheel ok: default model {bundle.meta.name} v{bundle.meta.version} from {default_bundle_path()}")
# The napari plugin manifest ships and its entry point names it.
(plugin,) = [e for e in entry_points(group="napari.manifest") if e.name == "tomolive"]
assert files("tomolive.interop").joinpath("napari.yaml").is_file(), plugin.value
print(f"wheel ok: napari manifest {plugin.value}")
# The session page's templates ship and render (daemon/gallery.py, package data).
from tomolive.daemon import gallery
for name in ("base.html", "session.html", "tomogram.html"):
    assert files("tomolive.daemon").joinpath("templates", name).is_file(), name
html = gallery.render_session([], links=gallery.LiveLinks, page=1, pages=1, total=0,
                              today=gallery.throughput_today([]), state=None, version="",
                              output_dir="/nowhere")
assert "No tomogram finished yet" in html
print("wheel ok: session page templates")
PY
"$work/venv/bin/tomolive" --version
