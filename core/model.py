"""The multi-slice (2.5D) U-Net and the model bundle: one `.safetensors` file.

A bundle holds the weights (float32, exactly as trained) and a JSON document under the
safetensors metadata key "tomolive" (`BundleMeta`). Loading never unpickles: the file is parsed
with the safetensors format only, and every field and tensor is checked against the architecture
before anything is built, so a half-copied or mismatched file from a drop folder is rejected with
one line that starts with its path. Bundles saved by this version also record `weights_sha256`,
a checksum of the tensors verified at load (older bundles without it still load).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .atomic import atomic_path
from .classes import ClassSpec
from .errors import one_line
from .preprocess import validate_recipe
from .volume import DEFAULT_VOXEL_SIZE_BOUNDS_A, check_voxel_size

FORMAT_VERSION = 1
METADATA_KEY = "tomolive"
ARCH_NAME = "unet25d"
_ARCH_INT_KEYS = ("in_slices", "base_width", "levels", "n_classes")
# What stands in for the slices beyond a volume's top and bottom in a network's input
# (core.infer.edge_indices). A bundle without the field was trained with "clamp".
Z_EDGE_MODES = ("clamp", "reflect")


def check_z_edge(z_edge: str) -> str:
    """`z_edge` if it is one of Z_EDGE_MODES; raises ValueError naming it otherwise."""
    if z_edge not in Z_EDGE_MODES:
        raise ValueError(f"z_edge must be one of {', '.join(Z_EDGE_MODES)}, not {z_edge!r}")
    return z_edge
# A safetensors header larger than this is not a model bundle (ours are a few kB).
_MAX_HEADER_BYTES = 16 * 1024 * 1024


class BundleError(ValueError):
    """A model bundle that cannot be used; the message is one line starting with the path."""


class TruncatedBundle(BundleError):
    """Shorter than its own header says: most often a copy still in progress."""


class _Truncated(ValueError):
    pass


# --------------------------------------------------------------------------------------------
# The network


class ConvBlock(nn.Sequential):
    """Two 3x3 conv + BatchNorm + ReLU. Convs have no bias: the BatchNorm shift replaces it."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class UNet25D(nn.Module):
    """2.5D U-Net: K adjacent z-slices [B, K, H, W] in, logits [B, C, H, W] for the centre slice.

    C counts background (index 0). Level i has base_width * 2**i channels; there are `levels`
    resolution levels (levels - 1 max-pool downsamplings, 2x2 stride-2 transposed-conv upsampling,
    skip concatenation). H and W must be multiples of `size_multiple` (core.infer pads).
    """

    def __init__(
        self, in_slices: int = 5, n_classes: int = 6, base_width: int = 16, levels: int = 5
    ) -> None:
        super().__init__()
        check_architecture(
            {"name": ARCH_NAME, "in_slices": in_slices, "n_classes": n_classes,
             "base_width": base_width, "levels": levels}
        )
        self.arch = architecture_dict(in_slices, n_classes, base_width, levels)
        widths = [base_width * 2**i for i in range(levels)]
        self.down = nn.ModuleList(
            ConvBlock(in_slices if i == 0 else widths[i - 1], widths[i]) for i in range(levels)
        )
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(levels - 1)
        )
        self.dec = nn.ModuleList(ConvBlock(2 * widths[i], widths[i]) for i in range(levels - 1))
        self.head = nn.Conv2d(widths[0], n_classes, 1)

    @property
    def size_multiple(self) -> int:
        """H and W of the input must be multiples of this."""
        return 2 ** (self.arch["levels"] - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(len(self.up))):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        return self.head(x)


def architecture_dict(
    in_slices: int = 5, n_classes: int = 6, base_width: int = 16, levels: int = 5
) -> dict[str, Any]:
    """The `architecture` entry of a bundle for these hyperparameters."""
    return {"name": ARCH_NAME, "in_slices": in_slices, "base_width": base_width,
            "levels": levels, "n_classes": n_classes}


def check_architecture(arch: Any) -> dict[str, Any]:
    """Validate an architecture dict; returns it. Raises ValueError naming the problem."""
    if not isinstance(arch, dict):
        raise ValueError(f"architecture must be an object, not {type(arch).__name__}")
    if arch.get("name") != ARCH_NAME:
        raise ValueError(f"architecture name {arch.get('name')!r} is not {ARCH_NAME!r}")
    unknown = set(arch) - {"name", *_ARCH_INT_KEYS}
    if unknown:
        raise ValueError(f"architecture has unknown keys {sorted(unknown)}")
    for key in _ARCH_INT_KEYS:
        value = arch.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"architecture.{key} must be an integer, not {value!r}")
    limits = {"in_slices": (1, 63), "base_width": (1, 512), "levels": (1, 8), "n_classes": (2, 127)}
    for key, (low, high) in limits.items():
        if not low <= arch[key] <= high:
            raise ValueError(f"architecture.{key} = {arch[key]} is outside {low}..{high}")
    if arch["in_slices"] % 2 == 0:
        raise ValueError(
            f"architecture.in_slices = {arch['in_slices']} must be odd (a centre slice)"
        )
    return arch


