"""core.microscope and core.specimen: the physics of image formation, not the pixels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tomolive.core import microscope as mic
from tomolive.core.classes import SYNTH_CLASS_NAMES
from tomolive.core.synth import synthesize


def test_relativistic_wavelength_and_interaction_constant():
    assert mic.wavelength_a(300.0) == pytest.approx(0.019687, rel=1e-4)
    assert mic.wavelength_a(200.0) == pytest.approx(0.025079, rel=1e-4)
    assert mic.interaction_constant(300.0) == pytest.approx(6.526e-4, rel=2e-3)


@pytest.mark.parametrize("amplitude_contrast", [0.0, 0.07, 0.1])
@pytest.mark.parametrize("defocus_um", [-1.5, -3.0, -6.0])
def test_ctf_zeros_where_the_formula_puts_them(defocus_um, amplitude_contrast):
    k = np.linspace(1e-4, 0.2, 600_000)  # 1/Å
    ctf = mic.ctf_1d(k, defocus_um, amplitude_contrast=amplitude_contrast)
    crossings = k[:-1][np.sign(ctf[:-1]) != np.sign(ctf[1:])]
    analytic = mic.ctf_zeros_k(defocus_um, 6, amplitude_contrast=amplitude_contrast)
    assert len(analytic) == 6 and len(crossings) >= 6
    assert np.allclose(crossings[:6], analytic, rtol=1e-3)
    # The analytic zeros solve chi = n pi - arcsin(w).
    chi = mic.chi(analytic, defocus_um)
    assert np.allclose(chi, np.arange(1, 7) * math.pi - math.asin(amplitude_contrast),
                       atol=1e-6)
    # Underfocus: positive transfer (dense matter dark) at low frequency.
    assert ctf[np.searchsorted(k, 0.5 * analytic[0])] > 0


def test_imaged_white_noise_has_power_minima_at_the_ctf_zeros():
    """A weak white-noise phase object through the whole image formation (exit wave, lens,
    intensity): the radial power spectrum of the image dips at the predicted zeros."""
    rng = np.random.default_rng(0)
    n, pixel_a, defocus_um = 512, 4.0, -3.0
    params = mic.MicroscopeParams(amplitude_contrast=0.07, detector_mtf=False)
    sigma = mic.interaction_constant(300.0)
    vp = rng.standard_normal((n, n)).astype(np.float32) * (0.01 / sigma)  # 0.01 rad phase
    intensity = mic.image_intensity(vp, 0.0, defocus_um, 0.0, pixel_a, params)
    power = np.abs(np.fft.fft2(intensity - intensity.mean())) ** 2
    ky, kx = np.meshgrid(np.fft.fftfreq(n, pixel_a), np.fft.fftfreq(n, pixel_a), indexing="ij")
    k = np.sqrt(ky**2 + kx**2)
    zeros = mic.ctf_zeros_k(defocus_um, 4, amplitude_contrast=0.07)
    assert zeros[-1] < 0.5 / pixel_a

    def ring_power(k0: float, width: float = 0.0008) -> float:
        return float(power[np.abs(k - k0) < width].mean())

    for i, k0 in enumerate(zeros):
        # Between two zeros the CTF peaks (|ctf| ~ 1): the zero is far darker.
        k_lo = 0.5 * ((zeros[i - 1] if i else 0.5 * k0) + k0)
        k_hi = 0.5 * (k0 + (zeros[i + 1] if i + 1 < len(zeros) else k0 * 1.2))
        peak = min(ring_power(k_lo), ring_power(k_hi))
        assert ring_power(k0) < 0.1 * peak, (i, k0)
    # The image's contrast is 2 * ctf * phase in the weak-phase limit.
    mid = 0.5 * (zeros[0] + zeros[1]) * 0.0 + 0.5 * zeros[0]
    expected = (2 * mic.ctf_1d(np.array([mid]), defocus_um, amplitude_contrast=0.07)[0]) ** 2
    measured = ring_power(mid) / (0.01**2 * n * n)
    assert measured == pytest.approx(expected, rel=0.15)


def _noise_volume(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_reconstruction_has_the_missing_wedge():
    alpha = 55.0
    vol = _noise_volume((64, 6, 64))
    angles = np.arange(-alpha, alpha + 1e-6, 2.5)
    rec = mic.wbp(mic.project(vol, angles), angles, 64, rolloff_start=1.0)
    power = np.abs(np.fft.fftn(rec, axes=(0, 2))) ** 2
    kz = np.fft.fftfreq(64)[:, None, None]
    kx = np.fft.fftfreq(64)[None, None, :]
    k = np.sqrt(kz**2 + kx**2)
    band = (k > 0.05) & (k < 0.4)
    t = math.tan(math.radians(alpha))
    in_wedge = band & (np.abs(kz) > np.tan(math.radians(alpha + 8)) * np.abs(kx)) \
        & np.ones_like(power, dtype=bool)
    outside = band & (np.abs(kz) < np.tan(math.radians(alpha - 8)) * np.abs(kx)) \
        & np.ones_like(power, dtype=bool)
    assert t > 1
    ratio = power[in_wedge].mean() / power[outside].mean()
    assert ratio < 0.05, ratio


@pytest.mark.parametrize("alpha", [45.0, 60.0])
def test_point_reconstructs_with_the_expected_z_elongation(alpha):
    """Radermacher (1988): e = sqrt((a + sin a cos a) / (a - sin a cos a)) for tilts +-a."""
    n = 64
    z, x = np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2, indexing="ij")
    blob = np.exp(-(z**2 + x**2) / (2 * 1.5**2)).astype(np.float32)
    vol = np.repeat(blob[:, None, :], 3, axis=1)
    angles = np.arange(-alpha, alpha + 1e-6, 1.0)
    rec = mic.wbp(mic.project(vol, angles), angles, n, rolloff_start=1.0)[:, 1, :]
    c = n // 2
    assert np.unravel_index(np.argmax(rec), rec.shape) == (c, c)  # a point, where it was
    d = np.arange(-2, 3)

    def curvature(values: np.ndarray) -> float:  # f(d) ~ f0 - c d^2, least squares
        return -np.polyfit(d, values, 2)[0]

    e_measured = math.sqrt(curvature(rec[c, c - 2:c + 3]) / curvature(rec[c - 2:c + 3, c]))
    a = math.radians(alpha)
    e_theory = math.sqrt((a + math.sin(a) * math.cos(a)) / (a - math.sin(a) * math.cos(a)))
    assert e_measured == pytest.approx(e_theory, rel=0.25)
    assert e_measured > 1.2  # elongated along the beam


def test_projection_is_a_line_integral():
    # A uniform slab of thickness 20 projects to 20 / cos(tilt) away from the box edges.
    flat = mic.project(np.ones((20, 2, 200), np.float32), [0.0, 30.0, 60.0])
    for t, angle in enumerate((0.0, 30.0, 60.0)):
        assert flat[t, 0, 100] == pytest.approx(20.0 / math.cos(math.radians(angle)), rel=1e-3)
    # A point at (z, x) lands on x' = cx + (x - cx) cos + (z - cz) sin; back-projection draws
    # the line back through it.
    vol = np.zeros((21, 1, 41), np.float32)
    vol[15, 0, 25] = 1.0
    proj = mic.project(vol, [30.0], supersample=False)[0, 0]
    th = math.radians(30.0)
    x_expected = 20 + (25 - 20) * math.cos(th) + (15 - 10) * math.sin(th)
    # (the centroid of a sub-pixel-wide triangle sampled on pixels: within 0.15 px)
    assert float((proj * np.arange(41)).sum() / proj.sum()) == pytest.approx(x_expected,
                                                                             abs=0.15)
    back = mic.backproject(proj[None, None, :], [30.0], 21)[:, 0, :]
    assert np.unravel_index(np.argmax(back * (np.abs(np.arange(21) - 15) < 1)[:, None]),
                            back.shape) == (15, 25)


def test_shot_noise_variance_follows_the_dose():
    """Doubling the dose halves the relative noise variance of the normalised projections."""
    empty = np.zeros((8, 128, 128), np.float32)
    variances = []
    for dose in (60.0, 120.0):
        params = mic.MicroscopeParams(dose_e_per_a2=dose, tilt_max_deg=60.0, tilt_step_deg=30.0,
                                      detector_mtf=False, shift_sigma_px=0.0)
        series = mic.acquire(empty.copy(), 10.0, params, np.random.default_rng(1),
                             thickness_nm=0.0, slab_normal_zyx=np.array([1.0, 0, 0]))
        var = series.images.var(axis=(1, 2))
        expected = 1.0 / np.array(series.info["counts_per_pixel"])
        assert np.allclose(var, expected, rtol=0.05)
        variances.append(var.mean())
    assert variances[0] / variances[1] == pytest.approx(2.0, rel=0.05)
    # Thicker ice passes fewer electrons, more so at high tilt: noisier images there.
    params = mic.MicroscopeParams(dose_e_per_a2=100.0, tilt_step_deg=30.0, detector_mtf=False)
    series = mic.acquire(empty.copy(), 10.0, params, np.random.default_rng(1), thickness_nm=300.0,
                         slab_normal_zyx=np.array([1.0, 0, 0]))
    counts = dict(zip(series.angles_deg, series.info["counts_per_pixel"], strict=True))
    assert counts[60.0] < counts[30.0] < counts[0.0]


def test_tilt_schemes_and_accumulated_dose():
    p = mic.MicroscopeParams(tilt_max_deg=60.0, tilt_step_deg=3.0, dose_e_per_a2=123.0)
    angles, dose = mic.tilt_angles(p)
    assert len(angles) == 41 and sorted(angles) == pytest.approx(np.arange(-60, 61, 3.0))
    assert angles[0] == 0.0 and set(np.sign(angles[1:3])) == {1.0}  # groups of two
    assert dose[:, 1].sum() == pytest.approx(123.0)
    assert np.all(np.diff(dose[:, 0]) > 0)
    b = mic.MicroscopeParams(tilt_max_deg=60.0, tilt_step_deg=3.0, scheme="bidirectional",
                             bidirectional_start_deg=-20.0)
    angles, _ = mic.tilt_angles(b)
    assert angles[0] == pytest.approx(-21.0) or angles[0] == pytest.approx(-18.0)
    assert np.all(np.diff(angles[: np.argmax(angles) + 1]) > 0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = mic.MicroscopeParams.sample(rng)
        assert -6.0 <= s.defocus_um <= -1.5 and 50.0 <= s.tilt_max_deg <= 65.0
        assert 60.0 <= s.dose_e_per_a2 <= 150.0 and 1.0 <= s.tilt_step_deg <= 4.0


@pytest.fixture(scope="module")
def small():
    return synthesize((48, 128, 128), 10.0, seed=2)


def test_same_seed_same_tomogram(small):
    again = synthesize((48, 128, 128), 10.0, seed=2)
    assert np.array_equal(small.tomogram, again.tomogram)
    assert np.array_equal(small.labels, again.labels)
    assert small.particles == again.particles
    other = synthesize((48, 128, 128), 10.0, seed=5)
    assert not np.array_equal(small.labels, other.labels)
    json.dumps(small.info)  # the drawn parameters are recorded, JSON-serialisable
    assert small.info["simulator"] == "microscope"
    assert {"specimen", "microscope", "acquisition"} <= set(small.info)


def test_labels_on_the_grid_every_class_present_and_protein_dark(small):
    r = small
    assert r.tomogram.shape == r.labels.shape == (48, 128, 128)
    assert r.tomogram.dtype == np.float32 and r.labels.dtype == np.int8
    assert abs(float(r.tomogram.mean())) < 1e-3 and abs(float(r.tomogram.std()) - 1) < 1e-3
    counts = np.bincount(r.labels.ravel().astype(np.int64), minlength=6)
    for i, name in enumerate(SYNTH_CLASS_NAMES, start=1):
        assert counts[i] > 100, f"{name}: {counts[i]} voxels"
    background = float(r.tomogram[r.labels == 0].mean())
    for name in ("ribosome", "gold", "microtubule"):
        i = SYNTH_CLASS_NAMES.index(name) + 1
        assert float(r.tomogram[r.labels == i].mean()) < background - 0.1, name
    for name, x, y, z in r.particles:
        zi, yi, xi = (int(round(v)) for v in (z, y, x))
        assert r.labels[zi, yi, xi] == SYNTH_CLASS_NAMES.index(name) + 1, (name, x, y, z)
    assert {n for n, _ in r.filaments} == {"microtubule", "actin"}
    assert r.info["specimen"]["crowding_achieved"] > 0.1


def test_overrides_and_cli_parameters_reach_the_simulation():
    r = synthesize((24, 64, 64), 10.0, seed=1, tilt_range_deg=50.0, tilt_step_deg=5.0,
                   defocus_um=-2.0, dose_e_per_a2=80.0, thickness_nm=120.0)
    m = r.info["microscope"]
    assert (m["tilt_max_deg"], m["tilt_step_deg"], m["defocus_um"], m["dose_e_per_a2"]) == (
        50.0, 5.0, -2.0, 80.0)
    assert r.info["specimen"]["params"]["thickness_nm"] == 120.0
    assert max(r.info["acquisition"]["angles_deg"]) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="simulator must be"):
        synthesize((24, 64, 64), 10.0, simulator="polnet")
