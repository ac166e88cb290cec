"""`tomolive star-combine DIR`: one STAR file per class for a session, from the per-tomogram
files of real published results, read back by `starfile` (the library RELION users script with);
and core.star's reader of its own files."""

from __future__ import annotations

import subprocess
import sys

import pytest
import starfile
from tomolive.core.export import write_outputs
from tomolive.core.star import StarError, combined_star_text, star_columns, star_text

from .test_export import _segmentation


def _publish(out, names):
    for name in names:
        seg = _segmentation(stem=name)
        seg.tilt_series_name = name
        write_outputs(out / "session1", seg)


def _combine(folder):
    return subprocess.run([sys.executable, "-m", "tomolive", "star-combine", str(folder)],
                          capture_output=True, text=True, timeout=120)


def test_a_session_gets_one_star_per_class_with_every_tomograms_rows(tmp_path):
    _publish(tmp_path, ["TS_01", "TS_02", "TS_03"])
    run = _combine(tmp_path / "session1")
    assert run.returncode == 0, run.stderr
    session = tmp_path / "session1"
    ribosomes = starfile.read(session / "ribosome_particles.star")
    single = starfile.read(session / "TS_02" / "TS_02_ribosome.star")
    assert list(ribosomes.columns) == list(single.columns)
    assert list(ribosomes.rlnTomoName) == ["TS_01"] * 2 + ["TS_02"] * 2 + ["TS_03"] * 2
    rows_02 = ribosomes[ribosomes.rlnTomoName == "TS_02"].reset_index(drop=True)
    assert rows_02.equals(single)  # the same values, not re-computed ones
    tubes = starfile.read(session / "microtubule_filaments.star")
    assert len(tubes) == 3 * len(starfile.read(session / "TS_01" / "TS_01_microtubule_filaments"
                                                              ".star"))
    assert set(tubes.rlnHelicalTubeID) == {1, 2}  # per tomogram, as RELION reads tube ids
    gold = starfile.read(session / "gold_particles.star")  # no gold anywhere: header only
    assert len(gold) == 0
    assert "ribosome_particles.star: 6 rows" in run.stdout


def test_no_results_or_a_missing_folder_is_one_clear_line(tmp_path):
    empty = _combine(tmp_path)
    assert empty.returncode == 1 and "no finished tomograms" in empty.stderr
    assert len(empty.stderr.strip().splitlines()) == 1
    missing = _combine(tmp_path / "nope")
    assert missing.returncode == 1 and "nope: not a folder" in missing.stderr


def test_a_results_unreadable_star_file_fails_the_combination_naming_it(tmp_path):
    _publish(tmp_path, ["TS_01", "TS_02"])
    broken = tmp_path / "session1" / "TS_02" / "TS_02_ribosome.star"
    broken.write_text("data_particles\nloop_\n_rlnTomoName #1\nTS_02 extra-value\n")
    run = _combine(tmp_path / "session1")
    assert run.returncode == 1 and f"{broken}: line 4" in run.stderr
    assert not (tmp_path / "session1" / "ribosome_particles.star").exists()


def test_star_columns_reads_what_star_text_writes_including_quoted_values():
    text = star_text("particles", {"rlnTomoName": ['"TS 01"', "TS_02"], "rlnX": ["1.5", "2"]})
    block, columns = star_columns(text)
    assert block == "particles" and columns == {"rlnTomoName": ["TS 01", "TS_02"],
                                                "rlnX": ["1.5", "2"]}
    again = star_columns(combined_star_text([(block, columns)] * 2, "test"))[1]
    assert again["rlnTomoName"] == ["TS 01", "TS_02"] * 2


@pytest.mark.parametrize("text, message", [
    ("nothing here\n", "line 1: 2 values for 0 labels"),
    ("# only a comment\n", "not a STAR loop"),
    ("data_a\nloop_\n_x #1\n1\ndata_b\n", "a second data block"),
    ("data_a\nloop_\n_x #1\n1\n_y #2\n", "a label after the rows"),
])
def test_star_columns_refuses_what_is_not_one_loop(text, message):
    with pytest.raises(StarError, match=message):
        star_columns(text, "f.star")
