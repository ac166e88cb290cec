"""The daemon's YAML configuration: a validated schema with a default for every setting.

Unknown keys and wrong types are rejected; every problem is reported on its own line with the
key's path (`config.yaml: watch.0.settle_seconds: unknown key`). Relative paths are resolved
against the folder of the configuration file (or the current folder when there is none).
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..core.star import WARP_RECONSTRUCTION_NAME, check_name_pattern
from ..core.volume import DEFAULT_MAX_MODEL_VOXELS, DEFAULT_VOXEL_SIZE_BOUNDS_A

DEFAULT_PATTERNS = ["*.mrc", "*.rec"]


@functools.lru_cache(maxsize=64)
def patterns_regex(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """A watched folder's file patterns as one case-insensitive regex (`TS_01.MRC` matches
    `*.mrc`): the one place that says which names the patterns pick up. One regex, not
    fnmatch pattern by pattern: a full rescan of 100,000 files spent half its time there."""
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns),
                      re.IGNORECASE)
DEFAULT_METRICS_PORT = 9847


class ConfigError(ValueError):
    """The configuration cannot be used; the message has one line per problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class WatchFolder(_Strict):
    """One watched folder."""

    path: Path
    patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_PATTERNS), min_length=1)
    recursive: bool = Field(True, strict=True)
    # Headers lie (0 Å, 1 Å): a per-folder override of the voxel size in Ångström.
    voxel_size_a: float | None = Field(None, gt=0)


class MetricsConfig(_Strict):
    enabled: bool = Field(True, strict=True)
    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_METRICS_PORT, ge=0, le=65535, strict=True)  # 0: any free port


class InferenceConfig(_Strict):
    batch_size: int = Field(4, ge=1, strict=True)  # slices per forward pass
    tile_size_px: int | None = Field(None, ge=32, strict=True)  # None: whole slices if they fit
    tta_flips: bool = Field(False, strict=True)  # flip test-time augmentation (slower)
    # auto: bfloat16 where the CPU or GPU does it natively (2x faster on AVX512-BF16 CPUs),
    # float32: always exact float32 (core.infer.InferenceOptions.precision)
    precision: Literal["auto", "float32", "bfloat16"] = "auto"


