"""The napari reader (interop/napari.py), through npe2 as napari calls it, without a display."""

from __future__ import annotations

import numpy as np
import pytest
from tomolive.core.export import write_outputs
from tomolive.core.volume import write_mrc
from tomolive.interop.napari import get_reader, read_result

from .test_export import SHAPE, VOXEL_A, _segmentation, _tomogram


@pytest.fixture
def result(tmp_path):
    tomogram = _tomogram()
    source = tmp_path / "TS_01.mrc"
    write_mrc(source, tomogram, VOXEL_A)
    seg = _segmentation()
    seg.input["path"] = str(source)
    return write_outputs(tmp_path / "out", seg, tomogram), seg, tomogram


def test_npe2_finds_the_manifest_and_reads_a_result_folder(result):
    npe2 = pytest.importorskip("npe2")  # in the test extra: installed by .ci/run
    folder, seg, tomogram = result
    manager = npe2.PluginManager.instance()
    manager.discover()
    manifest = manager.get_manifest("tomolive")  # through the napari.manifest entry point
    assert [r.command for r in manifest.contributions.readers] == ["tomolive.get_reader"]
    layers = npe2.read([str(folder)], stack=False, plugin_name="tomolive")
    kinds = [(kwargs["name"], kind) for _, kwargs, kind in layers]
    assert kinds == [("TS_01", "image"), ("TS_01 labels", "labels"),
                     ("TS_01 ribosome", "points"), ("TS_01 gold", "points"),
                     ("TS_01 microtubule", "shapes")]
    image, labels, ribosomes, gold, tubes = (data for data, _, _ in layers)
    assert np.array_equal(np.asarray(image), tomogram)
    assert np.array_equal(np.asarray(labels), seg.labels)
    assert np.allclose(ribosomes, seg.particles["ribosome"].zyx, atol=1e-3)
    assert gold.shape == (0, 3)
    assert len(tubes) == 2
    for path, filament in zip(tubes, seg.filaments["microtubule"], strict=True):
        assert np.allclose(path, filament.points_zyx, atol=0.01)
    for _, kwargs, _ in layers:
        assert kwargs["scale"] == (VOXEL_A,) * 3
    labels_kwargs = layers[1][1]
    assert labels_kwargs["colormap"][3] == next(s.color for s in seg.classes
                                                if s.name == "ribosome")


def test_a_result_opens_without_its_input_and_other_folders_are_declined(result, tmp_path):
    folder, seg, _ = result
    (tmp_path / "TS_01.mrc").unlink()  # the input moved away: the results still open
    layers = read_result(str(folder / "TS_01_labels.mrc"))  # a file inside the folder works too
    assert [kind for _, _, kind in layers] == ["labels", "points", "points", "shapes"]
    assert layers[0][0].shape == SHAPE
    assert get_reader(str(tmp_path)) is None  # not a result folder: napari asks other readers
    assert get_reader([str(folder), str(folder)]) is None
    with pytest.raises(ValueError, match="not a tomolive result folder"):
        read_result(str(tmp_path))
