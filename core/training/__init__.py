"""Training a model bundle from sparse labels, and distilling single-feature models into one.

The package follows training's own seams; the data flow is in loop.py's docstring:

    options     what training takes and gives (sources, options, progress, the result)
    data        each source on the model grid by the same core code as inference; the split
    sampling    class-balanced 2.5D patches and their augmentation
    loss        cross-entropy (unannotated voxels ignored) + soft Dice
    validation  scoring on the validation strips through core.infer.predict (the serving path)
    loop        the optimisation loop and the bundle's metadata
    distill     single-feature models -> pseudo-labels -> one joint model
"""

from .data import (
    MIN_EXAMPLES_PER_CLASS,
    Part,
    annotation_counts,
    prepare_source,
    sparse_class_warnings,
    split_region,
)
from .distill import distill
from .loop import train
from .loss import masked_loss
from .options import (
    IGNORE,
    ProgressFn,
    TrainedModel,
    TrainingSource,
    TrainOptions,
    TrainProgress,
    class_specs_for,
    format_region,
    load_class_overrides,
    parse_option,
    parse_region,
)
from .sampling import Sampler, random_spectrum, rotate_patch, void_beyond_surface, z_edge_indices
from .validation import calibrate_batchnorm, validation_dice

__all__ = [
    "IGNORE", "MIN_EXAMPLES_PER_CLASS", "Part", "ProgressFn", "Sampler", "TrainOptions",
    "TrainProgress", "TrainedModel", "TrainingSource", "annotation_counts", "calibrate_batchnorm",
    "class_specs_for", "distill", "format_region", "load_class_overrides", "masked_loss",
    "parse_option", "parse_region", "prepare_source", "random_spectrum", "rotate_patch",
    "sparse_class_warnings", "split_region", "train", "validation_dice", "void_beyond_surface",
    "z_edge_indices",
]