def build_network(arch: dict[str, Any], device: str | torch.device = "cpu") -> UNet25D:
    """A fresh (randomly initialised) network for an architecture dict."""
    check_architecture(arch)
    with torch.device(device):
        return UNet25D(arch["in_slices"], arch["n_classes"], arch["base_width"], arch["levels"])


def fuse_for_inference(network: nn.Module) -> nn.Module:
    """An eval-mode copy of `network` with every BatchNorm folded into the conv before it.

    The input network is not modified. Fused networks have a different state_dict (conv biases,
    no BatchNorm) and are for inference only: save bundles from the unfused network.
    """
    fused = copy.deepcopy(network).eval()
    for module in fused.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name_a, conv), (name_b, bn) in zip(children, children[1:], strict=False):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, name_a, torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn))
                setattr(module, name_b, nn.Identity())
    return fused


def flops_per_voxel(arch: dict[str, Any]) -> float:
    """Floating-point operations (2 x multiply-adds) of convolutions per output voxel.

    Counted analytically: level i runs on 4**-i of the output pixels. BatchNorm, ReLU,
    pooling and softmax are not counted (they are a few operations per activation).
    """
    check_architecture(arch)
    k, c, w0, levels = arch["in_slices"], arch["n_classes"], arch["base_width"], arch["levels"]
    widths = [w0 * 2**i for i in range(levels)]
    macs = 0.0
    for i, w in enumerate(widths):
        c_in = k if i == 0 else widths[i - 1]
        level = 9 * c_in * w + 9 * w * w  # encoder block
        if i < levels - 1:
            # transposed conv (one 2x2 tap per output pixel) + decoder block on the concatenation
            level += widths[i + 1] * w + 9 * 2 * w * w + 9 * w * w
        macs += level / 4**i
    macs += w0 * c  # 1x1 head
    return 2.0 * macs


# --------------------------------------------------------------------------------------------
# Bundle metadata


