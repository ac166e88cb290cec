"""Distillation: several single-feature models -> complete labels -> one joint model (Pom).

Each single model (one class versus background; a model with several classes contributes all
of them) is run over every tomogram exactly as inference runs it (its own voxel size and
preprocessing recipe, `core.infer.predict`, then `core.cleanup.clean_labels` with its own
class rules). Its labels are mapped back to the tomogram's grid as the pipeline maps them
(`resample.labels_to_input_refined`: boundaries placed by the confidence), its confidence by
nearest neighbour. The per-model results are combined voxel by voxel into one label volume
with the joint class order (the models' classes, in the order the models are given):

Combination rule, where single models disagree:
  1. A voxel that no model labels as its class is background (0).
  2. A voxel that one model labels is that model's class.
  3. A voxel that several models claim goes to the class with the highest
     `ClassSpec.priority` (gold fiducials 10 > ribosome 3 > filaments 2 > membrane 1: the
     smaller, denser object sits inside or on top of the larger one); equal priorities go to
     the higher confidence (max softmax probability), and exact ties to the model given first.
  4. Annotations, where given, override all of the above: every voxel of an annotation volume
     that is not 255 (not annotated) keeps its annotated value (0 = background, i = the i-th
     joint class).
The joint model is then trained on the complete labels with `core.training.train` (whole
tomograms, the usual validation strip), so it learns what the single models agree on.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..classes import ClassSpec
from ..cleanup import clean_labels
from ..infer import InferenceOptions, predict, prepare_network
from ..model import ModelBundle
from ..preprocess import apply_recipe
from ..resample import fourier_rescale, grid_for, labels_to_input, labels_to_input_refined
from ..volume import Volume, read_mrc, thin_axis, to_canonical, write_mrc
from .loop import train
from .options import IGNORE, ProgressFn, TrainedModel, TrainingSource, TrainOptions

COMBINATION_RULE = (
    "background where no model claims a voxel; one claim -> that class; several -> highest "
    "class priority, then higher confidence, then the model given first; annotations (not 255) "
    "override"
)


def joint_classes(single_models: Sequence[ModelBundle]) -> list[ClassSpec]:
    """The joint model's classes: every single model's classes, in the order given."""
    classes: list[ClassSpec] = []
    owners: dict[str, Path] = {}
    for bundle in single_models:
        for spec in bundle.meta.classes:
            if spec.name in owners:
                raise ValueError(
                    f"{bundle.path}: class {spec.name!r} is also predicted by "
                    f"{owners[spec.name]} (give one model per class)"
                )
            owners[spec.name] = bundle.path
            classes.append(spec)
    if not classes:
        raise ValueError("distillation needs at least one single-feature model")
    return classes


def single_model_labels(
    bundle: ModelBundle, volume: Volume, device: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """One model on one tomogram, as the pipeline runs it: (labels int8, confidence uint8),
    both on the tomogram's CANONICAL input grid (beam axis first)."""
    meta = bundle.meta
    canonical = to_canonical(volume.data, thin_axis(volume.shape))
    grid = grid_for(canonical.shape, volume.voxel_size_a, meta.voxel_size_a)
    network = prepare_network(bundle, device)
    device_name = str(next(network.parameters()).device)
    data = fourier_rescale(canonical, grid, device=device_name)
    data = apply_recipe(data, meta.voxel_size_a, meta.preprocess, device=device_name)
    prediction = predict(network, data, meta.in_slices, InferenceOptions(device=device_name),
                         z_edge=meta.z_edge)
    del data
    labels = clean_labels(prediction.labels, bundle.classes, meta.voxel_size_a)
    return (labels_to_input_refined(labels, prediction.confidence, grid),
            labels_to_input(prediction.confidence, grid))


