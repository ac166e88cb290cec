"""Image formation as a transmission electron microscope does it, and reconstruction.

A specimen's potential (volts, [z, y, x]) is imaged as a single-axis tilt series about Y:
each tilt is a line-integral projection of the potential (the projection approximation), the
exit wave exp((i - a) * sigma * V_projected) is propagated through the objective lens (CTF with
defocus, spherical aberration and a dose-dependent B-factor envelope; defocus varies across
x with the height of the tilted specimen), the intensity is attenuated by inelastic
scattering along the path (Beer-Lambert), and counted as electrons (Poisson shot noise at the
exposure of that tilt). The series is then normalised as alignment software does, and
reconstructed by weighted back-projection (R-weighting with a radial roll-off, or a SIRT-like
filter). Dense matter comes out dark, as in real reconstructions.

Sign conventions: `defocus_um` < 0 is underfocus (the usual cryo-ET setting); the phase
aberration is chi(k) = pi * lambda * dz * k^2 - pi / 2 * Cs * lambda^3 * k^4 with dz = -defocus
(> 0 underfocus); `ctf_1d` is the weak-phase transfer sqrt(1 - w^2) sin(chi) + w cos(chi),
positive where dense matter appears dark (the low frequencies, in underfocus).
Geometry: a tilt of theta rotates the specimen about Y; detector coordinate
x' - cx = (x - cx) cos(theta) + (z - cz) sin(theta), with (cz, cx) the volume centre.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from .export import jsonable
from .specimen import SpecimenParams, build_specimen, render_specimen
from .synth_result import SynthResult

Progress = Callable[[str, float], None]

# Physical constants (SI).
_H = 6.62607015e-34
_M0 = 9.1093837015e-31
_E = 1.602176634e-19
_C = 299792458.0


def wavelength_a(voltage_kv: float) -> float:
    """Relativistic electron wavelength (Å): lambda = h / sqrt(2 m0 e V (1 + e V / 2 m0 c^2))."""
    v = voltage_kv * 1e3
    return _H / math.sqrt(2 * _M0 * _E * v * (1 + _E * v / (2 * _M0 * _C**2))) * 1e10


def interaction_constant(voltage_kv: float) -> float:
    """sigma (rad per V per Å): phase shift per projected potential (Kirkland's formula)."""
    v = voltage_kv * 1e3
    mc2 = _M0 * _C**2 / _E  # rest energy in eV
    return 2 * math.pi / (wavelength_a(voltage_kv) * v) * (mc2 + v) / (2 * mc2 + v)


# --- parameters (domain randomisation) -------------------------------------------------------

@dataclass
class MicroscopeParams:
    """Acquisition and reconstruction settings; `sample` draws them from documented ranges."""

    voltage_kv: float = 300.0  # Titan Krios / Glacios-class cryo-ET at 300 kV
    cs_mm: float = 2.7  # Krios C-TWIN / X-FEG objective spherical aberration
    amplitude_contrast: float = 0.07  # 0.07-0.1 for vitrified biological samples (Toyoshima 1993)
    defocus_um: float = -3.0  # cryo-ET nominal defocus -1.5 to -6 um (underfocus)
    tilt_max_deg: float = 60.0  # +-50-65 deg: lamella geometry limits the range
    tilt_min_deg: float | None = None  # None = -tilt_max (symmetric)
    tilt_step_deg: float = 3.0  # 1-4 deg: 2-3 deg typical (Hagen et al. 2017)
    scheme: str = "dose-symmetric"  # Hagen et al. 2017; or "bidirectional" (from 0 or -20)
    bidirectional_start_deg: float = 0.0
    dose_e_per_a2: float = 120.0  # total 60-150 e/A^2 over the series (cryo-ET practice)
    dose_cos_scaling: bool = False  # some schemes raise the exposure as 1/cos(tilt)
    b_factor_base_a2: float = 50.0  # drift, charging, ice: 30-150 A^2 before any damage
    b_per_dose_a2: float = 4.0  # ~4 A^2 per e/A^2 of accumulated dose (Grant & Grigorieff 2015)
    mean_free_path_nm: float = 350.0  # inelastic MFP at 300 kV 300-400 nm (Rice et al. 2018)
    shift_sigma_px: float = 0.3  # residual alignment error after fiducial / patch tracking
    angle_sigma_deg: float = 0.1  # residual tilt-angle error
    poisson: bool = True  # exact Poisson counts (False: Gaussian limit)
    recon_filter: str = "ramp"  # "ramp" (R-weighted, radial roll-off) or "sirt" (SIRT-like)
    sirt_iterations: int = 10
    rolloff_start: float = 0.8  # fraction of Nyquist where the radial roll-off starts
    detector_mtf: bool = True  # pixel-integration (sinc) MTF of the detector

    @classmethod
    def sample(cls, rng: np.random.Generator) -> MicroscopeParams:
        """Draw every parameter from its documented range."""
        tilt_max = float(rng.uniform(50.0, 65.0))
        asym = rng.random() < 0.3  # pre-tilted lamellae often give asymmetric ranges
        return cls(
            amplitude_contrast=float(rng.uniform(0.07, 0.10)),
            defocus_um=float(-rng.uniform(1.5, 6.0)),
            tilt_max_deg=tilt_max,
            tilt_min_deg=float(-tilt_max + rng.uniform(-5.0, 5.0)) if asym else None,
            tilt_step_deg=float(rng.choice([1.0, 1.5, 2.0, 2.5, 3.0, 3.0, 3.0, 4.0])),
            scheme=str(rng.choice(["dose-symmetric", "bidirectional"], p=[0.7, 0.3])),
            bidirectional_start_deg=float(rng.choice([0.0, -20.0])),
            dose_e_per_a2=float(rng.uniform(60.0, 150.0)),
            dose_cos_scaling=bool(rng.random() < 0.2),
            b_factor_base_a2=float(rng.uniform(30.0, 150.0)),
            b_per_dose_a2=float(rng.uniform(3.0, 5.0)),
            mean_free_path_nm=float(rng.uniform(300.0, 400.0)),
            shift_sigma_px=float(rng.uniform(0.0, 1.0)),
            angle_sigma_deg=float(rng.uniform(0.0, 0.3)),
            recon_filter=str(rng.choice(["ramp", "sirt"], p=[0.6, 0.4])),
            sirt_iterations=int(rng.integers(5, 30)),
            rolloff_start=float(rng.uniform(0.6, 0.9)),
        )


# --- tilt series geometry --------------------------------------------------------------------

def tilt_angles(params: MicroscopeParams) -> tuple[np.ndarray, np.ndarray]:
    """(angles in acquisition order, accumulated dose before each tilt in e/A^2).

    Dose-symmetric (Hagen et al. 2017): 0, then groups of two alternating sides;
    bidirectional: from the start angle up to the maximum, then from below the start down.
    """
    lo = params.tilt_min_deg if params.tilt_min_deg is not None else -params.tilt_max_deg
    step = params.tilt_step_deg
    pos = np.arange(step, params.tilt_max_deg + 1e-6, step)
    neg = -np.arange(step, -lo + 1e-6, step)
    if params.scheme == "bidirectional":
        start = max(lo, min(params.bidirectional_start_deg, params.tilt_max_deg))
        grid = np.concatenate([neg[::-1], [0.0], pos])
        up = grid[grid >= start - 1e-6]
        down = grid[grid < start - 1e-6][::-1]
        order = np.concatenate([up, down])
    else:
        order, i, j, side = [0.0], 0, 0, 1
        while i < len(pos) or j < len(neg):
            for _ in range(2):
                if side > 0 and i < len(pos):
                    order.append(pos[i])
                    i += 1
                elif side < 0 and j < len(neg):
                    order.append(neg[j])
                    j += 1
            side = -side
        order = np.array(order)
    weights = 1.0 / np.cos(np.radians(order)) if params.dose_cos_scaling else np.ones(len(order))
    per_tilt = params.dose_e_per_a2 * weights / weights.sum()
    before = np.concatenate([[0.0], np.cumsum(per_tilt)[:-1]])
    return order.astype(np.float64), np.stack([before, per_tilt], axis=1)


# --- projection and back-projection ----------------------------------------------------------

def _interp_weights(n_in: int, coords: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Linear interpolation indices and weights for positions `coords` on 0..n_in-1 (zero
    weight outside)."""
    i0 = torch.floor(coords)
    f = (coords - i0).float()
    i0 = i0.long()
    i1 = i0 + 1
    w0 = (1 - f) * ((i0 >= 0) & (i0 < n_in))
    w1 = f * ((i1 >= 0) & (i1 < n_in))
    return i0.clamp(0, n_in - 1), i1.clamp(0, n_in - 1), w0, w1


def _projector(angles_deg: list[float], nz: int, nx: int, supersample: bool) -> torch.Tensor:
    """Sparse CSR matrix [n_tilts * nx, nz * nx]: detector pixel (tilt, x') from the (z, x)
    grid of one y plane. Each row holds 2 * nz * n_sub linear-interpolation weights, already
    sorted by column (z-major), so the matrix is built directly without sorting."""
    cz, cx = (nz - 1) / 2, (nx - 1) / 2
    z = torch.arange(nz, dtype=torch.float64)[:, None]
    base = (torch.arange(nz) * nx)[:, None]
    n_sub = max(max(1, math.ceil(1 / math.cos(math.radians(a)) - 0.25)) if supersample else 1
                for a in angles_deg)
    cols, vals = [], []
    for angle in angles_deg:
        th = math.radians(float(angle))
        c, s = math.cos(th), math.sin(th)
        for k in range(n_sub):
            xp = torch.arange(nx, dtype=torch.float64)[None, :] + (k + 0.5) / n_sub - 0.5
            xs = cx + (xp - cx - (z - cz) * s) / c  # [z, x']: where the ray crosses plane z
            i0, i1, w0, w1 = _interp_weights(nx, xs)
            scale = 1.0 / (n_sub * c)  # path length through a plane, averaged over sub-rays
            cols.append(torch.stack([base + i0, base + i1], -1).permute(1, 0, 2))  # [x', z, 2]
            vals.append(torch.stack([w0, w1], -1).permute(1, 0, 2) * scale)
    n_t = len(angles_deg)
    # Sub-rays of one detector pixel end up in the same row: gather them per (tilt, x').
    col = torch.stack(cols).reshape(n_t, n_sub, nx, nz * 2).permute(0, 2, 1, 3)
    val = torch.stack(vals).reshape(n_t, n_sub, nx, nz * 2).permute(0, 2, 1, 3)
    per_row = n_sub * nz * 2
    col = col.reshape(n_t * nx, per_row)
    val = val.reshape(n_t * nx, per_row)
    if n_sub > 1:  # keep columns sorted within each row
        col, order = torch.sort(col, dim=1, stable=True)
        val = torch.gather(val, 1, order)
    crow = torch.arange(n_t * nx + 1) * per_row
    return _csr(crow, col.reshape(-1), val.reshape(-1).float(), (n_t * nx, nz * nx))


def _csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, size: tuple[int, int]
         ) -> torch.Tensor:
    """A CSR matrix, valid by construction (torch's beta-API warning silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, val, size=size, check_invariants=False)


def _chunks(angles: list[float], size: int) -> list[tuple[int, list[float]]]:
    return [(i, angles[i:i + size]) for i in range(0, len(angles), size)]


def project(volume: np.ndarray, angles_deg: np.ndarray | list[float],
            supersample: bool = True) -> np.ndarray:
    """Line integrals (in voxels) through `volume` [z, y, x] at each tilt about Y.

    Returns [n_tilts, y, x]: P(y, x') = 1/cos(theta) sum_z f(z, y, x(z, x')) with the ray
    crossing plane z at x = cx + (x' - cx - (z - cz) sin(theta)) / cos(theta), linearly
    interpolated. Every y plane is independent, so the whole series is one sparse-times-dense
    product per chunk of tilts. Outside the box counts as zero. At high tilt the plane is
    sampled 1/cos(theta) more coarsely than the detector, so rays are supersampled.
    """
    nz, ny, nx = volume.shape
    angles = [float(a) for a in np.atleast_1d(angles_deg)]
    with torch.inference_mode():
        dense = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
        dense = dense.permute(0, 2, 1).reshape(nz * nx, ny).contiguous()  # [(z, x), y]
        out = np.empty((len(angles), ny, nx), dtype=np.float32)
        for i, chunk in _chunks(angles, 8):
            proj = _projector(chunk, nz, nx, supersample) @ dense  # [(t, x'), y]
            out[i:i + len(chunk)] = proj.reshape(len(chunk), nx, ny).transpose(1, 2).numpy()
    return out


def backproject(projections: np.ndarray, angles_deg: np.ndarray | list[float],
                nz: int) -> np.ndarray:
    """Unweighted back-projection of [n_tilts, y, x] into [nz, y, x]: each voxel (z, x) takes
    the detector value at x' = cx + (x - cx) cos(theta) + (z - cz) sin(theta) (linear
    interpolation on the detector, so only approximately the adjoint of `project`)."""
    n, ny, nx = projections.shape
    cz, cx = (nz - 1) / 2, (nx - 1) / 2
    z = torch.arange(nz, dtype=torch.float64)[:, None]
    x = torch.arange(nx, dtype=torch.float64)[None, :]
    angles = [float(a) for a in np.atleast_1d(angles_deg)]
    acc = torch.zeros(nz * nx, ny, dtype=torch.float32)
    with torch.inference_mode():
        for i, chunk in _chunks(angles, 16):
            cols, vals = [], []
            for t, angle in enumerate(chunk):
                th = math.radians(angle)
                xp = cx + (x - cx) * math.cos(th) + (z - cz) * math.sin(th)  # [z, x]
                i0, i1, w0, w1 = _interp_weights(nx, xp)
                cols.append(torch.stack([i0, i1], -1) + t * nx)
                vals.append(torch.stack([w0, w1], -1))
            col = torch.stack(cols, 2).reshape(nz * nx, -1)  # rows (z, x): 2 per tilt, sorted
            val = torch.stack(vals, 2).reshape(nz * nx, -1)
            crow = torch.arange(nz * nx + 1) * col.shape[1]
            mat = _csr(crow, col.reshape(-1), val.reshape(-1), (nz * nx, len(chunk) * nx))
            p = torch.from_numpy(np.ascontiguousarray(projections[i:i + len(chunk)],
                                                      dtype=np.float32))
            acc += mat @ p.transpose(1, 2).reshape(len(chunk) * nx, ny)
    return acc.reshape(nz, nx, ny).transpose(1, 2).contiguous().numpy()


def recon_filter(nx: int, angle_step_rad: float, kind: str = "ramp",
                 rolloff_start: float = 0.8, sirt_iterations: int = 10) -> np.ndarray:
    """1-D filter along x for weighted back-projection, on the rfft frequencies of nx.

    "ramp": R-weighting |k| x the angular step (the density of central sections falls as
    1/|k|), with a cosine roll-off from `rolloff_start` x Nyquist to Nyquist.
    "sirt": the ramp times the transfer of N SIRT iterations, 1 - (1 - k0/|k|)^N (each
    iteration adds a back-projection, whose blur is 1/|k|; k0 = 1/256 cycles/pixel is the
    step size relative to the lowest frequencies): a low-pass that opens with N, as in the
    SIRT-like filters of IMOD and tomo3d (Zeng 2012).
    """
    k = np.fft.rfftfreq(nx)  # cycles per pixel, 0..0.5
    ramp = np.abs(k)
    ramp[0] = 0.25 / nx  # the DC term of a discrete ramp (its mean over the first bin)
    weight = ramp * angle_step_rad
    if kind == "sirt":
        k0 = 1.0 / 256.0
        ratio = np.minimum(1.0, k0 / np.maximum(ramp, 1e-12))
        weight = weight * (1.0 - (1.0 - ratio) ** sirt_iterations)
    elif kind != "ramp":
        raise ValueError(f"recon_filter: kind must be 'ramp' or 'sirt', got {kind!r}")
    taper = np.ones_like(k)
    t = (k / 0.5 - rolloff_start) / max(1e-6, 1.0 - rolloff_start)
    roll = t > 0
    taper[roll] = 0.5 * (1 + np.cos(math.pi * np.clip(t[roll], 0, 1)))
    return (weight * taper).astype(np.float32)


def wbp(projections: np.ndarray, angles_deg: np.ndarray | list[float], nz: int,
        kind: str = "ramp", rolloff_start: float = 0.8, sirt_iterations: int = 10
        ) -> np.ndarray:
    """Weighted back-projection: filter each projection row along x, then back-project."""
    n, ny, nx = projections.shape
    pad = 2 * nx  # zero padding against wrap-around of the filter
    angles = np.sort(np.asarray(angles_deg, dtype=np.float64))
    step = math.radians(float(np.ptp(angles)) / max(1, n - 1)) if n > 1 else math.pi
    h = recon_filter(pad, step, kind, rolloff_start, sirt_iterations)
    with torch.inference_mode():
        p = torch.from_numpy(np.ascontiguousarray(projections, dtype=np.float32))
        spec = torch.fft.rfft(p, n=pad, dim=-1) * torch.from_numpy(h)
        filtered = torch.fft.irfft(spec, n=pad, dim=-1)[..., :nx].contiguous().numpy()
    return backproject(filtered, angles_deg, nz)


# --- contrast transfer -----------------------------------------------------------------------

def chi(k_per_a: np.ndarray, defocus_um: float, voltage_kv: float = 300.0,
        cs_mm: float = 2.7) -> np.ndarray:
    """Phase aberration chi(k) (rad); defocus < 0 is underfocus."""
    lam = wavelength_a(voltage_kv)
    dz = -defocus_um * 1e4
    cs = cs_mm * 1e7
    k2 = np.asarray(k_per_a, dtype=np.float64) ** 2
    return math.pi * lam * dz * k2 - 0.5 * math.pi * cs * lam**3 * k2 * k2


def ctf_1d(k_per_a: np.ndarray, defocus_um: float, voltage_kv: float = 300.0,
           cs_mm: float = 2.7, amplitude_contrast: float = 0.07, b_factor_a2: float = 0.0
           ) -> np.ndarray:
    """Weak-phase CTF sqrt(1 - w^2) sin(chi) + w cos(chi), times exp(-B k^2 / 4).

    Positive: dense matter dark. Zeros where chi = n pi - arcsin(w)."""
    w = amplitude_contrast
    c = chi(k_per_a, defocus_um, voltage_kv, cs_mm)
    env = np.exp(-b_factor_a2 * np.asarray(k_per_a, dtype=np.float64) ** 2 / 4.0)
    return (math.sqrt(1 - w * w) * np.sin(c) + w * np.cos(c)) * env


def ctf_zeros_k(defocus_um: float, n_zeros: int, voltage_kv: float = 300.0, cs_mm: float = 2.7,
                amplitude_contrast: float = 0.07) -> np.ndarray:
    """Analytic spatial frequencies (1/Å) of the first CTF zeros: chi(k) = n pi - arcsin(w),
    solved as a quadratic in k^2 (the root on the rising branch of chi)."""
    lam = wavelength_a(voltage_kv)
    dz = -defocus_um * 1e4
    cs = cs_mm * 1e7
    a = 0.5 * math.pi * cs * lam**3
    b = math.pi * lam * dz
    out = []
    n = 1
    while len(out) < n_zeros:
        target = n * math.pi - math.asin(amplitude_contrast)
        disc = b * b - 4 * a * target
        if disc < 0:
            break
        out.append(math.sqrt((b - math.sqrt(disc)) / (2 * a)))
        n += 1
    return np.array(out)


def _freq_grid(ny: int, nx: int, pixel_a: float) -> tuple[np.ndarray, np.ndarray]:
    ky = np.fft.fftfreq(ny, d=pixel_a)[:, None]
    kx = np.fft.fftfreq(nx, d=pixel_a)[None, :]
    return ky, kx


def ctf_2d(shape_yx: tuple[int, int], pixel_a: float, defocus_um: float, **kw: float
           ) -> np.ndarray:
    """The weak-phase CTF on an FFT grid (unshifted), for tests and display."""
    ky, kx = _freq_grid(*shape_yx, pixel_a)
    return ctf_1d(np.sqrt(ky * ky + kx * kx), defocus_um, **kw)


def shot_noise(expected_counts: np.ndarray, rng: np.random.Generator,
               poisson: bool = True) -> np.ndarray:
    """Electron counts: Poisson (or its Gaussian limit) around the expected counts."""
    lam = np.maximum(expected_counts, 0.0)
    if poisson:
        return rng.poisson(lam).astype(np.float32)
    return (lam + np.sqrt(lam) * rng.standard_normal(lam.shape)).astype(np.float32)


@lru_cache(maxsize=4)
def _fourier_terms(ny: int, nx: int, pixel_a: float) -> dict[str, torch.Tensor]:
    """k^2 on the full and the half (rfft) grid, and the pixel sinc MTF (float32 tensors)."""
    ky, kx = _freq_grid(ny, nx, pixel_a)
    kxr = np.fft.rfftfreq(nx, d=pixel_a)[None, :]
    return {"k2": torch.from_numpy((ky * ky + kx * kx).astype(np.float32)),
            "k2_half": torch.from_numpy((ky * ky + kxr * kxr).astype(np.float32)),
            "ky_half": torch.from_numpy(np.broadcast_to(ky, (ny, kxr.shape[1])).astype(
                np.float32).copy()),
            "kx_half": torch.from_numpy(np.broadcast_to(kxr, (ny, kxr.shape[1])).astype(
                np.float32).copy()),
            "mtf_half": torch.from_numpy((np.sinc(ky * pixel_a) * np.sinc(kxr * pixel_a))
                                         .astype(np.float32))}


def image_intensity(projected_v_a: np.ndarray, angle_deg: float, defocus_um: float,
                    b_factor_a2: float, pixel_a: float, params: MicroscopeParams,
                    shift_px: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Noise-free image intensity [y, x] (1 = unscattered beam) of a projected potential
    (V * Å) at one tilt.

    The dose-dependent B-factor damps the specimen's projected potential (and a residual
    alignment shift moves it); the exit wave exp((i - a) sigma Vp) (a = w / sqrt(1 - w^2):
    amplitude contrast as an absorption proportional to the potential) goes through the lens
    exp(i chi); the defocus changes across x with the height of the tilted specimen (strips
    at most 0.15 um of defocus apart, linearly blended); the detector's pixel MTF last.
    """
    ny, nx = projected_v_a.shape
    sigma = interaction_constant(params.voltage_kv)
    w = params.amplitude_contrast
    a = w / math.sqrt(1 - w * w)
    lam = wavelength_a(params.voltage_kv)
    terms = _fourier_terms(ny, nx, float(pixel_a))
    with torch.inference_mode():
        vp = torch.from_numpy(np.ascontiguousarray(projected_v_a, dtype=np.float32))
        env = torch.exp(-b_factor_a2 / 4.0 * terms["k2_half"])
        spec = torch.fft.rfft2(vp) * env
        if shift_px != (0.0, 0.0):  # residual alignment error: a sub-pixel shift
            ramp = -2 * math.pi * pixel_a * (terms["ky_half"] * shift_px[0]
                                             + terms["kx_half"] * shift_px[1])
            spec = spec * torch.polar(torch.ones_like(ramp), ramp)
        phase = torch.fft.irfft2(spec, s=(ny, nx)) * sigma
        wave_spec = torch.fft.fft2(torch.polar(torch.exp(-a * phase), phase))
        # Height of the specimen across x at this tilt: x sin(theta) (tilt axis at the centre).
        x_um = (np.arange(nx) - (nx - 1) / 2) * pixel_a * 1e-4
        dfs = defocus_um + x_um * math.sin(math.radians(angle_deg))
        span = float(dfs.max() - dfs.min())
        n_strips = max(1, min(16, math.ceil(span / 0.15)))
        centres = np.linspace(dfs.min(), dfs.max(), n_strips) if n_strips > 1 else [defocus_um]
        k2 = terms["k2"]
        cs_term = 0.5 * math.pi * params.cs_mm * 1e7 * lam**3 * k2 * k2
        intensity = torch.zeros(ny, nx, dtype=torch.float32)
        weights_sum = np.zeros(nx)
        for df in centres:
            chi_k = math.pi * lam * (-df * 1e4) * k2 - cs_term
            image = torch.fft.ifft2(wave_spec * torch.polar(torch.ones_like(chi_k), chi_k))
            image = image.real ** 2 + image.imag ** 2
            if n_strips == 1:
                intensity, weights_sum[:] = image, 1.0
                break
            wx = np.clip(1.0 - np.abs(dfs - df) / (span / (n_strips - 1)), 0.0, 1.0)
            weights_sum += wx
            intensity += image * torch.from_numpy(wx.astype(np.float32))[None, :]
        intensity = intensity / torch.from_numpy(weights_sum.astype(np.float32))[None, :]
        if params.detector_mtf:
            intensity = torch.fft.irfft2(torch.fft.rfft2(intensity) * terms["mtf_half"],
                                         s=(ny, nx))
    return intensity.numpy()


# --- the whole acquisition -------------------------------------------------------------------

@dataclass
class TiltSeries:
    """Normalised micrographs (contrast, mean 0) and what produced them."""

    images: np.ndarray  # [n, y, x] float32, I / mean(I) - 1: dense matter negative
    angles_deg: np.ndarray  # nominal angles (what reconstruction uses), acquisition order
    info: dict[str, Any] = field(default_factory=dict)


def acquire(potential_v: np.ndarray, pixel_a: float, params: MicroscopeParams,
            rng: np.random.Generator, thickness_nm: float, slab_normal_zyx: np.ndarray,
            progress: Progress | None = None) -> TiltSeries:
    """Record a tilt series of a potential map [z, y, x] (volts, voxel = pixel_a).

    `potential_v` is modified during the call and restored (to spare a whole-volume copy).
    """
    angles, dose = tilt_angles(params)
    n = len(angles)
    true_angles = angles + rng.normal(scale=params.angle_sigma_deg, size=n)
    shifts = rng.normal(scale=params.shift_sigma_px, size=(n, 2))
    # The box is a window into a larger specimen: rays leaving it sideways would see nothing.
    # Project only the fluctuation about each z plane's mean, and add the mean's projection
    # analytically, i.e. treat the specimen beyond the box as its average.
    plane_mean = potential_v.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)
    potential_v -= plane_mean[:, None, None]
    t_start = time.perf_counter()
    try:
        images = project(potential_v, true_angles)
    finally:
        potential_v += plane_mean[:, None, None]
    projection_s = time.perf_counter() - t_start
    if progress is not None:
        progress("projection", 1.0)
    normal = np.asarray(slab_normal_zyx, dtype=np.float64)
    b_factors, mean_counts, snr = [], [], None
    zero = int(np.argmin(np.abs(angles)))
    for t in range(n):
        th = math.radians(true_angles[t])
        vp = (images[t] + float(plane_mean.sum()) / math.cos(th)) * pixel_a  # V * Å
        b = params.b_factor_base_a2 + params.b_per_dose_a2 * (dose[t, 0] + 0.5 * dose[t, 1])
        # Inelastic loss along the path through the slab: thickness / cos(beam, normal).
        beam = np.array([math.cos(th), 0.0, -math.sin(th)])
        path_nm = thickness_nm / max(0.1, abs(float(beam @ normal)))
        counts = dose[t, 1] * pixel_a**2 * math.exp(-path_nm / params.mean_free_path_nm)
        intensity = image_intensity(vp, float(true_angles[t]), params.defocus_um, b, pixel_a,
                                    params, shift_px=(float(shifts[t, 0]), float(shifts[t, 1])))
        if t == zero:  # SNR of the untilted image: contrast variance over shot-noise variance
            rel = intensity / intensity.mean()
            snr = float(rel.var() * counts * intensity.mean())
        images[t] = shot_noise(intensity * counts, rng, params.poisson)
        b_factors.append(b)
        mean_counts.append(counts)
        if progress is not None:
            progress("tilt series", (t + 1) / n)
    # Normalise as alignment/reconstruction software does: each image by its own mean.
    means = images.mean(axis=(1, 2), keepdims=True)
    images /= np.maximum(means, 1e-6)
    images -= 1.0
    info = {"angles_deg": [round(float(a), 3) for a in angles],
            "dose_before_e_per_a2": [round(float(d), 3) for d in dose[:, 0]],
            "b_factor_a2": [round(float(b), 1) for b in b_factors],
            "counts_per_pixel": [round(float(c), 2) for c in mean_counts],
            "snr_0deg": snr, "wavelength_a": wavelength_a(params.voltage_kv),
            "projection_s": projection_s,
            "ctf_noise_s": time.perf_counter() - t_start - projection_s}
    return TiltSeries(images, angles, info)


def reconstruct(series: TiltSeries, nz: int, params: MicroscopeParams) -> np.ndarray:
    """WBP (or SIRT-like) reconstruction, [nz, y, x] float32, dense matter negative."""
    order = np.argsort(series.angles_deg)
    return wbp(series.images[order], series.angles_deg[order], nz, params.recon_filter,
               params.rolloff_start, params.sirt_iterations)


def _fourier_crop(images: np.ndarray, ny: int, nx: int) -> np.ndarray:
    """Bin a stack [n, Y, X] to [n, ny, nx] by cropping its spectrum (no aliasing)."""
    spec = np.fft.fftshift(np.fft.fft2(images), axes=(-2, -1))
    Y, X = images.shape[-2:]
    y0, x0 = (Y - ny) // 2 + (Y % 2 == 0 and ny % 2 == 1), (X - nx) // 2
    crop = spec[:, y0:y0 + ny, x0:x0 + nx]
    out = np.fft.ifft2(np.fft.ifftshift(crop, axes=(-2, -1))).real * (ny * nx) / (Y * X)
    return out.astype(np.float32)


def simulate_tomogram(
    shape_zyx: tuple[int, int, int],
    voxel_size_a: float,
    seed: int = 0,
    progress: Progress | None = None,
    *,
    specimen: Any = None,
    microscope: MicroscopeParams | None = None,
    oversample: int = 1,
    tilt_range_deg: float | None = None,
    tilt_step_deg: float | None = None,
    defocus_um: float | None = None,
    dose_e_per_a2: float | None = None,
    thickness_nm: float | None = None,
) -> SynthResult:
    """A tomogram formed as a microscope does it, with its ground truth (a `SynthResult`).

    Parameters not given are drawn from their documented ranges (`SpecimenParams.sample`,
    `MicroscopeParams.sample`) with the seed; the keyword values override single draws.
    `oversample` > 1 simulates the specimen and tilt series on a finer grid and bins the
    images (Fourier crop) before reconstruction, as is done with real movies.
    """
    shape = tuple(int(s) for s in shape_zyx)
    params_seed, specimen_seed, noise_seed = np.random.SeedSequence(seed).spawn(3)
    params_rng = np.random.default_rng(params_seed)
    sp = specimen if specimen is not None else SpecimenParams.sample(params_rng)
    mp = microscope if microscope is not None else MicroscopeParams.sample(params_rng)
    if thickness_nm is not None:
        sp = replace(sp, thickness_nm=float(thickness_nm))
    if tilt_range_deg is not None:
        mp = replace(mp, tilt_max_deg=float(tilt_range_deg), tilt_min_deg=None)
    if tilt_step_deg is not None:
        mp = replace(mp, tilt_step_deg=float(tilt_step_deg))
    if defocus_um is not None:
        mp = replace(mp, defocus_um=float(defocus_um))
    if dose_e_per_a2 is not None:
        mp = replace(mp, dose_e_per_a2=float(dose_e_per_a2))
    os_ = max(1, int(oversample))
    fine_shape = tuple((n - 1) * os_ + 1 for n in shape)
    fine_a = voxel_size_a / os_
    extent_nm = (np.array(shape) - 1) * voxel_size_a / 10.0
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model = build_specimen(extent_nm, sp, np.random.default_rng(specimen_seed), progress)
    spec = render_specimen(model, fine_shape, fine_a, progress)
    timings["specimen_s"] = time.perf_counter() - t0
    if progress is not None:
        progress("specimen", 1.0)
    t0 = time.perf_counter()
    series = acquire(spec.potential_v, fine_a, mp, np.random.default_rng(noise_seed),
                     sp.thickness_nm, model.slab.normal, progress)
    timings["projection_s"] = series.info["projection_s"]
    timings["ctf_noise_s"] = series.info["ctf_noise_s"]
    del spec.potential_v
    if os_ > 1:
        series.images = _fourier_crop(series.images, shape[1], shape[2])
    t0 = time.perf_counter()
    tomogram = reconstruct(series, shape[0], mp)
    _standardise(tomogram)
    timings["reconstruction_s"] = time.perf_counter() - t0
    if progress is not None:
        progress("reconstruction", 1.0)
    labels = spec.labels[::os_, ::os_, ::os_] if os_ > 1 else spec.labels
    particles = [(n, x / os_, y / os_, z / os_) for n, x, y, z in spec.particles]
    filaments = [(n, pts / os_) for n, pts in spec.filaments]
    info = {"simulator": "microscope", "seed": seed, "oversample": os_,
            "specimen": spec.info, "microscope": asdict(mp),
            "acquisition": series.info, "snr": series.info.get("snr_0deg"),
            "counts": {k: v for k, v in spec.info["counts"].items()},
            "timings": timings}
    return SynthResult(tomogram, np.ascontiguousarray(labels), particles, float(voxel_size_a),
                       info=jsonable(info), filaments=filaments)


def _standardise(volume: np.ndarray) -> None:
    """In place: mean 0, std 1 (statistics in float64, slab by slab)."""
    total = total_sq = 0.0
    for z in range(volume.shape[0]):
        plane = volume[z].astype(np.float64)
        total += plane.sum()
        total_sq += (plane * plane).sum()
    mean = total / volume.size
    std = math.sqrt(max(total_sq / volume.size - mean * mean, 1e-30))
    volume -= np.float32(mean)
    volume *= np.float32(1.0 / std)