class Config(_Strict):
    """Everything `tomolive run` reads; see config.example.yaml for the meaning of each key."""

    watch: list[WatchFolder] = Field(
        default_factory=lambda: [WatchFolder(path=Path("incoming"))], min_length=1
    )
    output_dir: Path = Path("outputs")
    models_dir: Path = Path("models")
    model: str = "newest"
    devices: Literal["auto", "cpu"] | list[int] = "auto"
    # Two worker processes per GPU: while one reads, rescales, cleans up and writes (CPU), the
    # other keeps the GPU busy with inference. On the CPU one worker uses every core.
    workers_per_gpu: int = Field(2, ge=1, le=8, strict=True)
    cpu_workers: int = Field(1, ge=1, le=64, strict=True)
    discovery: Literal["auto", "events", "polling"] = "auto"
    settle_seconds: float = Field(10.0, ge=0)
    rescan_interval_seconds: float = Field(30.0, gt=0)
    # Rescans between full ones list only the folders whose mtime changed (daemon/watcher.py);
    # a full one, this often, also sees a finished file rewritten in place on a network share.
    full_rescan_interval_seconds: float = Field(300.0, gt=0)
    # The longest one turn of the main loop spends checking newly found files (the rest wait
    # for the next turns): a huge backlog must not starve heartbeats and the watchdog.
    discovery_batch_seconds: float = Field(1.0, ge=0)
    truncated_after_seconds: float = Field(120.0, ge=0)
    order: Literal["newest_first", "oldest_first"] = "newest_first"
    max_attempts: int = Field(3, ge=1, strict=True)
    resegment_on_model_change: bool = Field(False, strict=True)
    lease_seconds: float = Field(120.0, gt=0)
    heartbeat_interval_seconds: float | None = Field(None, gt=0)  # None: lease_seconds / 4
    shutdown_grace_seconds: float = Field(60.0, ge=0)
    # A worker that reports no progress from inside the pipeline for this long (stopped, hung
    # on a dead mount, deadlocked) is killed and replaced; its tomogram is retried elsewhere
    # and the fault is not counted against it. Far above the longest silent step (reading a
    # large file, the first model load on a GPU).
    worker_stall_seconds: float = Field(600.0, gt=0)
    # A new model whose first this-many tomograms all fail (their own fault, as far as the
    # error says) is taken out of service: the previous model serves again and those
    # tomograms are retried without the attempts the bad model cost them.
    model_failure_limit: int = Field(3, ge=1, strict=True)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    # Plausible voxel sizes (Å) of tomograms (header or override) and of model bundles.
    voxel_size_bounds_a: tuple[float, float] = DEFAULT_VOXEL_SIZE_BOUNDS_A
    # Largest model grid a tomogram may need (voxels; float32 is 4 bytes each).
    max_model_voxels: int = Field(DEFAULT_MAX_MODEL_VOXELS, ge=1, strict=True)
    # How STAR files name each tomogram's tilt series (rlnTomoName, rlnMicrographName =
    # NAME.tomostar): the group `name` of this regular expression matched against the input
    # file's stem, or the stem when it does not match; null: always the stem. The default takes
    # Warp's reconstruction names apart (TS_01_10.00Apx -> TS_01).
    tilt_series_name_pattern: str | None = WARP_RECONSTRUCTION_NAME
    # Every class's probability map beside the labels (STEM_<class>_prob.mrc, one byte per
    # voxel and class), for soft-map viewing and `tomolive repick` without the network.
    save_probabilities: bool = Field(False, strict=True)
    # Clear what the network finds outside the specimen slab (core.specimen_mask; gold is
    # kept) and write STEM_specimen_mask.mrc: for lamellae with a void above and below. Off:
    # the slab is still measured and recorded.
    specimen_mask: bool = Field(False, strict=True)

    @field_validator("tilt_series_name_pattern")
    @classmethod
    def _check_name_pattern(cls, value: str | None) -> str | None:
        return None if value is None else check_name_pattern(value)

    @field_validator("devices", mode="before")
    @classmethod
    def _check_devices(cls, value: Any) -> Any:
        # One clear message instead of pydantic's per-union-member noise.
        ok_list = isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
        )
        if value in ("auto", "cpu") or (ok_list and value and len(set(value)) == len(value)):
            return value
        raise ValueError("must be 'auto', 'cpu' or a list of distinct GPU ids such as [0, 1]")

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        if not value or "/" in value or "\\" in value or value in (".", ".."):
            raise ValueError("must be 'newest' or a file name inside models_dir")
        return value

    @field_validator("voxel_size_bounds_a")
    @classmethod
    def _check_voxel_bounds(cls, value: tuple[float, float]) -> tuple[float, float]:
        low_a, high_a = value
        if not 0 < low_a < high_a:
            raise ValueError(
                f"must be [low, high] with 0 < low < high, not [{low_a:g}, {high_a:g}]"
            )
        return value

    @model_validator(mode="after")
    def _check_overrides_within_bounds(self) -> Config:
        # An override outside the bounds would fail every tomogram of its folder: say so now.
        low_a, high_a = self.voxel_size_bounds_a
        for index, folder in enumerate(self.watch):
            vs = folder.voxel_size_a
            if vs is not None and not low_a <= vs <= high_a:
                raise ValueError(
                    f"watch.{index}.voxel_size_a {vs:g} Å is outside voxel_size_bounds_a "
                    f"[{low_a:g}, {high_a:g}]"
                )
        return self

    @model_validator(mode="after")
    def _check_heartbeat(self) -> Config:
        if self.heartbeat_interval_seconds is None:
            self.heartbeat_interval_seconds = self.lease_seconds / 4
        elif self.heartbeat_interval_seconds >= self.lease_seconds:
            raise ValueError(
                f"heartbeat_interval_seconds ({self.heartbeat_interval_seconds:g}) must be "
                f"shorter than lease_seconds ({self.lease_seconds:g})"
            )
        return self

    def resolved(self, base_dir: Path) -> Config:
        """A copy with every path absolute (relative ones taken from `base_dir`)."""

        def fix(path: Path) -> Path:
            path = path.expanduser()
            return Path(os.path.normpath(path if path.is_absolute() else base_dir / path))

        copy = self.model_copy(deep=True)
        copy.output_dir = fix(copy.output_dir)
        copy.models_dir = fix(copy.models_dir)
        for folder in copy.watch:
            folder.path = fix(folder.path)
        return copy


def _format_errors(source: str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif message.startswith("Value error, "):
            message = message[len("Value error, "):]
        lines.append(f"{source}: {where}: {message}")
    return "\n".join(lines)


def parse_config(data: Any, base_dir: Path, source: str = "config") -> Config:
    """Validate an already-parsed mapping; `source` prefixes every error line."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping of settings, not {type(data).__name__}")
    try:
        config = Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(source, error)) from None
    return config.resolved(Path(base_dir).absolute())


def load_config(path: str | os.PathLike[str] | None = None, base_dir: Path | None = None) -> Config:
    """Load and validate a YAML file; None gives the defaults.

    Relative paths resolve against the file's folder, or `base_dir` (default: the current
    folder) when there is no file.
    """
    if path is None:
        return parse_config({}, Path(base_dir) if base_dir is not None else Path.cwd(), "defaults")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(error, "problem", None) or "syntax error"
        raise ConfigError(f"{path}: invalid YAML{at}: {problem}") from None
    return parse_config(data, path.absolute().parent, str(path))


def model_fields_tree(model: type[BaseModel] = Config) -> dict[str, Any]:
    """The schema's key names as a nested dict (None for leaves), for docs and tests."""
    tree: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            tree[name] = model_fields_tree(annotation)
        elif name == "watch":
            tree[name] = model_fields_tree(WatchFolder)
        else:
            tree[name] = None
    return tree
