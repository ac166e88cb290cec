"""core.context (issue 21, item 5): each particle's distance to the nearest membrane and the
membrane-enclosed compartment it sits in, as extra STAR/CSV columns."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tomolive.core.classes import default_class
from tomolive.core.context import (
    EXACT_WITHIN_VOX,
    add_particle_context,
    compartments,
    membrane_distance_vox,
)
from tomolive.core.particles import ParticleTable
from tomolive.core.star import (
    combined_star_text,
    particle_csv_text,
    particle_star_text,
    star_columns,
    table_rows,
)

SHAPE = (48, 96, 160)
CLASSES = [default_class("membrane"), default_class("ribosome")]


def _vesicle(labels: np.ndarray, centre: tuple[float, float, float], radius: float,
             open_poles: bool = True) -> None:
    """A one-voxel-thick spherical shell; with `open_poles` its top and bottom are missing,
    as the missing wedge leaves a vesicle in a tomogram."""
    z, y, x = np.indices(labels.shape)
    r = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    shell = np.abs(r - radius) < 0.8
    if open_poles:
        shell &= np.abs(z - centre[0]) < 0.7 * radius
    labels[shell] = 1


def test_distance_to_the_nearest_membrane_is_exact_near_it_and_close_far_from_it():
    rng = np.random.default_rng(0)
    membrane = rng.random(SHAPE) > 0.9995
    points = rng.uniform([0, 0, 0], np.array(SHAPE) - 1, size=(60, 3))
    found = membrane_distance_vox(membrane, points)
    voxels = np.argwhere(membrane)
    truth = np.sqrt(((points[:, None] - voxels[None]) ** 2).sum(axis=2)).min(axis=1)
    near = truth <= EXACT_WITHIN_VOX - 2
    assert near.sum() > 20
    np.testing.assert_allclose(found[near], truth[near], atol=1e-9)
    assert np.all(np.abs(found - truth) <= 2.0)


def test_without_membrane_the_distance_is_nan_and_everything_is_cytosol():
    points = np.array([[10.0, 20.0, 30.0]])
    assert math.isnan(membrane_distance_vox(np.zeros(SHAPE, bool), points)[0])
    assert compartments(np.zeros(SHAPE, bool), points).tolist() == [0]


def test_particles_in_one_open_vesicle_share_a_compartment_and_the_cytosol_is_zero():
    labels = np.zeros(SHAPE, np.int8)
    _vesicle(labels, (24, 48, 40), 18)
    _vesicle(labels, (24, 48, 115), 14)
    points = np.array([[24.0, 48, 40],    # first vesicle's centre
                       [30.0, 52, 36],    # first vesicle, another slice
                       [24.0, 48, 115],   # second vesicle
                       [24.0, 10, 78],    # cytosol between them
                       [24.0, 48, 22]])   # on the first vesicle's wall
    assert compartments(labels == 1, points).tolist() == [1, 1, 2, 0, 0]


def test_a_vesicle_cut_by_the_edge_of_the_field_of_view_counts_as_open():
    labels = np.zeros(SHAPE, np.int8)
    _vesicle(labels, (24, 48, 0), 30)
    assert compartments(labels == 1, np.array([[24.0, 48, 5]])).tolist() == [0]


def test_context_columns_reach_the_star_and_csv_tables_in_nm():
    labels = np.zeros(SHAPE, np.int8)
    _vesicle(labels, (24, 48, 40), 18)
    table = ParticleTable("ribosome", np.array([[24.0, 48, 40], [24.0, 48, 130]]),
                          np.array([0.9, 0.8]), np.array([100, 100]))
    tables = add_particle_context({"ribosome": table}, labels, CLASSES, voxel_size_a=10.0)
    context = tables["ribosome"].context
    # 10 Å voxels: the centre is 17.2 voxels from the shell's inner voxels; the second particle,
    # 72 voxels out, is beyond the exact range and within 2 voxels of it.
    assert context["membrane_distance_nm"][0] == pytest.approx(17.2, abs=0.1)
    assert context["membrane_distance_nm"][1] == pytest.approx(71.5, abs=2.0)
    assert context["compartment"].tolist() == [1, 0]
    block, columns = star_columns(particle_star_text(tables["ribosome"], "TS_01", SHAPE, 10.0))
    assert columns["tomoliveCompartment"] == ["1", "0"]
    assert [float(v) for v in columns["tomoliveMembraneDistanceNm"]] == pytest.approx(
        context["membrane_distance_nm"], abs=0.006)
    csv_lines = particle_csv_text(table_rows(tables.values(), ["membrane_distance_nm",
                                                               "compartment"]),
                                  context=["membrane_distance_nm", "compartment"]).splitlines()
    assert csv_lines[0] == "class,x,y,z,score,membrane_distance_nm,compartment"
    assert csv_lines[1].endswith(",1") and csv_lines[2].endswith(",0")
    # Results from before the columns combine with new ones: the shared columns are kept.
    old = ParticleTable("ribosome", np.array([[1.0, 2, 3]]), np.array([0.5]), np.array([9]))
    mixed = combined_star_text([(block, columns),
                                star_columns(particle_star_text(old, "TS_00", SHAPE, 10.0))],
                               "combined")
    _, both = star_columns(mixed)
    assert "tomoliveCompartment" not in both and len(both["rlnCoordinateX"]) == 3