def _now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class BundleMeta:
    """The JSON document stored under the safetensors metadata key "tomolive".

    `classes` are in output order: label value i + 1 is classes[i]; 0 is background, so
    architecture["n_classes"] == len(classes) + 1. `preprocess` is a core.preprocess recipe.
    `training` is free-form provenance (data, region, steps, validation Dice per class,
    synthetic flag, ...). `parent` is "name@version" of the bundle this one was derived from.
    """

    name: str
    version: int
    architecture: dict[str, Any]
    voxel_size_a: float
    classes: list[ClassSpec]
    preprocess: list[dict[str, Any]] = field(default_factory=list)
    parent: str | None = None
    created: str = field(default_factory=_now_iso)
    training: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    format_version: int = FORMAT_VERSION
    # sha256 of the weights (`weights_sha256`), set by save_bundle; None in older bundles.
    weights_sha256: str | None = None
    z_edge: str = "clamp"  # Z_EDGE_MODES: how this network's inputs are built at z edges

    def __post_init__(self) -> None:
        # Accept class specs as JSON objects too (what comes out of a YAML or JSON file).
        self.classes = [
            c if isinstance(c, ClassSpec) else ClassSpec.from_json(c) for c in self.classes
        ]
        self.validate()

    @property
    def in_slices(self) -> int:
        return int(self.architecture["in_slices"])

    @property
    def n_classes(self) -> int:
        return int(self.architecture["n_classes"])

    @property
    def ref(self) -> str:
        """"name@version", the form used by `parent`."""
        return f"{self.name}@{self.version}"

    def validate(self) -> None:
        """Raise ValueError naming the first problem."""
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"unsupported format_version {self.format_version!r} (this tomolive reads "
                f"{FORMAT_VERSION})"
            )
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name must be a non-empty string, not {self.name!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise ValueError(f"version must be a non-negative integer, not {self.version!r}")
        if self.parent is not None and (not isinstance(self.parent, str) or "@" not in self.parent):
            raise ValueError(f"parent must be null or 'name@version', not {self.parent!r}")
        try:
            datetime.fromisoformat(str(self.created).replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"created {self.created!r} is not an ISO-8601 time") from None
        check_architecture(self.architecture)
        vs = self.voxel_size_a
        if isinstance(vs, bool) or not isinstance(vs, (int, float)) or not math.isfinite(vs) \
                or vs <= 0:
            raise ValueError(f"voxel_size_a must be a positive number, not {vs!r}")
        if not self.classes:
            raise ValueError("classes is empty (a model needs at least one class)")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"class names are not unique: {names}")
        if self.n_classes != len(self.classes) + 1:
            raise ValueError(
                f"architecture.n_classes = {self.n_classes} but {len(self.classes)} classes are "
                f"listed (expected n_classes = classes + 1 for background)"
            )
        if not isinstance(self.preprocess, list):
            raise ValueError(f"preprocess must be a list of steps, not {self.preprocess!r}")
        validate_recipe(self.preprocess)
        if not isinstance(self.training, dict):
            raise ValueError(f"training must be an object, not {self.training!r}")
        if not isinstance(self.description, str):
            raise ValueError(f"description must be a string, not {self.description!r}")
        check_z_edge(self.z_edge)
        digest = self.weights_sha256
        if digest is not None and not _is_sha256(digest):
            raise ValueError(f"weights_sha256 must be 64 hex digits or null, not {digest!r}")

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["classes"] = [c.to_json() for c in self.classes]
        if out["weights_sha256"] is None:
            del out["weights_sha256"]  # a document without a checksum stays as it was
        if out["z_edge"] == "clamp":
            del out["z_edge"]  # as bundles from before the field: readable by older tomolive
        return out

    @classmethod
    def from_json(cls, data: Any) -> BundleMeta:
        """Parse and validate; raises ValueError naming the problem."""
        if not isinstance(data, dict):
            raise ValueError(f"metadata must be a JSON object, not {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"unsupported format_version {version!r} (this tomolive reads {FORMAT_VERSION})"
            )
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"metadata has unknown fields {sorted(unknown)}")
        required = {"name", "version", "architecture", "voxel_size_a", "classes", "preprocess",
                    "created"}
        missing = required - set(data)
        if missing:
            raise ValueError(f"metadata is missing fields {sorted(missing)}")
        if not isinstance(data["classes"], list):
            raise ValueError(f"classes must be a list, not {type(data['classes']).__name__}")
        classes = []
        for i, item in enumerate(data["classes"]):
            if not isinstance(item, dict):
                raise ValueError(f"classes[{i}] must be an object, not {item!r}")
            try:
                classes.append(ClassSpec.from_json(item))
            except (TypeError, AttributeError) as exc:  # wrongly typed fields
                raise ValueError(f"classes[{i}] is malformed ({exc})") from None
        return cls(**{**data, "classes": classes})


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and \
        all(c in "0123456789abcdef" for c in value)


# --------------------------------------------------------------------------------------------
# Bundle files


@dataclass
class ModelBundle:
    """A validated bundle: metadata, CPU float32 weights, the file and the sha256 of its bytes."""

    meta: BundleMeta
    state_dict: dict[str, torch.Tensor]
    path: Path
    sha256: str

    @property
    def classes(self) -> list[ClassSpec]:
        return list(self.meta.classes)

    def build(self, device: str | torch.device = "cpu") -> UNet25D:
        """The network with these weights on `device`, in eval mode."""
        network = build_network(self.meta.architecture, "cpu")
        network.load_state_dict(self.state_dict, strict=True)
        return network.to(device).eval()


def default_bundle_path() -> Path:
    """Where the shipped default model lives (may not exist until it has been trained)."""
    return Path(__file__).parent / "assets" / "default.safetensors"


