"""Run a 2.5D network over a whole volume: batches of slices, overlapping tiles, AMP on GPU.

Host memory stays bounded: the result is an int8 argmax and a uint8 confidence per voxel;
float tensors exist only for the current batch of slices (on the device).

Slice z sees slices z - r .. z + r (r = in_slices // 2); beyond the volume's top and bottom the
bundle's `z_edge` says what stands in (core.model.Z_EDGE_MODES): "reflect" mirrors the volume at
its edge slice, "clamp" (bundles from before the choice) repeats the edge slice. Training builds
its inputs the same way: `neighbour_indices` and `edge_indices` are the one home of the rule.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .decision import decide, decide_bytes, to_u8
from .model import ModelBundle, check_z_edge, fuse_for_inference

PRECISIONS = ("auto", "float32", "bfloat16")


def reduced_precision_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype `precision` means on `device`, or None for float32."""
    if precision == "float32":
        return None
    if precision == "bfloat16":  # forced: emulated (slow) where the hardware lacks it
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return None


def _cpu_has_native_bf16() -> bool:
    # Without AVX512-BF16 or AMX, bf16 is emulated and slower than float32.
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without the probes: stay exact
        return False


@dataclass
class InferenceOptions:
    """How to run a network over a volume.

    device: "auto" | "cpu" | "cuda" | "cuda:N".
    batch_size: slices per forward pass; None = auto: about 2 * 256**2 pixels per pass on CPU
    (the activations then stay in cache: 77 vs 61 GFLOP/s for 2 vs 8 slices of 256**2,
    measured), about 8 * 512**2 on CUDA.
    tile_size_px: largest tile edge fed to the network (bigger slices are tiled).
    tile_overlap_px: minimum overlap between neighbouring tiles (blended with cosine ramps).
    tta_flips: average softmax over identity, x-flip, y-flip and both (4x the compute).
    precision: "auto" runs the network in reduced precision where the hardware does it
    natively (bfloat16 autocast on CPUs with AVX512-BF16 or AMX, bfloat16 or float16 on CUDA),
    "float32" never does, "bfloat16" always does. On this project's AVX512-BF16 CPU bfloat16
    cut inference time by 1.7x on the validation tomograms, with 99.99 % of label voxels
    unchanged (issue 18 note); softmax, blending and argmax stay float32.
    torch's CPU thread count is the caller's (a worker process sets it once for its life):
    core changes no process-wide torch state.
    """

    device: str = "auto"
    batch_size: int | None = None
    tile_size_px: int = 512
    tile_overlap_px: int = 64
    tta_flips: bool = False
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {self.batch_size}")
        if self.tile_overlap_px < 0:
            raise ValueError(f"tile_overlap_px must be >= 0, not {self.tile_overlap_px}")
        if self.tile_size_px <= self.tile_overlap_px:
            raise ValueError(
                f"tile_size_px {self.tile_size_px} must exceed tile_overlap_px "
                f"({self.tile_overlap_px})"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not "
                             f"{self.precision!r}")


@dataclass
class Prediction:
    """Per voxel on the model grid: the class (int8; core.decision's rule) and its probability
    * 255; per slice, the counts behind the model-fit signal (`uncertain_fraction`); on
    request, the probabilities of chosen classes as bytes."""

    labels: np.ndarray  # int8 [z, y, x]
    confidence: np.ndarray  # uint8 [z, y, x]: the chosen label's probability * 255
    # Voxels where some foreground class has probability > FIT_CANDIDATE_PROB, per z slice,
    # and of those, the ones where no class reaches FIT_DECIDED_PROB.
    candidates_per_z: np.ndarray | None = None  # int64 [z]
    uncertain_per_z: np.ndarray | None = None  # int64 [z]
    # uint8 [len(keep), z, y, x], probability * 255 of the classes `predict` was asked to keep
    # (label values, in the order asked); None when none was.
    probabilities_u8: np.ndarray | None = None


# The model-fit signal (issue 21): of the voxels where the model sees something (a foreground
# class above 0.2), the share where it cannot decide (no class reaches 0.6). A model that fits
# its data decides almost everywhere it sees something; one that does not, hesitates. The mean
# max probability cannot show this: background dominates it (0.97-0.98 on the validation
# tomograms, where the shipped model found no microtubule, and 0.97 on its own data).
FIT_CANDIDATE_PROB = 0.2
FIT_DECIDED_PROB = 0.6


