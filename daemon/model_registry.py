"""The model registry: discover bundles in the models folder, validate them, pick the serving one.

As serving systems do, a new bundle is loaded beside the old one and validated (settled on
disk, loads without unpickling, metadata and tensors consistent, a smoke inference gives finite
output) before it is switched in; a bundle that fails stays rejected until the file changes,
and the current model keeps serving. A validated bundle is copied into a private cache named by
its sha256, so the file a worker loads can neither be half-copied nor change under it.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import one_line
from ..core.volume import DEFAULT_VOXEL_SIZE_BOUNDS_A

log = logging.getLogger("tomolive.models")

BUNDLE_SUFFIX = ".safetensors"
SMOKE_PATCH_PX = 128  # the validation inference's in-plane size (a fraction of a second on CPU)


@dataclass(frozen=True)
class ServingModel:
    """The model workers use: a validated, immutable copy of a bundle."""

    name: str
    version: int
    sha256: str
    source: Path  # where it came from (models folder or the shipped default)
    cached_path: Path  # what workers load
    mtime_ns: int
    classes: tuple[str, ...] = ()

    def label(self) -> str:
        return f"{self.name} v{self.version} ({self.sha256[:12]})"


def smoke_test(bundle: Any) -> None:
    """Run the bundle's network on a small random stack on the CPU: output must be finite."""
    import torch

    network = bundle.build("cpu")
    arch = bundle.meta.architecture
    # A patch of the size inference uses, not the smallest the network accepts: a bundle
    # that only fails at real sizes (memory, shapes) must fail here, not on every tomogram.
    multiple = network.size_multiple
    side = max(SMOKE_PATCH_PX // multiple, 2) * multiple
    stack = torch.from_numpy(
        np.random.default_rng(0).standard_normal((1, int(arch["in_slices"]), side, side))
        .astype(np.float32))
    with torch.inference_mode():
        output = network(stack)
    if output.shape[1] != len(bundle.classes) + 1 or not torch.isfinite(output).all():
        raise ValueError(f"{bundle.path}: smoke inference gave non-finite or misshaped output")


class ModelRegistry:
    """Tracks the models folder; `poll()` returns a new ServingModel when the choice changes."""

    def __init__(self, models_dir: Path, cache_dir: Path, policy: str = "newest",
                 settle_s: float = 2.0, default_bundle: Path | None = None,
                 on_rejected: Any = None,
                 voxel_size_bounds_a: tuple[float, float] = DEFAULT_VOXEL_SIZE_BOUNDS_A,
                 truncated_after_s: float = 120.0) -> None:
        self.models_dir = Path(models_dir)
        self.cache_dir = Path(cache_dir)
        self.policy = policy
        self.settle_s = settle_s
        self.default_bundle = default_bundle
        self.on_rejected = on_rejected  # callback(path, reason) for metrics
        self.voxel_size_bounds_a = tuple(voxel_size_bounds_a)  # a bundle outside is rejected
        self.truncated_after_s = truncated_after_s  # an incomplete bundle unchanged this long
        self.current: ServingModel | None = None
        self._seen: dict[Path, tuple[int, int, float]] = {}  # path -> (size, mtime, since)
        self._valid: dict[Path, ServingModel] = {}
        self._rejected: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime) when rejected
        # Bundles shorter than their header says (a slow copy): waited for, never rejected.
        self._incomplete: dict[Path, tuple[int, int]] = {}
        self._warned_pinned = False

    def poll(self) -> ServingModel | None:
        """Look at the folder; return the new serving model if it changed, else None."""
        self._scan()
        chosen = self._choose()
        if chosen is None and self.current is None:
            chosen = self._default()
        if chosen is not None and (self.current is None or chosen.sha256 != self.current.sha256):
            self.current = chosen
            return chosen
        return None

    def has_alternative(self, model: ServingModel) -> bool:
        """Is there another valid bundle (or the shipped default) to fall back to?"""
        others = [m for m in self._valid.values() if m.sha256 != model.sha256]
        default_ok = (self.default_bundle is not None and self.default_bundle.exists()
                      and model.source != self.default_bundle)
        return bool(others) or default_ok

    def take_out_of_service(self, model: ServingModel, reason: str) -> None:
        """Stop choosing `model`'s file (until it changes): the next poll() picks the best
        remaining bundle, or the shipped default."""
        try:
            stat = model.source.stat()
            self._rejected[model.source] = (stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            pass
        self._valid.pop(model.source, None)
        if self.current is not None and self.current.sha256 == model.sha256:
            self.current = None
        log.error("model %s taken out of service: %s", model.label(), reason)
        if self.on_rejected:
            self.on_rejected(model.source, reason)

    def prune_cache(self, in_use: set[str]) -> int:
        """Delete cached copies that nothing can load again: not serving, not a valid
        candidate, not named by a job in flight (`in_use`, sha256s). Returns how many."""
        keep = set(in_use) | {m.sha256 for m in self._valid.values()}
        if self.current is not None:
            keep.add(self.current.sha256)
        removed = 0
        for path in self.cache_dir.glob(f"*{BUNDLE_SUFFIX}") if self.cache_dir.is_dir() else []:
            if path.name.startswith(".") or path.stem in keep:
                continue  # a copy being validated, or still wanted
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def _default(self) -> ServingModel | None:
        """The shipped default model, validated once (and again only if the file changes)."""
        if self.default_bundle is None or not self.default_bundle.exists():
            return None
        stat = self.default_bundle.stat()
        if self._rejected.get(self.default_bundle) == (stat.st_size, stat.st_mtime_ns):
            return None
        return self._validate(self.default_bundle, stat)

    def _scan(self) -> None:
        now = time.monotonic()
        present = set()
        paths = sorted(self.models_dir.glob(f"*{BUNDLE_SUFFIX}")) if self.models_dir.is_dir() \
            else []
        for path in paths:
            if path.name.startswith("."):
                continue  # a copy in progress under a hidden temporary name
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            present.add(path)
            key = (stat.st_size, stat.st_mtime_ns)
            seen = self._seen.get(path)
            if seen is None or seen[:2] != key:
                self._valid.pop(path, None)
                # Untouched for the settle time already (found at start-up): settled.
                untouched_s = time.time() - stat.st_mtime_ns / 1e9
                since = now - self.settle_s if untouched_s >= self.settle_s else now
                seen = self._seen[path] = (*key, since)
            if self._incomplete.get(path) == key and now - seen[2] >= self.truncated_after_s:
                self._reject(path, stat, "truncated: shorter than its header says and "
                             f"unchanged for {now - seen[2]:.0f} s")
                continue
            if now - seen[2] < self.settle_s or path in self._valid \
                    or key in (self._rejected.get(path), self._incomplete.get(path)):
                continue
            model = self._validate(path, stat)
            if model is not None:
                self._valid[path] = model
        for gone in set(self._seen) - present:
            self._seen.pop(gone, None)
            self._valid.pop(gone, None)
            self._rejected.pop(gone, None)
            self._incomplete.pop(gone, None)

    def _validate(self, path: Path, stat: Any) -> ServingModel | None:
        from ..core.model import TruncatedBundle, load_bundle

        cached = None
        try:
            cached = self._copy_to_cache(path)
            bundle = load_bundle(cached, self.voxel_size_bounds_a)
            smoke_test(bundle)
        except TruncatedBundle as error:  # a copy paused longer than the settle time
            self._incomplete[path] = (stat.st_size, stat.st_mtime_ns)
            log.info("model %s incomplete (%s); waiting for the rest", path,
                     str(error).removeprefix(f"{cached}: "))
            cached.unlink(missing_ok=True)
            return None
        except Exception as error:  # any failure means: not this file, keep serving
            if cached is not None:
                cached.unlink(missing_ok=True)
            self._reject(path, stat, one_line(error))
            return None
        final = self.cache_dir / f"{bundle.sha256}{BUNDLE_SUFFIX}"
        cached.replace(final)
        log.info("model %s valid: %s v%s", path.name, bundle.meta.name, bundle.meta.version)
        return ServingModel(bundle.meta.name, int(bundle.meta.version), bundle.sha256,
                            path, final, stat.st_mtime_ns,
                            tuple(spec.name for spec in bundle.classes))

    def _reject(self, path: Path, stat: Any, reason: str) -> None:
        self._rejected[path] = (stat.st_size, stat.st_mtime_ns)
        self._incomplete.pop(path, None)
        log.warning("model %s rejected: %s", path, reason)
        if self.on_rejected:
            self.on_rejected(path, reason)

    def _copy_to_cache(self, path: Path) -> Path:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        target = self.cache_dir / f".incoming-{time.monotonic_ns()}{BUNDLE_SUFFIX}"
        shutil.copyfile(path, target)
        return target

    def _choose(self) -> ServingModel | None:
        if self.policy != "newest":
            pinned = [m for p, m in self._valid.items() if p.name == self.policy]
            if not pinned and not self._warned_pinned:
                self._warned_pinned = True
                log.warning("pinned model %s is not a valid bundle in %s; keeping the current "
                            "model", self.policy, self.models_dir)
            return pinned[0] if pinned else None
        if not self._valid:
            return None
        return max(self._valid.values(), key=lambda m: (m.mtime_ns, m.version))