def _expected_shapes(arch: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    # Build on the meta device: no memory, no compute, just the parameter shapes.
    network = build_network(arch, "meta")
    return {k: tuple(v.shape) for k, v in network.state_dict().items()}


def _check_tensors(
    tensors: dict[str, torch.Tensor], arch: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Names, shapes, dtypes and finiteness against the architecture; returns float32 tensors."""
    expected = _expected_shapes(arch)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        parts = [f"{what} {len(names)} tensors ({', '.join(names[:3])}{', ...' * (len(names) > 3)})"
                 for what, names in (("missing", missing), ("unexpected", extra)) if names]
        raise ValueError(
            f"tensors do not match architecture {_arch_str(arch)}: {'; '.join(parts)}"
        )
    out = {}
    for name, shape in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"tensor {name} has shape {list(tensor.shape)} but architecture "
                f"{_arch_str(arch)} needs {list(shape)}"
            )
        if name.endswith("num_batches_tracked"):
            out[name] = tensor.to(torch.int64)
            continue
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"tensor {name} has dtype {tensor.dtype}, expected floating point")
        tensor = tensor.to(torch.float32)
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"tensor {name} has non-finite values (NaN or Inf)")
        out[name] = tensor
    return out


def _arch_str(arch: dict[str, Any]) -> str:
    return ", ".join(f"{k}={arch[k]}" for k in _ARCH_INT_KEYS)


def weights_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor in name order: its name, dtype, shape and raw bytes.

    Names, dtypes and shapes are included so that swapped or reshaped tensors change it too.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_bundle(path: str | Path, network: nn.Module, meta: BundleMeta) -> Path:
    """Write `network` (unfused) and `meta` as one `.safetensors` file, atomically.

    Tensors are stored as contiguous CPU float32 (BatchNorm's num_batches_tracked as int64):
    exact weights, and a default model is only a few MB. The file is written to a hidden
    temporary file in the same folder, fsynced, then renamed over `path`, so a watcher never sees
    a partial bundle. Raises ValueError if the network does not match meta.architecture.
    """
    path = Path(path)
    meta.validate()
    raw = {k: v.detach().to("cpu").contiguous() for k, v in network.state_dict().items()}
    tensors = _check_tensors(raw, meta.architecture)
    # The checksum of exactly the tensors written; a parent's checksum in `meta` is replaced.
    document = {**meta.to_json(), "weights_sha256": weights_sha256(tensors)}
    payload = st_save(tensors, metadata={METADATA_KEY: json.dumps(document)})
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
        os.chmod(tmp, 0o644)  # readable by the service user, whoever trained the model
    return path


def _read_metadata(blob: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__, parsed by hand for precise error messages."""
    if len(blob) < 8:
        raise _Truncated(f"not a safetensors file (only {len(blob)} bytes)")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > _MAX_HEADER_BYTES:
        raise ValueError("not a safetensors file (implausible header length)")
    if 8 + header_len > len(blob):
        raise _Truncated(
            f"truncated safetensors file (header needs {8 + header_len} bytes, file has "
            f"{len(blob)})"
        )
    try:
        header = json.loads(blob[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (header is not a JSON object)")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("not a safetensors file (__metadata__ is not an object)")
    ends = [
        v.get("data_offsets", [0, 0])[1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict)
    ]
    if ends and 8 + header_len + max(ends) > len(blob):
        raise _Truncated(
            f"truncated safetensors file (tensors need {8 + header_len + max(ends)} bytes, "
            f"file has {len(blob)})"
        )
    return metadata


def load_bundle(
    path: str | Path, voxel_size_bounds_a: tuple[float, float] = DEFAULT_VOXEL_SIZE_BOUNDS_A
) -> ModelBundle:
    """Read and validate a bundle; raises BundleError (one line, starting with the path).

    Only the safetensors format is parsed (never pickle). The voxel size must lie within
    `voxel_size_bounds_a` (Å); the weights must match `weights_sha256` when the bundle has one;
    metadata, classes and every tensor's name, shape and finiteness are checked against the
    architecture before a network is built.
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read model bundle ({exc.strerror or exc})") from None
    try:
        bundle = _parse_bundle(blob, path, voxel_size_bounds_a)
    except ValueError as exc:
        message = one_line(exc)
        kind = TruncatedBundle if isinstance(exc, _Truncated) else BundleError
        raise kind(f"{path}: {message}") from None
    return bundle


def _parse_bundle(
    blob: bytes, path: Path, voxel_size_bounds_a: tuple[float, float]
) -> ModelBundle:
    metadata = _read_metadata(blob)
    if METADATA_KEY not in metadata:
        raise ValueError(f"no {METADATA_KEY!r} metadata (not a tomolive model bundle)")
    try:
        document = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{METADATA_KEY!r} metadata is not valid JSON ({exc.msg})") from None
    meta = BundleMeta.from_json(document)
    try:
        check_voxel_size(meta.voxel_size_a, voxel_size_bounds_a)
    except ValueError as exc:
        raise ValueError(f"voxel_size_a {exc}") from None
    try:
        raw = st_load(blob)
    except Exception as exc:  # safetensors raises its own error type for malformed files
        raise ValueError(f"malformed safetensors data ({exc})") from None
    # Before the tensor checks: corrupted bytes are reported as corruption, not as NaN weights.
    if meta.weights_sha256 is not None and weights_sha256(raw) != meta.weights_sha256:
        raise ValueError("weights do not match their weights_sha256 checksum (the tensor data "
                         "was altered or corrupted after saving)")
    state_dict = _check_tensors(raw, meta.architecture)
    return ModelBundle(meta, state_dict, path, hashlib.sha256(blob).hexdigest())
