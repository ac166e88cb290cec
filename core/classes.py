"""Segmentation classes: what each class is and how it is cleaned up and extracted.

A model bundle stores its classes in output order (index 0 is always background and is not
listed). Known names get sensible defaults so that `tomolive train --classes membrane,ribosome`
needs nothing more; every field can be overridden (YAML in training, JSON in the bundle).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

KINDS = ("membrane", "filament", "particle", "fiducial", "other")


@dataclass(frozen=True)
class ClassSpec:
    """One output class of a model. Sizes are physical (nm) so they survive rescaling."""

    name: str
    kind: str = "other"
    color: str = "#ffffff"  # display colour, "#rrggbb"
    # Cleanup (core.cleanup): components smaller than this are removed; holes smaller are filled.
    min_component_nm3: float = 0.0
    fill_holes_nm3: float = 0.0
    opening_radius_nm: float = 0.0
    # Gaps along the beam axis (z) shorter than this between two voxels of the class in the
    # same (y, x) column are filled. For a tube labelled with its lumen (a microtubule), a
    # 2.5D network often finds the top and bottom walls but misses the slices between them,
    # where the walls run parallel to the beam and look like two membranes; along z the tube
    # is never thicker than its diameter, so such a gap is inside it.
    close_z_nm: float = 0.0
    # Pieces of the class closer than this are sized together by the minimum-component rule:
    # a thin class predicted in fragments (gaps where a microtubule's walls run along the beam,
    # or where actin leaves the slice) is then kept whole instead of erased piece by piece.
    join_gap_nm: float = 0.0
    # Higher priority wins where classes compete (gold fiducials over whatever surrounds them).
    priority: int = 0
    # Particles and fiducials (core.particles).
    diameter_nm: float | None = None
    # Filaments (core.filaments).
    min_length_nm: float | None = None
    point_spacing_nm: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"class name {self.name!r} must be letters, digits, '_' or '-'")
        if self.kind not in KINDS:
            raise ValueError(f"class {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.kind in ("particle", "fiducial") and not self.diameter_nm:
            raise ValueError(f"class {self.name!r}: a {self.kind} class needs diameter_nm")

    @property
    def is_particle(self) -> bool:
        return self.kind in ("particle", "fiducial")

    @property
    def is_filament(self) -> bool:
        return self.kind == "filament"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClassSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"class {data.get('name')!r}: unknown fields {sorted(unknown)}")
        return cls(**data)


# Defaults for the features facilities segment most. Sizes follow the published protocol and
# the synthetic generator (core.synth): ribosome ~25 nm, gold ~10 nm, microtubule 25 nm tubes,
# actin 7 nm filaments, membranes 4-5 nm bilayers.
KNOWN_CLASSES: dict[str, ClassSpec] = {
    spec.name: spec
    for spec in (
        ClassSpec("membrane", "membrane", "#f4c542", min_component_nm3=2000.0,
                  fill_holes_nm3=50.0, join_gap_nm=5.0, priority=1),
        ClassSpec("microtubule", "filament", "#3cb44b", min_component_nm3=3000.0,
                  fill_holes_nm3=200.0, close_z_nm=25.0, join_gap_nm=12.0, priority=2,
                  min_length_nm=50.0, point_spacing_nm=8.0),
        ClassSpec("actin", "filament", "#e6194b", min_component_nm3=300.0, join_gap_nm=8.0,
                  priority=2, min_length_nm=40.0, point_spacing_nm=5.0),
        ClassSpec("ribosome", "particle", "#4363d8", min_component_nm3=800.0,
                  fill_holes_nm3=200.0, priority=3, diameter_nm=25.0),
        ClassSpec("gold", "fiducial", "#ffe119", min_component_nm3=100.0, fill_holes_nm3=50.0,
                  priority=10, diameter_nm=10.0),
    )
}

# The order in which core.synth paints classes into its label volume (index = position + 1).
SYNTH_CLASS_NAMES: tuple[str, ...] = ("membrane", "microtubule", "actin", "ribosome", "gold")


def default_class(name: str, **overrides: Any) -> ClassSpec:
    """The spec for `name`: the known defaults (or a plain 'other' class), with overrides."""
    base = KNOWN_CLASSES.get(name)
    if base is None:
        return ClassSpec(name=name, **overrides)
    return replace(base, **overrides) if overrides else base
