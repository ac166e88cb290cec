"""Per-class probability maps as files: `STEM_<class>_prob.mrc`, unsigned bytes (0..255 for
0..1, MRC mode 0 with IMOD's unsigned stamp), on the input grid in the file's own axis order.

They let people re-threshold without re-running the network (`tomolive repick`, core.repick)
and look at soft maps in their own viewers. Two sources write them into a result folder:
`ModelGridMaps` (a fresh segmentation: bytes on the model grid, mapped to the input grid one
class at a time) and `SavedMaps` (a repick: the previous folder's files, hard-linked where the
file system allows, else copied). Neither holds a float copy of a whole volume.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .resample import GridMap, resample_linear_u8
from .volume import canonical_shape, from_canonical, read_mrc, to_canonical, write_mrc


class ProbabilityMaps(Protocol):
    """What `core.export` needs to write the maps of a result."""

    names: tuple[str, ...]  # class names, in the order they are written

    def write(self, name: str, path: Path, voxel_size_a: float,
              origin_xyz_a: tuple[float, float, float]) -> None: ...


@dataclass
class ModelGridMaps:
    """Bytes [len(names), z, y, x] on the (canonical) model grid, from `core.infer.predict`."""

    names: tuple[str, ...]
    values_u8: np.ndarray
    grid: GridMap
    beam_axis: int

    def write(self, name: str, path: Path, voxel_size_a: float,
              origin_xyz_a: tuple[float, float, float]) -> None:
        model_grid = self.values_u8[self.names.index(name)]
        input_grid = resample_linear_u8(model_grid, self.grid.input_shape)
        write_mrc(path, np.ascontiguousarray(from_canonical(input_grid, self.beam_axis)),
                  voxel_size_a, origin_xyz_a)


@dataclass
class SavedMaps:
    """The maps of an earlier result folder, carried into its replacement unchanged."""

    names: tuple[str, ...]
    paths: dict[str, Path]

    def write(self, name: str, path: Path, voxel_size_a: float,
              origin_xyz_a: tuple[float, float, float]) -> None:
        try:
            os.link(self.paths[name], path)  # the old folder is deleted after the swap
        except OSError:  # a file system without hard links
            shutil.copyfile(self.paths[name], path)


def read_model_grid(paths: dict[str, Path], names: tuple[str, ...], grid: GridMap,
                    beam_axis: int) -> np.ndarray:
    """Saved maps (input grid, file axis order) -> bytes [len(names), z, y, x] on the model
    grid; ValueError naming the file when one does not fit the result."""
    expected = tuple(int(n) for n in grid.input_shape)
    out = np.empty((len(names), *grid.model_shape), dtype=np.uint8)
    for index, name in enumerate(names):
        data = read_mrc(paths[name], check_finite=False).data
        if data.dtype != np.uint8:
            raise ValueError(f"{paths[name]}: a probability map must hold unsigned bytes "
                             f"(MRC mode 0), not {data.dtype}")
        canonical = to_canonical(data, beam_axis)
        if tuple(canonical.shape) != expected:
            file_shape = canonical_shape(expected, beam_axis)
            raise ValueError(f"{paths[name]}: shape {data.shape} does not match the result's "
                             f"input grid {file_shape}")
        out[index] = resample_linear_u8(canonical, grid.model_shape)
    return out