def resolve_device(spec: str | int | torch.device = "auto") -> torch.device:
    """"auto" -> cuda:0 if CUDA is available, else cpu; ints mean cuda:N. Raises ValueError."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if isinstance(spec, int):
        spec = f"cuda:{spec}"
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index_text = spec.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise ValueError(f"device {spec!r}: expected cuda:N with N a GPU index")
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {spec!r} requested but CUDA is not available (no GPU or a CPU-only torch)"
            )
        index, count = int(index_text), torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"device {spec!r} requested but only {count} CUDA device(s) exist")
        return torch.device(f"cuda:{index}")
    raise ValueError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N")


def prepare_network(bundle: ModelBundle, device: str | torch.device = "auto") -> nn.Module:
    """The bundle's network on `device`, BatchNorm folded, channels_last, eval mode.

    Measured on CPU (oneDNN, default model, 256**2 slices): channels_last 77 GFLOP/s vs 47
    without; BatchNorm folding a further ~10%. On CUDA, NHWC is what tensor cores want.
    """
    device = resolve_device(device)
    network = fuse_for_inference(bundle.build("cpu")).to(device)
    return network.to(memory_format=torch.channels_last).eval()


def auto_batch_size(device: torch.device, tile_pixels: int) -> int:
    """Slices per forward pass for the `batch_size=None` default (see InferenceOptions)."""
    budget = 8 * 512**2 if device.type == "cuda" else 2 * 256**2
    return max(1, min(64, budget // max(1, tile_pixels)))


def edge_indices(index: np.ndarray, depth: int, z_edge: str = "clamp") -> np.ndarray:
    """Slice indices of a volume of `depth` slices for any integer indices: those beyond the
    top or bottom repeat the edge slice ("clamp") or mirror the volume there ("reflect": -1 is
    slice 1, depth is slice depth - 2, as numpy's reflect padding)."""
    index = np.asarray(index)
    if check_z_edge(z_edge) == "clamp" or depth == 1:
        return np.clip(index, 0, depth - 1)
    period = 2 * (depth - 1)
    index = np.abs(index) % period
    return np.where(index >= depth, period - index, index)


def neighbour_indices(z: np.ndarray | int, depth: int, in_slices: int,
                      z_edge: str = "clamp") -> np.ndarray:
    """Slice indices fed to the network for centre slice(s) z: [..., in_slices]."""
    offsets = np.arange(in_slices) - in_slices // 2
    return edge_indices(np.asarray(z)[..., None] + offsets, depth, z_edge)


def tile_starts(length: int, tile_max: int, overlap: int, multiple: int) -> tuple[list[int], int]:
    """Tile starts along one axis and the tile length (a multiple of `multiple`).

    A single tile (padded up to the multiple) if it fits in tile_max; otherwise the fewest
    tiles of length <= tile_max that overlap by at least `overlap`, evenly spread, each inside
    the axis (no padding). Returns (starts, tile_length).
    """
    padded = -(-length // multiple) * multiple
    cap = max(multiple, tile_max // multiple * multiple)
    if padded <= cap:
        return [0], padded
    overlap = min(overlap, cap - multiple)
    n_tiles = math.ceil((length - overlap) / (cap - overlap))
    tile = -(-math.ceil((length + (n_tiles - 1) * overlap) / n_tiles) // multiple) * multiple
    tile = min(tile, cap)
    starts = np.round(np.linspace(0, length - tile, n_tiles)).astype(int).tolist()
    return starts, tile


def _axis_weights(length: int, starts: list[int], tile: int) -> list[torch.Tensor]:
    """1-D blending weights per tile: cosine ramps across the whole overlap with each neighbour.

    Predictions near a tile's inner edge lack context; the ramps hand those pixels over to the
    neighbouring tile smoothly. Ramps use (i + 0.5) so every weight is > 0.
    """
    out = []
    for j, start in enumerate(starts):
        size = min(tile, length - start)
        weight = torch.ones(size, dtype=torch.float32)
        if j > 0:
            n = starts[j - 1] + tile - start  # overlap with the previous tile
            weight[:n] = _cosine_ramp(n)
        if j < len(starts) - 1:
            n = start + tile - starts[j + 1]  # overlap with the next tile
            weight[size - n:] = torch.minimum(weight[size - n:], _cosine_ramp(n).flip(0))
        out.append(weight)
    return out


def _cosine_ramp(n: int) -> torch.Tensor:
    return 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(n, dtype=torch.float32) + 0.5) / n)


def _network_multiple(network: nn.Module) -> int:
    # The network's own rule (core.model.UNet25D.size_multiple); a torch.compile wrapper
    # forwards the attribute to the module it wraps.
    return int(network.size_multiple)


def _uses_channels_last(network: nn.Module) -> bool:
    for param in network.parameters():
        if param.ndim == 4:
            return param.is_contiguous(memory_format=torch.channels_last) and not \
                param.is_contiguous()
    return False


def _forward_probs(
    network: nn.Module, x: torch.Tensor, options: InferenceOptions, channels_last: bool
) -> torch.Tensor:
    """Softmax probabilities (float32) for a padded input [B, K, h, w], with optional TTA."""
    flips: list[tuple[int, ...]] = [()]
    if options.tta_flips:
        flips += [(3,), (2,), (2, 3)]
    dtype = reduced_precision_dtype(x.device, options.precision)
    autocast = (torch.autocast(x.device.type, dtype=dtype) if dtype is not None
                else contextlib.nullcontext())
    total = None
    for dims in flips:
        xi = x.flip(dims) if dims else x
        if channels_last:
            xi = xi.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = network(xi)
        probs = torch.softmax(logits.float(), dim=1)
        probs = probs.flip(dims) if dims else probs
        total = probs if total is None else total + probs
    return total / len(flips)


def _pad_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad [B, K, h, w] at the bottom/right to (height, width): reflect where possible."""
    pad_y, pad_x = height - x.shape[2], width - x.shape[3]
    if pad_y == 0 and pad_x == 0:
        return x
    mode = "reflect" if pad_y < x.shape[2] and pad_x < x.shape[3] else "replicate"
    return F.pad(x, (0, pad_x, 0, pad_y), mode=mode)


def iter_probabilities(
    network: nn.Module,
    data_f32: np.ndarray,
    in_slices: int,
    options: InferenceOptions,
    z_edge: str = "clamp",
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (z0, probabilities [B, C, H, W] float32 on the device) batch by batch; `z_edge`
    is the bundle's (BundleMeta.z_edge).

    The building block of `predict`; exposed for tests and tools that need the probabilities
    of a few slices. Never collect all batches of a large volume.
    """
    if data_f32.ndim != 3:
        raise ValueError(f"expected a [z, y, x] volume, got shape {data_f32.shape}")
    device = next(network.parameters()).device
    depth, height, width = data_f32.shape
    multiple = _network_multiple(network)
    overlap = options.tile_overlap_px
    ys, tile_y = tile_starts(height, options.tile_size_px, overlap, multiple)
    xs, tile_x = tile_starts(width, options.tile_size_px, overlap, multiple)
    tiled = len(ys) > 1 or len(xs) > 1
    channels_last = _uses_channels_last(network)
    if tiled:
        weights, weight_sum = _tile_weights(height, width, ys, xs, tile_y, tile_x, device)
    batch_size = options.batch_size or auto_batch_size(device, tile_y * tile_x)
    for z0 in range(0, depth, batch_size):
        z1 = min(z0 + batch_size, depth)
        index = neighbour_indices(np.arange(z0, z1), depth, in_slices, z_edge)
        # Copy only the distinct slices this batch needs to the device, then gather there.
        lo, hi = int(index.min()), int(index.max()) + 1
        slab = torch.from_numpy(np.ascontiguousarray(data_f32[lo:hi], dtype=np.float32))
        slab = slab.to(device, non_blocking=True)
        stack = slab[torch.from_numpy(index - lo).to(device)]  # [B, K, H, W]
        if not tiled:
            x = _pad_to(stack, tile_y, tile_x)
            probs = _forward_probs(network, x, options, channels_last)
            yield z0, probs[:, :, :height, :width]
            continue
        acc = None
        for (y0, x0), weight in zip(((y, x) for y in ys for x in xs), weights, strict=True):
            tile = stack[:, :, y0:y0 + tile_y, x0:x0 + tile_x]
            probs = _forward_probs(network, _pad_to(tile, tile_y, tile_x), options, channels_last)
            probs = probs[:, :, :tile.shape[2], :tile.shape[3]] * weight
            if acc is None:
                acc = torch.zeros(
                    (z1 - z0, probs.shape[1], height, width), dtype=torch.float32, device=device
                )
            acc[:, :, y0:y0 + tile.shape[2], x0:x0 + tile.shape[3]] += probs
        yield z0, acc / weight_sum


def _tile_weights(
    height: int, width: int, ys: list[int], xs: list[int], tile_y: int, tile_x: int,
    device: torch.device,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-tile 2-D blending weights (cropped to the volume) and their sum over the slice."""
    weights, weight_sum = [], torch.zeros((height, width), dtype=torch.float32)
    for y0, wy in zip(ys, _axis_weights(height, ys, tile_y), strict=True):
        for x0, wx in zip(xs, _axis_weights(width, xs, tile_x), strict=True):
            weight = wy[:, None] * wx[None, :]
            weight_sum[y0:y0 + weight.shape[0], x0:x0 + weight.shape[1]] += weight
            weights.append(weight.to(device))
    return weights, weight_sum.to(device)


def predict(
    network: nn.Module,
    data_f32: np.ndarray,
    in_slices: int,
    options: InferenceOptions | None = None,
    progress: Callable[[int], None] | None = None,
    z_edge: str = "clamp",
    thresholds: Sequence[float] | None = None,
    keep_probabilities: Sequence[int] = (),
) -> Prediction:
    """Segment every z-slice of `data_f32` [z, y, x] (preprocessed, on the model grid);
    `in_slices` and `z_edge` are the bundle's.

    `network` is on its device in eval mode (see `prepare_network`); the input may be a
    memory map. progress(n_slices_done) is called after every batch. `thresholds`: per
    foreground class (core.decision.threshold_vector), None for the argmax. `keep_probabilities`:
    label values whose probabilities to keep as bytes (one byte per voxel and class: the only
    whole-volume copy of them; float exists for the current batch only). When some are kept,
    the labels are decided from the bytes (core.decision.decide_saved's arithmetic), so that a
    repick from the saved maps reproduces them exactly on the same grid.
    """
    options = options or InferenceOptions()
    depth, height, width = data_f32.shape
    labels = np.empty((depth, height, width), dtype=np.int8)
    confidence = np.empty((depth, height, width), dtype=np.uint8)
    candidates = np.zeros(depth, dtype=np.int64)
    uncertain = np.zeros(depth, dtype=np.int64)
    keep = list(keep_probabilities)
    kept = np.empty((len(keep), depth, height, width), dtype=np.uint8) if keep else None
    # Without thresholds the chosen probability is the maximum: no second pass for it.
    argmax_rule = not thresholds or all(math.isnan(t) for t in thresholds)
    with torch.inference_mode():
        for z0, probs in iter_probabilities(network, data_f32, in_slices, options, z_edge):
            if probs.shape[1] > 127:
                raise ValueError(f"{probs.shape[1]} classes do not fit int8 labels")
            if keep and max(keep) >= probs.shape[1]:
                raise ValueError(f"class {max(keep)} asked for; the network has "
                                 f"{probs.shape[1] - 1}")
            z1 = z0 + probs.shape[0]
            chosen = None
            if kept is None:
                arg, chosen = decide(probs, thresholds)
                labels[z0:z1] = arg.to(torch.int8).cpu().numpy()
                confidence[z0:z1] = to_u8(chosen).cpu().numpy()
            else:  # decided from the bytes that are kept, as `tomolive repick` will
                foreground_u8 = to_u8(probs[:, 1:]).transpose(0, 1).contiguous().cpu().numpy()
                labels[z0:z1], confidence[z0:z1] = decide_bytes(foreground_u8, thresholds)
                kept[:, z0:z1] = foreground_u8[[k - 1 for k in keep]]
            best = chosen if chosen is not None and argmax_rule else probs.amax(dim=1)
            seen = probs[:, 1:].amax(dim=1) > FIT_CANDIDATE_PROB
            candidates[z0:z1] = seen.sum(dim=(1, 2)).cpu().numpy()
            uncertain[z0:z1] = (seen & (best < FIT_DECIDED_PROB)).sum(dim=(1, 2)).cpu().numpy()
            if progress is not None:
                progress(z1)
    return Prediction(labels=labels, confidence=confidence, candidates_per_z=candidates,
                      uncertain_per_z=uncertain, probabilities_u8=kept)
