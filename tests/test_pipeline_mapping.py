"""Coordinates found on the model grid land on the input file's own grid, whichever axis of
the file is the thin (beam) one."""

from __future__ import annotations

import numpy as np
import pytest
from tomolive.core.filaments import Filament
from tomolive.core.pipeline import filament_to_input, points_to_input
from tomolive.core.resample import grid_for
from tomolive.core.volume import thin_axis, to_canonical


@pytest.mark.parametrize("file_shape", [(40, 100, 80), (100, 40, 80), (100, 80, 40)])
def test_a_voxel_marked_in_the_file_comes_back_to_the_same_file_voxel(file_shape):
    file_zyx = np.array([[7.0, 21.0, 33.0]])
    volume = np.zeros(file_shape, np.int8)
    volume[tuple(file_zyx[0].astype(int))] = 1
    beam_axis = thin_axis(file_shape)
    canonical = to_canonical(volume, beam_axis)
    grid = grid_for(canonical.shape, 10.0, 13.2)
    canonical_zyx = np.argwhere(canonical == 1).astype(np.float64)
    model_zyx = grid.to_model(canonical_zyx)
    assert np.allclose(points_to_input(model_zyx, grid, beam_axis), file_zyx)


def test_filament_directions_follow_the_axes_of_the_file():
    file_shape = (100, 80, 40)  # x is the thin axis
    grid = grid_for((40, 80, 100), 10.0, 10.0)
    along_canonical_z = Filament(points_zyx=np.array([[1.0, 2.0, 3.0]]),
                                 directions_zyx=np.array([[1.0, 0.0, 0.0]]))
    mapped = filament_to_input(along_canonical_z, grid, thin_axis(file_shape))
    assert np.allclose(mapped.directions_zyx, [[0.0, 0.0, 1.0]])  # the file's x axis
    assert np.allclose(mapped.points_zyx, [[3.0, 2.0, 1.0]])
