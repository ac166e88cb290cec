"""Output folder names: one per input file, stable as siblings come and go (daemon/naming.py)."""

from __future__ import annotations

import json
from pathlib import Path

from tomolive.daemon.naming import output_stem


def _result(out_parent: Path, folder: str, input_path: Path) -> None:
    (out_parent / folder).mkdir(parents=True)
    summary = {"input": {"path": str(input_path)}}
    (out_parent / folder / f"{folder}_summary.json").write_text(json.dumps(summary))


def test_a_lone_input_is_named_by_its_stem(tmp_path):
    path = tmp_path / "TS_01.mrc"
    path.write_bytes(b"x")
    assert output_stem(path, tmp_path / "out") == "TS_01"
    assert output_stem(path, None) == "TS_01"


def test_inputs_sharing_a_stem_keep_their_extensions(tmp_path):
    mrc, rec = tmp_path / "TS_01.mrc", tmp_path / "TS_01.rec"
    mrc.write_bytes(b"x")
    rec.write_bytes(b"x")
    assert output_stem(mrc, tmp_path / "out") == "TS_01_mrc"
    assert output_stem(rec, tmp_path / "out") == "TS_01_rec"
    # Only what the watched folder's patterns pick up counts as a sibling input.
    assert output_stem(mrc, tmp_path / "out", patterns=["*.mrc"]) == "TS_01"
    (tmp_path / "TS_02.mrc").write_bytes(b"x")
    (tmp_path / "TS_02.mrc.tmp").write_bytes(b"x")
    (tmp_path / "TS_02.st").write_bytes(b"x")
    assert output_stem(tmp_path / "TS_02.mrc", None, patterns=["*.mrc", "TS_*.s?"]) == "TS_02_mrc"


def test_a_finished_result_keeps_its_folder_and_is_never_taken_over(tmp_path):
    out = tmp_path / "out"
    mrc, rec = tmp_path / "TS_01.mrc", tmp_path / "TS_01.rec"
    mrc.write_bytes(b"x")
    _result(out, "TS_01", mrc)  # segmented while it was alone
    rec.write_bytes(b"x")  # then a sibling arrived
    assert output_stem(mrc, out) == "TS_01"
    assert output_stem(rec, out) == "TS_01_rec"
    mrc.unlink()  # the owner is gone but its result stays: the sibling does not overwrite it
    assert output_stem(rec, out) == "TS_01_rec"


def test_a_result_named_while_a_sibling_existed_outlives_the_sibling(tmp_path):
    out = tmp_path / "out"
    mrc = tmp_path / "TS_01.mrc"
    mrc.write_bytes(b"x")
    _result(out, "TS_01_mrc", mrc)  # TS_01.rec was there then, and is gone now
    assert output_stem(mrc, out) == "TS_01_mrc"
