"""Class-balanced 2.5D patches from the training parts, and their augmentation."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..infer import edge_indices
from .data import Part
from .options import IGNORE

# Share of patches centred on a voxel of a randomly chosen foreground class (the rest are
# centred on any annotated voxel), so that rare classes are seen often.
_CLASS_BALANCED_SHARE = 0.7


class Sampler:
    """Class-balanced 2.5D patches from the training parts of all sources (seeded numpy)."""

    def __init__(self, parts: list[Part], in_slices: int, patch_px: int,
                 rng: np.random.Generator, augment: bool, rotate_any_angle: bool = False,
                 blur_max_px: float = 0.0, spectrum_jitter: float = 0.0,
                 z_edge_share: float = 0.0, z_edge: str = "clamp",
                 void_share: float = 0.0) -> None:
        self.parts, self.k, self.p, self.rng, self.augment = parts, in_slices, patch_px, rng, \
            augment
        self.rotate = augment and rotate_any_angle
        self.blur_max_px = blur_max_px if augment else 0.0
        self.spectrum_jitter = spectrum_jitter if augment else 0.0
        self.z_edge_share = z_edge_share if augment else 0.0
        self.z_edge = z_edge
        self.void_share = void_share if augment else 0.0
        self.classes = sorted({c for part in parts for c in part.index if c != 0})

    def _centre(self) -> tuple[Part, int]:
        rng = self.rng
        if self.classes and rng.random() < _CLASS_BALANCED_SHARE:
            c = self.classes[rng.integers(len(self.classes))]
            owners = [p for p in self.parts if c in p.index]
            part = owners[rng.integers(len(owners))]
            choices = part.index[c]
        else:  # any annotated voxel: a part, then a class, each in proportion to its count
            sizes = np.array([p.n_annotated for p in self.parts], dtype=np.float64)
            part = self.parts[rng.choice(len(self.parts), p=sizes / sizes.sum())]
            keys = sorted(part.index)
            counts = np.array([len(part.index[c]) for c in keys], dtype=np.float64)
            choices = part.index[keys[rng.choice(len(keys), p=counts / counts.sum())]]
        return part, int(choices[rng.integers(len(choices))])

    def patch(self) -> tuple[np.ndarray, np.ndarray]:
        part, flat = self._centre()
        _, h, w = part.labels.shape
        z, y, x = np.unravel_index(flat, part.labels.shape)
        # A rotated patch is cut from a larger box (its diagonal) so that its corners hold
        # real data; where the part is too small, the corners are left unannotated.
        angle = float(self.rng.uniform(0.0, 90.0)) if self.rotate else 0.0
        q = min(h, w, int(math.ceil(self.p * math.sqrt(2))) + 2) if angle else self.p
        # The chosen voxel lands anywhere in the patch, not always at its centre.
        off = (q - self.p) // 2
        y0 = int(np.clip(y - off - self.rng.integers(self.p), 0, h - q))
        x0 = int(np.clip(x - off - self.rng.integers(self.p), 0, w - q))
        image = part.image[z:z + self.k, y0:y0 + q, x0:x0 + q]
        labels = part.labels[z, y0:y0 + q, x0:x0 + q]
        if self.z_edge_share > 0 and self.rng.random() < self.z_edge_share:
            image = image[z_edge_indices(self.k, self.rng, self.z_edge)]  # a copy
        if self.void_share > 0 and self.rng.random() < self.void_share:
            image, labels = void_beyond_surface(image, labels, self.rng)
        if angle:
            image, labels = rotate_patch(image, labels, angle, self.p)
        if self.augment:
            image, labels = self._augment(image, labels)
        return np.ascontiguousarray(image), np.ascontiguousarray(labels)

    def _augment(self, image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        k = int(rng.integers(4))
        image, labels = np.rot90(image, k, axes=(1, 2)), np.rot90(labels, k)
        if rng.random() < 0.5:
            image, labels = image[:, :, ::-1], labels[:, ::-1]
        if rng.random() < 0.5:  # the missing wedge is symmetric in z: a z flip is a valid view
            image = image[::-1]
        if self.blur_max_px > 0 and rng.random() < 0.5:
            # In-plane blur: a tomogram from a coarser pixel size or a weaker reconstruction,
            # rescaled to the model's grid, lacks the finest detail of the training tomogram.
            sigma = float(rng.uniform(0.0, self.blur_max_px))
            image = ndimage.gaussian_filter(np.ascontiguousarray(image, dtype=np.float32),
                                            (0.0, sigma, sigma), mode="reflect")
        if self.spectrum_jitter > 0 and rng.random() < 0.5:
            image = random_spectrum(image, rng, self.spectrum_jitter)
        scale = math.exp(rng.uniform(-0.25, 0.25))
        shift = rng.uniform(-0.25, 0.25)
        noise = rng.uniform(0.0, 0.3)
        # One float32 array, changed in place. The noise is drawn in float64 and cast: the same
        # random stream as before, so scripts/train_default_model.py still reproduces the
        # shipped weights.
        image = np.multiply(image, np.float32(scale), dtype=np.float32)
        image += np.float32(shift)
        if noise > 0:
            image += np.float32(noise) * rng.standard_normal(image.shape).astype(np.float32)
        return image, labels

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = zip(*(self.patch() for _ in range(size)), strict=True)
        return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels)).long()


def z_edge_indices(in_slices: int, rng: np.random.Generator, z_edge: str = "clamp"
                   ) -> np.ndarray:
    """Slice indices into a neighbourhood of `in_slices` that make it look as core.infer's
    are within in_slices // 2 of the volume's top or bottom: the slices beyond a random edge
    (0 to in_slices // 2 slices from the centre, on a random side) are built by
    core.infer.edge_indices, as inference builds them."""
    centre = in_slices // 2
    offset = int(rng.integers(centre + 1))
    slices = np.arange(in_slices)
    if rng.random() < 0.5:  # the top: slice `edge` is the volume's first
        edge = centre - offset
        return edge + edge_indices(slices - edge, in_slices - edge, z_edge)
    return edge_indices(slices, centre + offset + 1, z_edge)  # the bottom: the last


def void_beyond_surface(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator
                        ) -> tuple[np.ndarray, np.ndarray]:
    """The patch image (K, Q, Q) and centre-slice labels (Q, Q) as they would be if a specimen
    surface crossed the neighbourhood: the slices beyond a random depth (on a random side, from
    one slice to all of them) become the vacuum or ice beyond it, which holds the
    reconstruction's noise and no object. That noise is the patch's own: neighbouring slices
    share their signal but not most of their noise (as in core.quality.adjacent_slice_snr), so
    the difference of slices z and z + 1 is noise of the tomogram's own colour. It is scaled
    to 0.7-1.1 times the patch's spread: noise carries most of a tomogram's variance (an SNR
    per voxel below 1), so a region without specimen keeps most of it. A centre slice in the
    void is all background. See TrainOptions.void_share."""
    k = image.shape[0]
    image = np.asarray(image, dtype=np.float32)
    if k < 2:
        return image, labels
    noise = np.empty_like(image)
    np.subtract(image[:-1], image[1:], out=noise[:-1])
    noise[-1] = image[-2] - image[-1]  # one repeated difference for the last slice
    spread = float(image.std())
    noise_spread = float(noise.std())
    gain = rng.uniform(0.7, 1.1) * spread / noise_spread if noise_spread > 0 else 0.0
    noise = noise * np.float32(gain) + np.float32(image.mean())
    depth = int(rng.integers(1, k + 1))  # slices of void; past the centre about half the time
    out = np.array(image, dtype=np.float32)
    if rng.random() < 0.5:
        out[:depth] = noise[:depth]
    else:
        out[k - depth:] = noise[k - depth:]
    if depth > k // 2:
        labels = np.zeros_like(labels)
    return out, labels


def random_spectrum(image: np.ndarray, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """`image` (z, y, x) with every slice's in-plane amplitude spectrum reshaped by one random
    smooth radial gain (see TrainOptions.spectrum_jitter); float32, same mean and std."""
    image = np.asarray(image, dtype=np.float32)
    _, h, w = image.shape
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(h), np.fft.rfftfreq(w), indexing="ij"))
    cutoff = rng.uniform(0.25, 0.5)
    gain = np.exp(rng.uniform(-jitter, jitter) * k / 0.5)
    gain /= 1.0 + (k / cutoff) ** 8  # soft low-pass: a Butterworth of order 4
    gain[0, 0] = 1.0
    mean, std = float(image.mean()), float(image.std())
    out = np.fft.irfft2(np.fft.rfft2(image) * gain.astype(np.float32), s=(h, w))
    out_std = float(out.std())
    out = (out - out.mean()) * (std / out_std if out_std > 0 else 1.0) + mean
    return out.astype(np.float32)


def rotate_patch(image: np.ndarray, labels: np.ndarray, angle_deg: float, size: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """The centred size x size box of image [K, Q, Q] (bilinear, reflected at the border) and
    labels [Q, Q] (nearest; outside = 255) turned in-plane by `angle_deg`. Filaments and
    membranes run at any angle in a tomogram; 90-degree turns alone teach only four of them
    (a model trained on diagonal microtubules called an upright one membrane).

    Only the output box is sampled (torch grid_sample), not the whole rotated Q x Q patch:
    1 ms instead of scipy.ndimage.rotate's 24 ms (rotating all of Q x Q) for a 21-slice patch,
    with the same values (tests/test_train.py).
    """
    q = labels.shape[0]
    a = -math.radians(angle_deg)  # the sense of scipy.ndimage.rotate(angle_deg, axes=(1, 2))
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
    centre = (q - 1) / 2.0
    ys = centre + math.cos(a) * dy - math.sin(a) * dx
    xs = centre + math.sin(a) * dy + math.cos(a) * dx
    # grid_sample's normalised coordinates (align_corners=True: -1 and 1 are pixel centres).
    grid = torch.from_numpy(np.stack([xs, ys], axis=-1) * (2.0 / (q - 1)) - 1.0)
    grid = grid.to(torch.float32)[None]
    rot_image = F.grid_sample(torch.from_numpy(np.ascontiguousarray(image))[None], grid,
                              mode="bilinear", padding_mode="reflection", align_corners=True)
    # Labels + 1, so that grid_sample's zero padding marks the outside (-> 255).
    shifted = torch.from_numpy(labels.astype(np.float32) + 1.0)[None, None]
    rot_labels = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros",
                               align_corners=True)[0, 0].numpy().astype(np.int16) - 1
    rot_labels[rot_labels < 0] = IGNORE
    return rot_image[0].numpy(), rot_labels.astype(np.uint8)
