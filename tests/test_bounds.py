"""Plausibility bounds: voxel sizes of tomograms and bundles, and the model grid a tomogram needs,
checked before anything is allocated, with one line naming the file and the value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tomolive.core.classes import default_class
from tomolive.core.model import BundleMeta, architecture_dict, build_network, save_bundle
from tomolive.core.pipeline import segment_file
from tomolive.core.resample import grid_for
from tomolive.core.volume import (
    DEFAULT_MAX_MODEL_VOXELS,
    DEFAULT_VOXEL_SIZE_BOUNDS_A,
    VolumeError,
    read_mrc,
    write_mrc,
)
from tomolive.daemon.model_registry import ModelRegistry

SHAPE = (32, 128, 128)  # the tomogram


def _tomogram(path: Path, voxel_a: float) -> Path:
    return write_mrc(path, np.zeros(SHAPE, np.int8), voxel_a)


def _error(call, *args, **kwargs) -> str:
    with pytest.raises(VolumeError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults():
    assert DEFAULT_VOXEL_SIZE_BOUNDS_A == (1.5, 50.0)
    assert DEFAULT_MAX_MODEL_VOXELS == 2**32


@pytest.mark.parametrize("voxel_a", [0.013, 1000.0])
def test_absurd_header_voxel_size_is_rejected_naming_file_and_value(tmp_path, voxel_a):
    path = _tomogram(tmp_path / "lying.mrc", voxel_a)
    message = _error(read_mrc, path)
    assert message.startswith(f"{path}: header voxel size {voxel_a:g} Å is outside the "
                              f"plausible range 1.5..50 Å"), message
    # The per-folder override still rescues a lying header.
    assert read_mrc(path, voxel_size_a=13.2).voxel_size_a == 13.2


def test_the_pipeline_refuses_before_reading(tmp_path):
    # segment_file reads with the default bounds: the bundle is never reached.
    path = _tomogram(tmp_path / "TS_01.mrc", 0.013)
    message = _error(segment_file, path, tmp_path / "out", bundle=None)  # type: ignore[arg-type]
    assert "header voxel size 0.013 Å is outside" in message
    assert not (tmp_path / "out" / "TS_01").exists()


def test_override_is_bounded_too_and_bounds_are_arguments(tmp_path):
    path = _tomogram(tmp_path / "t.mrc", 10.0)
    message = _error(read_mrc, path, voxel_size_a=0.5)
    assert message.startswith(f"{path}: voxel size override 0.5 Å is outside"), message
    assert read_mrc(path, voxel_size_a=0.5, voxel_size_bounds_a=(0.1, 50.0)).voxel_size_a == 0.5
    assert "outside the plausible range 12..50 Å" in _error(
        read_mrc, path, voxel_size_bounds_a=(12.0, 50.0))


def test_model_grid_bound_is_checked_from_shapes_alone():
    # 1000 Å onto a 10 Å model: 3200 x 12800 x 12800 voxels (1.9 TiB as float32) is refused
    # by arithmetic on the shapes, before any allocation.
    with pytest.raises(ValueError) as info:
        grid_for(SHAPE, 1000.0, 10.0)
    message = str(info.value)
    assert message.startswith("model grid 3200 x 12800 x 12800 (z, y, x) for 1000 Å -> 10 Å")
    assert "1.95e+03 GiB as float32" in message and "\n" not in message
    assert grid_for(SHAPE, 20.0, 10.0).model_shape == (64, 256, 256)
    with pytest.raises(ValueError, match="above the limit of 1e\\+06 voxels"):
        grid_for(SHAPE, 20.0, 10.0, max_model_voxels=10**6)


def test_segment_options_carry_the_configured_bounds_before_any_allocation(tmp_path):
    """What the daemon passes from its configuration (SegmentOptions) decides, with one line
    naming the file: a 40 Å header within the defaults, refused under (1.5, 30); a model grid
    above max_model_voxels refused before the rescale allocates it."""
    from tomolive.core.model import load_bundle
    from tomolive.core.pipeline import SegmentOptions

    path = _tomogram(tmp_path / "t.mrc", 40.0)
    bundle = load_bundle(_bundle(tmp_path / "m.safetensors", 10.0))
    with pytest.raises(ValueError) as info:
        segment_file(path, tmp_path / "out", bundle,
                     SegmentOptions(voxel_size_bounds_a=(1.5, 30.0)))
    assert str(info.value).startswith(f"{path}: header voxel size 40 Å is outside the "
                                      "plausible range 1.5..30 Å"), info.value
    with pytest.raises(ValueError) as info:
        segment_file(path, tmp_path / "out", bundle, SegmentOptions(max_model_voxels=10**6))
    message = str(info.value)
    assert message.startswith(f"{path}: model grid 128 x 512 x 512 (z, y, x)"), message
    assert "\n" not in message and not (tmp_path / "out" / "t").exists()


def _bundle(path: Path, voxel_a: float) -> Path:
    arch = architecture_dict(in_slices=3, n_classes=2, base_width=4, levels=2)
    meta = BundleMeta(name=path.stem, version=1, architecture=arch, voxel_size_a=voxel_a,
                      classes=[default_class("membrane")])
    return save_bundle(path, build_network(arch), meta)


def _registry(tmp_path: Path, rejected: list, **kwargs) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models", tmp_path / "cache", settle_s=0.0,
                         on_rejected=lambda path, reason: rejected.append(reason), **kwargs)


def test_model_validation_rejects_an_absurd_voxel_size(tmp_path):
    (tmp_path / "models").mkdir()
    _bundle(tmp_path / "models" / "absurd.safetensors", 0.1)
    rejected: list[str] = []
    registry = _registry(tmp_path, rejected)
    assert registry.poll() is None and registry.current is None
    assert len(rejected) == 1
    assert "voxel_size_a 0.1 Å is outside the plausible range 1.5..50 Å" in rejected[0]
    _bundle(tmp_path / "models" / "good.safetensors", 10.0)
    assert registry.poll().name == "good"


def test_model_validation_uses_the_configured_bounds(tmp_path):
    (tmp_path / "models").mkdir()
    _bundle(tmp_path / "models" / "fine.safetensors", 0.1)
    rejected: list[str] = []
    registry = _registry(tmp_path, rejected, voxel_size_bounds_a=(0.05, 50.0))
    assert registry.poll().name == "fine" and rejected == []


def test_a_slow_model_copy_is_waited_for_not_rejected(tmp_path, caplog):
    (tmp_path / "models").mkdir()
    whole = _bundle(tmp_path / "whole.safetensors", 10.0).read_bytes()
    copy = tmp_path / "models" / "copying.safetensors"
    rejected: list[str] = []
    registry = _registry(tmp_path, rejected)
    caplog.set_level("INFO", logger="tomolive.models")
    for cut in (6, len(whole) // 3, 2 * len(whole) // 3):  # the copy pauses three times
        copy.write_bytes(whole[:cut])
        assert registry.poll() is None and registry.poll() is None
    assert rejected == [] and registry.current is None
    assert sum("incomplete" in r.getMessage() for r in caplog.records) == 3
    copy.write_bytes(whole)
    model = registry.poll()
    assert model is not None and model.source == copy and rejected == []


def test_a_model_copy_that_never_completes_is_rejected_in_the_end(tmp_path):
    (tmp_path / "models").mkdir()
    whole = _bundle(tmp_path / "whole.safetensors", 10.0).read_bytes()
    (tmp_path / "models" / "aborted.safetensors").write_bytes(whole[: len(whole) // 2])
    rejected: list[str] = []
    registry = _registry(tmp_path, rejected, truncated_after_s=0.0)
    assert registry.poll() is None and rejected == []  # incomplete: waited for
    assert registry.poll() is None
    assert len(rejected) == 1 and "truncated: shorter than its header says" in rejected[0]


def test_the_model_cache_keeps_only_what_can_still_be_loaded(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    rejected: list[str] = []
    registry = _registry(tmp_path, rejected)
    first = _bundle(models / "first.safetensors", 10.0)
    a = registry.poll()
    _bundle(models / "second.safetensors", 12.0)
    b = registry.poll()
    assert b is not None and b.sha256 != a.sha256
    cache = tmp_path / "cache"
    assert {p.stem for p in cache.glob("*.safetensors")} == {a.sha256, b.sha256}
    assert registry.prune_cache(in_use=set()) == 0  # first is still a valid fallback
    first.unlink()
    registry.poll()  # first is gone from the folder
    assert registry.prune_cache(in_use={a.sha256}) == 0  # a job in flight still names it
    assert registry.prune_cache(in_use=set()) == 1
    assert {p.stem for p in cache.glob("*.safetensors")} == {b.sha256}


def test_models_validate_applies_the_configured_bounds(tmp_path, capsys):
    from tomolive.daemon import cli

    models = tmp_path / "models"
    models.mkdir()
    _bundle(models / "fine.safetensors", 1.0)  # below the default 1.5 Å
    assert cli.main(["models", "validate", str(models)]) == 1
    assert "INVALID" in capsys.readouterr().out
    config = tmp_path / "wide.yaml"
    config.write_text(f"models_dir: {models}\nvoxel_size_bounds_a: [0.5, 60]\n")
    assert cli.main(["models", "validate", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith(f"ok {models / 'fine.safetensors'}: fine v1 1 Å")
