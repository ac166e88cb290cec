"""The output folder's contract (core.result_folder): its names, its completion marker and the
recovery of a publish that a killed writer interrupted."""

from __future__ import annotations

import json

import numpy as np
from tomolive.core import result_folder
from tomolive.core.classes import SYNTH_CLASS_NAMES, default_class
from tomolive.core.export import write_outputs
from tomolive.core.segmentation import Segmentation


def _result(out_parent, stem, text="new", folder_name=None):
    """A finished result for `stem`, in the folder `folder_name` (default: `stem`)."""
    folder = out_parent / (folder_name or stem)
    folder.mkdir(parents=True)
    (folder / result_folder.summary_name(stem)).write_text(json.dumps({"stem": stem,
                                                                      "text": text}))
    return folder


def test_names_round_trip_and_unfinished_names_are_recognised():
    assert result_folder.summary_name("TS_01") == "TS_01_summary.json"
    assert result_folder.stem_of_summary("/x/TS_01/TS_01_summary.json") == "TS_01"
    assert result_folder.stem_of_summary("TS_01_labels.mrc") is None
    token = result_folder.new_token()
    for name in (result_folder.temporary_folder_name("TS_01", token),
                 result_folder.set_aside_folder_name("TS_01", token)):
        assert result_folder.is_unfinished_name(name)
    assert not result_folder.is_unfinished_name("TS_01")
    assert not result_folder.is_unfinished_name(".tomolive")


def test_read_summary_is_none_for_absent_torn_or_foreign_markers(tmp_path):
    assert result_folder.read_summary(tmp_path / "TS_01") is None  # no folder at all
    folder = _result(tmp_path, "TS_01")
    assert result_folder.read_summary(folder)["text"] == "new"
    result_folder.summary_path(folder).write_text('{"stem": "TS_0')  # torn mid-write
    assert result_folder.read_summary(folder) is None
    result_folder.summary_path(folder).write_text("[1, 2]")  # JSON, but not a summary
    assert result_folder.read_summary(folder) is None


def test_a_set_aside_result_is_put_back_when_the_writer_died_between_the_renames(tmp_path):
    old = _result(tmp_path, "TS_01", "old",
                  folder_name=result_folder.set_aside_folder_name("TS_01", "0badc0de"))
    tmp = tmp_path / result_folder.temporary_folder_name("TS_01", "12345678")
    tmp.mkdir()
    (tmp / "TS_01_labels.mrc").write_bytes(b"partial")
    result_folder.recover_interrupted_publish(tmp_path, "TS_01")
    assert not old.exists() and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TS_01"]
    assert result_folder.read_summary(tmp_path / "TS_01")["text"] == "old"  # put back whole


def test_a_set_aside_result_is_deleted_when_the_new_one_is_in_place(tmp_path):
    _result(tmp_path, "TS_01", "new")
    _result(tmp_path, "TS_01", "old",
            folder_name=result_folder.set_aside_folder_name("TS_01", "0badc0de"))
    _result(tmp_path, "TS_010", "another tomogram")  # a longer stem is not ours to touch
    (tmp_path / result_folder.temporary_folder_name("TS_010", "12345678")).mkdir()
    result_folder.recover_interrupted_publish(tmp_path, "TS_01")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["TS_01", "TS_010", result_folder.temporary_folder_name(
        "TS_010", "12345678")])
    assert result_folder.read_summary(tmp_path / "TS_01")["text"] == "new"


def test_the_writer_uses_the_contract_names(tmp_path):
    """core.export publishes under the contract's names: a summary the readers find, and no
    temporary or set-aside folder left behind after replacing a result."""
    classes = [default_class(name) for name in SYNTH_CLASS_NAMES]
    seg = Segmentation(stem="TS_01", labels=np.zeros((4, 8, 8), np.int8), voxel_size_a=10.0,
                       origin_xyz_a=(0.0, 0.0, 0.0), classes=classes)
    for _ in range(2):  # the second publish replaces the first through a set-aside folder
        folder = write_outputs(tmp_path, seg)
    assert result_folder.read_summary(folder)["stem"] == "TS_01"
    assert not [p for p in tmp_path.iterdir() if result_folder.is_unfinished_name(p.name)]