def combine_labels(
    results: Sequence[tuple[np.ndarray, np.ndarray]],
    model_classes: Sequence[Sequence[ClassSpec]],
    joint: Sequence[ClassSpec],
    annotations: np.ndarray | None = None,
) -> np.ndarray:
    """Apply the module's combination rule. `results[m]` = (labels, confidence) of model m,
    whose label value j is model_classes[m][j - 1]; returns int8 labels in the joint order.
    `annotations` (uint8 or int8, joint order, 255 or -1 = not annotated) override."""
    joint_index = {spec.name: i + 1 for i, spec in enumerate(joint)}
    shape = results[0][0].shape
    out = np.zeros(shape, dtype=np.int8)
    best_priority = np.full(shape, np.iinfo(np.int32).min, dtype=np.int32)
    best_conf = np.zeros(shape, dtype=np.int16)
    for (labels, confidence), classes in zip(results, model_classes, strict=True):
        for j, spec in enumerate(classes, start=1):
            claim = labels == j
            conf = confidence.astype(np.int16)
            # Strictly better only: on exact ties the model given first keeps the voxel.
            wins = claim & ((spec.priority > best_priority) |
                            ((spec.priority == best_priority) & (conf > best_conf)))
            out[wins] = joint_index[spec.name]
            best_priority[wins] = spec.priority
            best_conf[wins] = conf[wins]
    if annotations is not None:
        values = annotations.astype(np.int16)
        values[values == -1] = IGNORE
        annotated = values != IGNORE
        out[annotated] = values[annotated].astype(np.int8)
    return out


def distill(
    single_models: Sequence[ModelBundle],
    tomogram_paths: Sequence[str | Path],
    options: TrainOptions,
    annotations: Sequence[str | Path | None] | None = None,
    progress: ProgressFn | None = None,
    warn: Callable[[str], None] | None = None,
) -> TrainedModel:
    """Run every single model on every tomogram, combine (module docstring rule), train one
    joint model with `core.training.train`. `annotations[i]` is an optional label volume for
    tomogram i in the joint class order (255 = not annotated). The joint model's voxel size is
    options.model_voxel_size_a or the first single model's; its recipe options.recipe or the
    default. `warn` gets train's warnings (classes the combined labels hold too few of)."""
    single_models = list(single_models)
    joint = joint_classes(single_models)
    paths = [Path(p) for p in tomogram_paths]
    if not paths:
        raise ValueError("distillation needs at least one tomogram")
    annotations = list(annotations) if annotations is not None else [None] * len(paths)
    if len(annotations) != len(paths):
        raise ValueError(f"{len(annotations)} annotation volumes for {len(paths)} tomograms")
    options = dataclasses.replace(
        options,
        model_voxel_size_a=options.model_voxel_size_a or single_models[0].meta.voxel_size_a,
    )
    with tempfile.TemporaryDirectory(prefix="tomolive-distill-") as tmp:
        sources = []
        for i, path in enumerate(paths):
            labels_path = Path(tmp) / f"{i:04d}_{path.stem}_labels.mrc"
            _write_combined(path, annotations[i], single_models, joint, options.device,
                            labels_path)
            sources.append(TrainingSource(path, labels_path))
        trained = train(sources, joint, options, progress=progress, warn=warn)
    for record, annotation in zip(trained.meta.training["sources"], annotations, strict=True):
        record["labels"] = f"distilled ({'+ ' + str(annotation) if annotation else 'models'})"
    trained.meta.training["distilled_from"] = [
        {"model": b.meta.ref, "sha256": b.sha256, "classes": [c.name for c in b.classes]}
        for b in single_models
    ]
    trained.meta.training["combination_rule"] = COMBINATION_RULE
    return trained


def _write_combined(
    path: Path, annotation: str | Path | None, single_models: list[ModelBundle],
    joint: list[ClassSpec], device: str, out_path: Path,
) -> None:
    """Combined labels of one tomogram, written on its own (file-order) grid as int8 MRC."""
    volume = read_mrc(path)
    beam_axis = thin_axis(volume.shape)
    results = [single_model_labels(b, volume, device) for b in single_models]
    extra = None
    if annotation is not None:
        ann = read_mrc(annotation, voxel_size_a=volume.voxel_size_a, check_finite=False)
        if ann.shape != volume.shape:
            raise ValueError(
                f"{annotation}: annotation shape {ann.shape} does not match the tomogram "
                f"{path} {volume.shape}"
            )
        extra = np.asarray(to_canonical(ann.data, beam_axis))
    combined = combine_labels(results, [b.classes for b in single_models], joint, extra)
    # Back to the file's axis order: training reads labels on the tomogram's own grid.
    write_mrc(out_path, np.ascontiguousarray(to_canonical(combined, beam_axis)),
              volume.voxel_size_a, volume.origin_xyz_a)
