"""IMOD model files (`.mod`) of particles and filaments, written with the `imodmodel` library.

One file per class, opening in 3dmod over the tomogram (`3dmod TS_01.mrc TS_01_microtubule.mod`):
one object named after the class, in its display colour; a particle class is one scattered
contour with a point per particle (drawn as a sphere of the particle's radius), a filament
class one open contour per traced filament.

Coordinates follow IMOD's convention (binspec, "Model Coordinate Conventions"): x runs from 0
to NX and y from 0 to NY with a pixel's centre at +0.5, z from -0.5 to NZ - 0.5 with a slice's
centre on the integer. Our tables hold 0-based voxel centres (z, y, x) on the input grid, so a
point is written as (x + 0.5, y + 0.5, z). The header carries the tomogram's size and its pixel
size in nm, so 3dmod scales the model when it is loaded onto a binned copy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .classes import ClassSpec
from .filaments import Filament
from .particles import ParticleTable

IMOD_UNITS_NM = -9  # the header's `units` code for nanometres
# IMOD's offset from a 0-based voxel centre (x, y, z) to model coordinates.
VOXEL_CENTRE_OFFSET_XYZ = np.array([0.5, 0.5, 0.0])


def voxels_to_imod_xyz(zyx: np.ndarray) -> np.ndarray:
    """0-based voxel centres (n, 3) as (z, y, x) -> IMOD model points (n, 3) as (x, y, z)."""
    return np.asarray(zyx, dtype=np.float64).reshape(-1, 3)[:, ::-1] + VOXEL_CENTRE_OFFSET_XYZ


def imod_xyz_to_voxels(xyz: np.ndarray) -> np.ndarray:
    """The inverse of `voxels_to_imod_xyz`."""
    return (np.asarray(xyz, dtype=np.float64).reshape(-1, 3) - VOXEL_CENTRE_OFFSET_XYZ)[:, ::-1]


def write_particle_model(path: str | os.PathLike[str], table: ParticleTable, spec: ClassSpec,
                         shape_zyx: Sequence[int], voxel_size_a: float) -> None:
    """One particle class as a scattered-point object."""
    from imodmodel.models import Contour

    contours = [Contour(points=voxels_to_imod_xyz(table.zyx))] if len(table) else []
    radius_px = (spec.diameter_nm or 0.0) * 10.0 / voxel_size_a / 2.0
    _write(path, spec, contours, shape_zyx, voxel_size_a, scattered=True,
           sphere_radius_px=max(1, round(radius_px)))


def write_filament_model(path: str | os.PathLike[str], filaments: list[Filament],
                         spec: ClassSpec, shape_zyx: Sequence[int], voxel_size_a: float) -> None:
    """One filament class as an open-contour object, a contour per filament."""
    from imodmodel.models import Contour

    contours = [Contour(points=voxels_to_imod_xyz(f.points_zyx)) for f in filaments if len(f)]
    _write(path, spec, contours, shape_zyx, voxel_size_a, scattered=False, sphere_radius_px=0)


def _write(path: str | os.PathLike[str], spec: ClassSpec, contours: list, shape_zyx: Sequence[int],
           voxel_size_a: float, *, scattered: bool, sphere_radius_px: int) -> None:
    from imodmodel.models import ImodModel, Object

    nz, ny, nx = (int(n) for n in shape_zyx)
    red, green, blue = (int(spec.color.lstrip("#")[i:i + 2], 16) / 255.0 for i in (0, 2, 4))
    obj = Object(color=(red, green, blue), contours=contours)
    obj.header.name = spec.name
    obj.header.flags.open = not scattered
    obj.header.flags.scattered = scattered
    if scattered:
        obj.header.pdrawsize = sphere_radius_px  # spheres of the particle's size in 3dmod
    obj.update_sizes()
    model = ImodModel(objects=[obj])
    model.header.name = spec.name
    model.header.xmax, model.header.ymax, model.header.zmax = nx, ny, nz
    model.header.pixelsize = voxel_size_a / 10.0
    model.header.units = IMOD_UNITS_NM
    model.update_sizes()
    model.to_file(path)
