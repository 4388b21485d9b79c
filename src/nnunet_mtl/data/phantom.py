"""Embedded phantom dataset (SPEC section 9): synthetic CT crops around the pancreas in the published layout.

Why it exists: import, planning, training, prediction and evaluation must run without the real (non-public) data,
and the learning problem should resemble the real one. Each case is drawn in millimetres around a crop-centred
frame: fat background, partial liver/spleen/kidneys/vertebra, stomach and bowel with gas and fluid, the major
vessels (aorta, IVC, SMA with its fat collar, SMV/portal vein, splenic and left renal vein), a curved lobulated
pancreas (label 1) with its duct, and a lesion (label 2) whose appearance defines the subtype:

* 0: hypodense, irregular, ill-defined solid mass (adenocarcinoma-like), often with a dilated upstream duct;
* 1: near-water cyst with a thin enhancing wall and septa (cystic neoplasm-like);
* 2: hyper-enhancing, round, well-circumscribed mass (neuroendocrine-like).

About one case in eight is atypical (iso-attenuating or necrotic solid mass, proteinaceous cyst with thick septa,
weakly enhancing or cystic enhancing mass), so the subtypes overlap as real ones do. The drawing is blurred (partial
volume, stronger along z), gets correlated noise and is stored as int16 HU. Masks carry the real data's float quirk
on about three quarters of the cases. The anatomy is always drawn in the same array order; a quarter of the headers
get a flipped (x, y) direction, so downstream code must copy geometry rather than assume it. Every case is seeded
from ``(seed, split, subtype, index)``, so changing the counts of one split or subtype leaves the content of the
other cases unchanged. Lesion sizes (10 % tiny, 78 % medium, 12 % large) are stratified within each split and
subtype, as a real split would be, rather than drawn case by case.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunet_mtl import __version__

SUBTYPES = (0, 1, 2)
REAL_TRAIN = (62, 106, 84)
REAL_VALIDATION = (9, 15, 12)
REAL_TEST = 72
# The real data stores label 1 as this float on about three quarters of its masks (SPEC section 2).
QUIRK_ONE = np.float32(1.0000152587890625)
QUIRK_FRACTION = 0.75
ATYPICAL_FRACTION = 0.12
SIZE_CLASSES = ("tiny", "medium", "large")
SIZE_SHARES = (0.10, 0.78, 0.12)
MAX_CASES = 1000  # ids are three digits


@dataclass(frozen=True)
class Preset:
    """Crop size and spacing ranges, (z, y, x) order, and the default split counts."""

    name: str
    shape_lo: tuple[int, int, int]
    shape_hi: tuple[int, int, int]
    spacing_z: tuple[float, float]
    spacing_xy: tuple[float, float]
    train: tuple[int, int, int]
    validation: tuple[int, int, int]
    test: int
    noise_scale: float = 1.0  # image noise relative to a real scan at the real voxel size


PRESETS = {
    # Tests and the 2-core CPU demo: a real crop at the coarse end of real in-plane spacing (about 1.05 mm, a
    # 500-540 mm reconstruction field). At 1.45 mm a one-voxel boundary error cost twice the Dice it costs on a
    # real 0.73 mm scan (truth eroded by one voxel in-plane: Dice 0.83 there, 0.92 at full size, 0.88 here).
    # Each voxel averages about 1.4 x 1.4 real ones, so its noise is 0.7 of a real scan's.
    "small": Preset("small", (24, 100, 122), (32, 122, 155), (1.8, 2.2), (1.0, 1.1), (15, 25, 20), (3, 5, 4), 36,
                    noise_scale=0.7),
    # Real crop sizes and spacing (pixel spacing = a 340-430 mm reconstruction field over 512 pixels).
    "full": Preset("full", (40, 120, 150), (90, 260, 300), (1.75, 2.5), (340 / 512, 430 / 512), REAL_TRAIN,
                   REAL_VALIDATION, REAL_TEST),
}


@dataclass(frozen=True)
class Site:
    """A scanner and protocol profile, plus the lesion appearance mixture of its population.

    Sites exist to test whether a classifier carries over to data it was not built on: train on one, test on
    another. Each field changes a range the drawing samples from (site A's values are the original generator's, so
    site A reproduces earlier phantoms exactly); B and C differ in every way a real second hospital would: slice
    thickness and pixel size (the field of view is kept), reconstruction kernel (noise level and grain, blur),
    contrast timing (all enhancement scaled by tens of HU), a HU calibration offset, and which lesion appearances
    its patients bring (how hypodense solid masses are, cyst content and septa, how bright hyper-enhancing masses
    are, the atypical share).
    """

    name: str
    z_scale: float = 1.0  # slice spacing relative to the preset's (the field of view is kept)
    xy_scale: float = 1.0  # pixel spacing relative to the preset's
    noise_scale: float = 1.0  # noise SD relative to site A
    noise_grain: float = 0.7  # in-plane noise correlation, sigma of the filter in voxels: the kernel's grain
    blur_scale: float = 1.0  # point-spread sigma relative to site A (sharp kernel < 1 < smooth kernel)
    contrast: tuple[float, float] = (0.85, 1.15)  # enhancement scale (contrast timing)
    hu_offset: tuple[float, float] = (0.0, 0.0)  # scanner HU calibration offset
    solid_enhancement: tuple[float, float] = (5.0, 28.0)  # subtype 0 enhancement (parenchyma: 60-85)
    solid_irregularity: float = 0.22  # subtype 0 outline roughness (fraction of the radius)
    cyst_fluid_hu: tuple[float, float] = (0.0, 18.0)
    cyst_locules: tuple[float, float, float] = (0.4, 0.35, 0.25)  # P(0, 1, 2 daughter locules) of larger cysts
    cyst_wall_mm: tuple[float, float] = (0.5, 0.9)
    hyper_enhancement: tuple[float, float] = (115.0, 165.0)  # subtype 2 enhancement
    atypical_fraction: float = ATYPICAL_FRACTION


SITES = {
    "A": Site("A"),
    # Thick slices, thin pixels, a sharp kernel (more, finer-grained noise, less blur), a late venous phase (weaker
    # enhancement), +0..12 HU calibration; its solid masses are less hypodense, its cysts mostly unilocular with a
    # little more protein, its hyper-enhancing masses dimmer, and more of its lesions atypical.
    "B": Site("B", z_scale=1.5, xy_scale=0.82, noise_scale=1.35, noise_grain=0.45, blur_scale=0.7,
              contrast=(0.62, 0.88), hu_offset=(0.0, 12.0), solid_enhancement=(14.0, 38.0), solid_irregularity=0.14,
              cyst_fluid_hu=(4.0, 24.0), cyst_locules=(0.65, 0.25, 0.10), cyst_wall_mm=(0.4, 0.7),
              hyper_enhancement=(88.0, 140.0), atypical_fraction=0.20),
    # Thin slices, a smooth kernel (less, coarser noise, more blur), an early (pancreatic) phase with strong
    # enhancement, -10..0 HU calibration; very hypodense, rough solid masses, clear multilocular cysts with thick
    # walls, very bright hyper-enhancing masses.
    "C": Site("C", z_scale=0.75, xy_scale=1.0, noise_scale=0.8, noise_grain=1.1, blur_scale=1.4,
              contrast=(1.08, 1.38), hu_offset=(-10.0, 0.0), solid_enhancement=(0.0, 22.0), solid_irregularity=0.3,
              cyst_fluid_hu=(0.0, 12.0), cyst_locules=(0.2, 0.4, 0.4), cyst_wall_mm=(0.8, 1.3),
              hyper_enhancement=(130.0, 185.0), atypical_fraction=0.16),
}


# ------------------------------------------------------------------------------------------------ drawing tools


class _Canvas:
    """The case being drawn: voxel-centre coordinates in mm (crop-centred, z/y/x), the HU and label volumes."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
        self.shape = shape
        self.spacing = spacing
        self.axes = [((np.arange(n) - (n - 1) / 2) * d).astype(np.float32) for n, d in zip(shape, spacing)]
        self.half = np.array([n * d / 2 for n, d in zip(shape, spacing)])
        self.hu = np.zeros(shape, np.float32)
        self.label = np.zeros(shape, np.uint8)

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Voxel slices covering the mm box [lo, hi]; None when it misses the crop."""
        slices = []
        for ax, a, b in zip(self.axes, lo, hi):
            i, j = np.searchsorted(ax, a), np.searchsorted(ax, b, side="right")
            if j <= i:
                return None
            slices.append(slice(int(i), int(j)))
        return tuple(slices)

    def grid(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable z, y, x coordinates of a box."""
        z, y, x = (ax[s] for ax, s in zip(self.axes, box))
        return z[:, None, None], y[None, :, None], x[None, None, :]

    def paint(self, box: tuple[slice, slice, slice], sd: np.ndarray, value: np.ndarray | float,
              edge: float = 0.7) -> None:
        """Blend ``value`` in where the signed distance ``sd`` (mm) is negative, with a linear ramp ``edge`` mm
        wide across the surface: sub-voxel boundaries instead of staircase ones."""
        weight = np.clip(0.5 - sd / edge, 0.0, 1.0)
        region = self.hu[box]
        region += weight * (value - region)


def _noise(rng: np.random.Generator, canvas: _Canvas, box: tuple[slice, slice, slice], scale: float,
           waves: int = 24) -> np.ndarray:
    """Smooth zero-mean, unit-variance random field with correlation length ~``scale`` mm (random Fourier
    features). Written as cos(a + b) = cos a cos b - sin a sin b so the 3D sum is two matrix products."""
    k = rng.normal(0.0, 1.0 / scale, size=(waves, 3)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, waves).astype(np.float32)
    z, y, x = (ax[s] for ax, s in zip(canvas.axes, box))
    az = z[:, None] * k[None, :, 0] + phase[None, :]
    byx = ((k[:, 1:2] * y[None])[:, :, None] + (k[:, 2:3] * x[None])[:, None, :]).reshape(waves, -1)
    # einsum rather than @: BLAS threads spin against each other on a busy small machine (4x slower here).
    field = np.einsum("zw,wp->zp", np.cos(az), np.cos(byx)) - np.einsum("zw,wp->zp", np.sin(az), np.sin(byx))
    return (field * np.float32(np.sqrt(2.0 / waves))).reshape(len(z), len(y), len(x))


def _curve(ctrl: np.ndarray, step: float) -> np.ndarray:
    """Catmull-Rom curve through control points (mm), resampled every ~``step`` mm."""
    p = np.vstack([2 * ctrl[0] - ctrl[1], ctrl, 2 * ctrl[-1] - ctrl[-2]])
    t = np.linspace(0, 1, 24, endpoint=False)[:, None]
    pieces = [0.5 * (2 * p[i] + (p[i + 1] - p[i - 1]) * t + (2 * p[i - 1] - 5 * p[i] + 4 * p[i + 1] - p[i + 2]) * t ** 2
                     + (3 * p[i] - p[i - 1] - 3 * p[i + 1] + p[i + 2]) * t ** 3) for i in range(1, len(p) - 2)]
    dense = np.vstack([*pieces, ctrl[-1:]])
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(dense, axis=0), axis=1))])
    at = np.linspace(0, arc[-1], max(2, int(np.ceil(arc[-1] / step)) + 1))
    return np.stack([np.interp(at, arc, dense[:, i]) for i in range(3)], axis=1)


def _tube(canvas: _Canvas, ctrl: np.ndarray, radii: np.ndarray | float, margin: float = 3.0,
          ) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray] | None:
    """Signed distance (mm) to a tube of varying radius along a smooth curve (a union of balls), on the tube's
    bounding box. Returns (box, sd, curve points), or None when the tube misses the crop."""
    radii = np.broadcast_to(np.asarray(radii, float), (len(ctrl),))
    # Balls a step h apart leave surface ripples of ~h^2 / 8r: h = 0.3 r, or half a voxel for thin tubes.
    pts = _curve(ctrl, max(0.3 * radii.min(), 0.5 * min(canvas.spacing)))
    r = np.interp(np.linspace(0, 1, len(pts)), np.linspace(0, 1, len(ctrl)), radii)
    reach = r + margin
    box = canvas.box((pts - reach[:, None]).min(0), (pts + reach[:, None]).max(0))
    if box is None:
        return None
    axes = [ax[s] for ax, s in zip(canvas.axes, box)]
    sd = np.full([len(a) for a in axes], np.inf, np.float32)
    start = np.stack([np.searchsorted(a, pts[:, i] - reach) for i, a in enumerate(axes)], axis=1)
    stop = np.stack([np.searchsorted(a, pts[:, i] + reach, side="right") for i, a in enumerate(axes)], axis=1)
    for p, ri, i0, i1 in zip(pts.astype(np.float32), r.astype(np.float32), start, stop):
        if (i1 <= i0).any():
            continue
        dz, dy, dx = ((a[j:k] - c) ** 2 for a, j, k, c in zip(axes, i0, i1, p))
        d = np.sqrt(dz[:, None, None] + dy[None, :, None] + dx[None, None, :]) - ri
        view = sd[i0[0]:i1[0], i0[1]:i1[1], i0[2]:i1[2]]
        np.minimum(view, d, out=view)
    return box, sd, pts


def _ellipsoid(canvas: _Canvas, center: Sequence[float], radii: Sequence[float], rotation: np.ndarray | None = None,
               margin: float = 3.0) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """Approximate signed distance (mm) to a (rotated) ellipsoid on its bounding box."""
    center = np.asarray(center, float)
    reach = max(radii) + margin
    box = canvas.box(center - reach, center + reach)
    if box is None:
        return None
    rel = [g - np.float32(c) for g, c in zip(canvas.grid(box), center)]
    rot = np.eye(3) if rotation is None else rotation
    q = sum((sum(rel[j] * np.float32(rot[j, i]) for j in range(3)) / np.float32(radii[i])) ** 2 for i in range(3))
    return box, (np.sqrt(q) - 1) * np.float32(np.mean(radii))


def _column(canvas: _Canvas, cy: float, cx: float, ry: float, rx: float, margin: float = 3.0,
            ) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """Signed distance to a vertical elliptic column (vertebral body, IVC) through the whole crop."""
    reach = max(ry, rx) + margin
    box = canvas.box((-np.inf, cy - reach, cx - reach), (np.inf, cy + reach, cx + reach))
    if box is None:
        return None
    _, y, x = canvas.grid(box)
    q = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
    sd2 = (q - 1) * np.float32((ry + rx) / 2)
    return box, np.broadcast_to(sd2, (canvas.shape[0], *sd2.shape[1:])).copy()


def _rotation(rng: np.random.Generator, max_degrees: float = 180.0) -> np.ndarray:
    """Rotation about a random axis by up to ``max_degrees`` (Rodrigues' formula)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


# --------------------------------------------------------------------------------------------------- anatomy


def _draw_case(rng: np.random.Generator, subtype: int, preset: Preset, size_class: str | None = None,
               site: Site = SITES["A"]) -> tuple[_Canvas, dict[str, Any]]:
    """Draw one case on a canvas (clean HU before blur and noise, final labels) and return its facts."""
    lo, hi = np.array(preset.shape_lo), np.array(preset.shape_hi)
    ny = int(rng.integers(lo[1], hi[1] + 1))
    nx = int(np.clip(round(ny * rng.uniform(1.0, 1.3)), lo[2], hi[2]))
    nz = int(rng.integers(lo[0], hi[0] + 1))
    # A site's spacing changes the voxel counts, not the field of view (the crop is cut around the same anatomy).
    shape = (int(round(nz / site.z_scale)), int(round(ny / site.xy_scale)), int(round(nx / site.xy_scale)))
    sz = float(rng.choice([2.0, rng.uniform(*preset.spacing_z)], p=[0.6, 0.4])) * site.z_scale
    sxy = float(rng.uniform(*preset.spacing_xy)) * site.xy_scale
    spacing = (round(sz, 4), round(sxy, 6), round(sxy, 6))
    cv = _Canvas(shape, spacing)
    hz, hy, hx = cv.half
    # Anatomy scale: the crop is cut around the pancreas, so a ~150 mm gland spans most of its width.
    s = float(np.clip(min(hx / 90.0, hy / 70.0), 0.5, 1.25))
    c = rng.uniform(*site.contrast)  # contrast timing: scales all enhancement together, as in a real scan

    def enh(e: float) -> float:  # unenhanced soft tissue ~40 HU plus contrast enhancement
        return 40.0 + c * e

    full = tuple(slice(0, n) for n in shape)
    fat = rng.uniform(-110, -90)
    cv.hu[:] = fat + rng.uniform(6, 12) * _noise(rng, cv, full, 12 * s)

    # Pancreas centre line (z, y, x in units of the crop half-size; y posterior, x patient left): uncinate/head on
    # the right, neck in front of the SMV, body over the SMA and aorta, tail rising back towards the spleen.
    zs = min(0.8 * hz, 70 * s)
    ctrl = np.array([[-0.55, 0.15, -0.55], [-0.25, -0.05, -0.68], [0.0, -0.42, -0.25],
                     [0.12, -0.38, 0.15], [0.28, -0.1, 0.5], [0.42, 0.22, 0.78]])
    ctrl += rng.normal(0, 0.04, ctrl.shape)
    ctrl = ctrl * [zs, 0.9 * hy, 0.9 * hx] + [rng.uniform(-0.1, 0.1) * hz, 0, 0]
    pr = np.array([12.0, 14.0, 8.0, 10.0, 9.0, 6.0]) * rng.uniform(0.85, 1.15, 6) * s
    neck = ctrl[2]

    # Vessel frame, derived from the neck so the anatomy keeps its relations whatever the jitter.
    r_smv, r_sma, r_ao = 5.5 * s, 3.5 * s, 10.0 * s * rng.uniform(0.85, 1.15)
    smv = neck + [0, pr[2] + r_smv + 1.5 * s, 2 * s]
    sma = smv + [0, 3 * s, 11 * s]
    aorta = sma + [0, r_sma + r_ao + 7 * s, -1 * s]
    r_vert = (16 * s, 21 * s)
    vert = aorta + [0, r_ao + r_vert[0] + 2 * s, -8 * s]
    ivc = (vert[1] - r_vert[0] - 9 * s, vert[2] - 24 * s)
    venous, arterial = enh(rng.uniform(110, 150)), enh(rng.uniform(120, 170))
    soft = rng.uniform(40, 55)

    # Background organs, partly in the crop: liver (patient right, front), spleen (left, back), kidneys, vertebra.
    for center, radii, value in [
        ((0.5 * hz, -0.55 * hy, -1.15 * hx), (80 * s, 55 * s, 60 * s), enh(rng.uniform(55, 75))),
        ((0.4 * hz, 0.6 * hy, 1.2 * hx), (55 * s, 35 * s, 30 * s), enh(rng.uniform(65, 85))),
    ]:
        shape_sd = _ellipsoid(cv, center, radii, _rotation(rng, 20))
        if shape_sd:
            box, sd = shape_sd
            cv.paint(box, sd - 3 * s * _noise(rng, cv, box, 20 * s), value + 6 * _noise(rng, cv, box, 6 * s))
    for side, z0 in ((1, 0.1), (-1, -0.35)):  # kidneys: obliquely set ovals with the hilum (sinus fat) medially
        kidney = np.array([z0 * hz, vert[1] + 6 * s, vert[2] + side * 68 * s])
        angle = np.deg2rad(side * rng.uniform(20, 35))
        turn = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
        shape_sd = _ellipsoid(cv, kidney, (48 * s, 30 * s, 17 * s), turn)
        if shape_sd:
            box, sd = shape_sd
            cv.paint(box, sd, enh(rng.uniform(120, 160)) + 10 * _noise(rng, cv, box, 4 * s))
            sinus = _ellipsoid(cv, kidney - [0, 0, side * 12 * s], (25 * s, 12 * s, 9 * s), turn)
            if sinus:
                cv.paint(sinus[0], sinus[1], fat + 20, edge=1.5)
    col = _column(cv, vert[1], vert[2], *r_vert)
    if col:
        box, sd = col
        cv.paint(box, sd + 8 * s, enh(rng.uniform(10, 20)), edge=2.0)  # psoas / crus muscle around the spine
        cv.paint(box, sd, rng.uniform(450, 700))  # cortical shell
        disc = np.abs(cv.grid(box)[0] - rng.uniform(-hz, hz)) < 4.5 * s  # intervertebral disc
        cv.paint(box, sd + 1.8 * s, np.where(disc, rng.uniform(70, 95), rng.uniform(170, 260)).astype(np.float32))

    # Stomach in front of the body (air-fluid level: gas rises anteriorly in a supine patient) and bowel loops.
    stomach = (0.25 * hz, -0.9 * hy - 20 * s, 0.25 * hx)
    shape_sd = _ellipsoid(cv, stomach, (40 * s, 28 * s, 48 * s), _rotation(rng, 15))
    if shape_sd:
        box, sd = shape_sd
        cv.paint(box, sd, enh(rng.uniform(30, 50)))
        level = stomach[1] + rng.uniform(-0.4, 0.3) * 28 * s
        content = np.where(cv.grid(box)[1] < level, -1000.0, rng.uniform(5, 25)).astype(np.float32)
        cv.paint(box, sd + 3.5 * s, np.broadcast_to(content, sd.shape))
    head = ctrl[1]
    duodenum = [[hz + 5, -15, 8], [0.2 * hz, -6, -pr[1] / s - 12], [-0.4 * hz, 8, -pr[1] / s - 8],
                [-0.75 * hz, 12, 15], [-0.8 * hz, 10, 45]]  # C-loop around the head (z in mm, y/x in mm / s)
    loops = [np.array([[z, head[1] + dy * s, head[2] + dx * s] for z, dy, dx in duodenum])]
    for _ in range(int(rng.integers(2, 6))):
        a = np.array([rng.uniform(-hz, hz), rng.uniform(-1.1, -0.35) * hy, rng.uniform(-1.0, 1.0) * hx])
        loops.append(a + np.cumsum(rng.normal(0, 14 * s, (4, 3)) * [0.6, 0.5, 1.0], axis=0))
    for path in loops:
        radius = rng.uniform(7, 11) * s
        tube = _tube(cv, path, radius)
        if not tube:
            continue
        box, sd, _ = tube
        cv.paint(box, sd, enh(rng.uniform(10, 40)))
        kind = rng.choice(["gas", "fluid", "faeces"], p=[0.35, 0.35, 0.3])
        inner = sd + 2.5 * s
        if kind == "gas":
            cv.paint(box, inner, -1000.0)
        elif kind == "fluid":
            cv.paint(box, inner, rng.uniform(0, 25))
        else:
            mottle = _noise(rng, cv, box, 2.5 * s)
            cv.paint(box, inner, np.where(mottle > 1.3, -1000.0, -40 + 60 * mottle).astype(np.float32))
    for _ in range(int(rng.integers(3, 9))):  # small mesenteric vessels in the fat in front
        a = np.array([rng.uniform(-hz, hz), rng.uniform(-1.0, -0.3) * hy, rng.uniform(-0.9, 0.9) * hx])
        tube = _tube(cv, a + np.cumsum(rng.normal(0, 10 * s, (3, 3)), axis=0), rng.uniform(0.9, 1.8), margin=1.5)
        if tube:
            cv.paint(tube[0], tube[1], venous)

    # Pancreas (label 1): lobulated surface, parenchymal texture, a fine duct along the centre line.
    parenchyma = enh(rng.uniform(60, 85))
    tube = _tube(cv, ctrl, pr, margin=4.0 * s)
    assert tube is not None  # the centre line lies inside the crop by construction
    pbox, psd, pts = tube
    psd -= np.float32(2.2 * s) * _noise(rng, cv, pbox, 3.5 * s) + np.float32(1.0 * s) * _noise(rng, cv, pbox, 9 * s)
    texture = parenchyma + rng.uniform(5, 10) * _noise(rng, cv, pbox, 2.5 * s)
    fatty = rng.uniform(0, 0.35) * np.clip(_noise(rng, cv, pbox, 2.0 * s) - 1.0, 0, 1)  # fat between the lobules
    cv.paint(pbox, psd - 2.5 * s, fat + 10.0, edge=2.0)  # the fat plane around the gland
    cv.paint(pbox, psd, texture + fatty * (fat - texture))
    cv.label[pbox][psd < 0] = 1

    t_lesion = float(np.clip(rng.beta(*{0: (1.6, 2.6), 1: (1.2, 1.2), 2: (1.5, 1.5)}[subtype]), 0.04, 0.96))
    dilated = rng.random() < {0: 0.5, 1: 0.25, 2: 0.05}[subtype]
    tt = np.linspace(0, 1, len(ctrl))
    duct_r = np.full(len(ctrl), rng.uniform(0.8, 1.2))
    if dilated:  # obstruction: the duct widens upstream (towards the tail) of the lesion
        duct_r = np.where(tt > t_lesion, rng.uniform(2.0, 3.5) * np.maximum(s, 0.8), duct_r)
    duct = _tube(cv, ctrl, np.minimum(duct_r, 0.6 * pr), margin=1.5)
    if duct:
        cv.paint(duct[0], duct[1], rng.uniform(5, 25))

    # Vessels last: they carve the pancreas label (annotations exclude them).
    portal = np.array([[-hz - 5, smv[1] + 2 * s, smv[2] - 1 * s], [neck[0] - 0.3 * hz, smv[1], smv[2]],
                       [neck[0] + 0.2 * hz, smv[1] - 2 * s, smv[2] - 4 * s], [hz + 5, smv[1] - 10 * s, -0.75 * hx]])
    ao_path = np.array([[-hz - 5, aorta[1], aorta[2]], [0, aorta[1] - 2 * s, aorta[2] + 1 * s],
                        [hz + 5, aorta[1] + 2 * s, aorta[2] - 1 * s]])
    z_sma = min(neck[0] + rng.uniform(0.15, 0.35) * hz, hz - 2)
    sma_path = np.array([[z_sma + 4 * s, aorta[1] - 0.5 * r_ao, aorta[2]], [z_sma - 8 * s, sma[1] + 3 * s, sma[2]],
                         [-hz - 5, sma[1], sma[2] + 2 * s]])
    z_rv = z_sma - rng.uniform(8, 14) * s
    renal = np.array([[z_rv, vert[1] - 5 * s, vert[2] + 55 * s], [z_rv, aorta[1] - r_ao - 2 * s, aorta[2] + 12 * s],
                      [z_rv, aorta[1] - r_ao - 3 * s, aorta[2]], [z_rv - 3 * s, ivc[0], ivc[1]]])
    # The splenic vein runs in a groove along the back of the body and tail, into the portal confluence.
    splenic = pts[np.searchsorted(np.linspace(0, 1, len(pts)), 0.3):: max(1, len(pts) // 12)].copy()
    r_at = np.interp(np.linspace(0.3, 1, len(splenic)), tt, pr)
    splenic += np.stack([0.3 * r_at, 0.85 * r_at + 2 * s, np.zeros_like(r_at)], axis=1)
    splenic = np.vstack([smv + [2 * s, 0, 0], splenic])
    collar = _tube(cv, sma_path, 2.4 * r_sma, margin=1.0)
    # (path, radius, HU, soft-tissue sheath in mm: the diaphragmatic crura hug the aorta)
    vessels = [(sma_path, r_sma, arterial, 0.0), (portal, r_smv, venous, 0.0), (ao_path, r_ao, arterial, 2.0 * s),
               (splenic, 3.5 * s, venous, 0.0), (renal, 4 * s, venous, 0.0)]
    if collar:
        box, sd, _ = collar
        cv.paint(box, sd, fat + 10.0)
        cv.label[box][sd < 0] = 0
    ivc_col = _column(cv, ivc[0], ivc[1], 9 * s, 13 * s)
    if ivc_col:
        box, sd = ivc_col
        cv.paint(box, sd, enh(rng.uniform(80, 120)))
        cv.label[box][sd < 0] = 0
    for path, radius, value, sheath in vessels:
        tube = _tube(cv, path, radius, margin=1.5 + sheath)
        if tube:
            box, sd, _ = tube
            if sheath:
                cv.paint(box, sd - sheath, soft)
            cv.paint(box, sd, value)
            cv.label[box][sd < 0] = 0

    lesion = _draw_lesion(rng, cv, subtype, size_class, pts, np.interp(np.linspace(0, 1, len(pts)), tt, pr),
                          t_lesion, s, parenchyma, enh, site)
    # Lobulation and vessel carving leave specks of label 1 around the gland: keep the gland and the lesion.
    parts, n = ndimage.label(cv.label > 0)
    if n > 1:
        sizes = np.bincount(parts.ravel())
        sizes[0] = 0
        keep = np.zeros(n + 1, bool)
        keep[np.argmax(sizes)] = True
        keep[np.unique(parts[cv.label == 2])] = True
        keep[0] = False
        cv.label[~keep[parts]] = 0
    lesion.update(t_location=round(t_lesion, 3), dilated_duct=bool(dilated), contrast=round(float(c), 3),
                  parenchyma_hu=round(float(parenchyma), 1), anatomy_scale=round(s, 3))
    return cv, lesion


def _draw_lesion(rng: np.random.Generator, cv: _Canvas, subtype: int, size_class: str | None, pts: np.ndarray,
                 radius: np.ndarray, t_lesion: float, s: float, parenchyma: float,
                 enh: Callable[[float], float], site: Site = SITES["A"]) -> dict[str, Any]:
    """Paint the lesion (label 2, overriding everything) at ``t_lesion`` along the pancreas centre line."""
    atypical = bool(rng.random() < site.atypical_fraction)
    drawn_class = str(rng.choice(SIZE_CLASSES, p=SIZE_SHARES))  # drawn either way: the anatomy drawn so far stays
    size_class = drawn_class if size_class is None else size_class
    median = {0: 12.0, 1: 13.0, 2: 9.0}[subtype]
    r_eq = {"tiny": rng.uniform(2.5, 4.5), "medium": float(np.clip(median * rng.lognormal(0, 0.35), 5, 20)),
            "large": rng.uniform(18, 26)}[size_class] * np.sqrt(s)  # small crops: relatively larger lesions
    i = int(round(t_lesion * (len(pts) - 1)))
    direction = rng.normal(size=3)
    direction[1] = -abs(direction[1])  # lesions grow forwards, away from the vessels behind the gland
    center = pts[i] + direction / np.linalg.norm(direction) * rng.uniform(0, 0.5) * radius[i]
    room = float(np.min(cv.half - np.abs(center))) - 1.0
    r_eq = float(np.clip(r_eq, 0.75 * cv.spacing[0], max(room, 0.75 * cv.spacing[0])))
    spread = {0: 0.2, 1: 0.15, 2: 0.1}[subtype]
    ratios = np.exp(rng.normal(0, spread, 3))
    radii = r_eq * ratios / np.prod(ratios) ** (1 / 3)
    rot = _rotation(rng)
    drawn = _ellipsoid(cv, center, radii, rot, margin=max(4.0, 0.6 * r_eq))
    assert drawn is not None
    box, sd = drawn
    texture = _noise(rng, cv, box, max(2.0, 0.3 * r_eq))
    facts: dict[str, Any] = {"atypical": atypical, "size_class": str(size_class), "radius_mm": round(r_eq, 2)}
    if subtype == 0:
        sd = sd - np.float32(site.solid_irregularity * r_eq) * _noise(rng, cv, box, 0.5 * r_eq) \
            - np.float32(0.08 * r_eq) * _noise(rng, cv, box, 0.2 * r_eq)
        value = enh(rng.uniform(*site.solid_enhancement)) + rng.uniform(8, 15) * texture
        if atypical and rng.random() < 0.5:  # iso-attenuating: hard to see, as some real tumours are
            value = value + (parenchyma - 15 - enh(16))
            facts["variant"] = "iso-attenuating"
        elif atypical:  # central necrosis
            value = np.where(sd < -0.45 * r_eq, rng.uniform(10, 25), value)
            facts["variant"] = "necrotic centre"
        cv.paint(box, sd, value.astype(np.float32), edge=rng.uniform(2.5, 4.0) * max(s, 0.7))
    elif subtype == 1:
        seeds = [np.asarray(center)]
        # Septa need room: a small cyst (radius under ~6 mm) is unilocular.
        locules = int(rng.choice(3, p=list(site.cyst_locules))) if r_eq > 6 else 0
        for _ in range(locules):  # daughter locules: a lobulated, multilocular outline
            offset = rng.normal(size=3)
            seed = center + offset / np.linalg.norm(offset) * rng.uniform(0.5, 0.9) * r_eq
            seeds.append(seed)
            extra = _ellipsoid(cv, seed, [rng.uniform(0.35, 0.65) * r_eq] * 3, margin=max(4.0, 0.6 * r_eq))
            if extra and extra[0] == box:
                sd = np.minimum(sd, extra[1])
            elif extra:
                sd = np.minimum(sd, _resample_sd(cv, extra, box))
        for _ in range(int(rng.integers(0, 3)) if locules or (r_eq > 6 and rng.random() < 0.5) else 0):
            seed = center + rng.normal(0, 0.4 * r_eq, 3)
            if min(np.linalg.norm(seed - other) for other in seeds) > 0.35 * r_eq:  # no sliver locules
                seeds.append(seed)
        fluid = rng.uniform(*site.cyst_fluid_hu)
        wall = enh(rng.uniform(20, 45))
        thickness = rng.uniform(*site.cyst_wall_mm)
        if atypical:  # proteinaceous or haemorrhagic content, thicker septa
            fluid, thickness = rng.uniform(20, 35), rng.uniform(1.2, 1.8)
            facts["variant"] = "proteinaceous"
        value = fluid + 3 * texture
        if len(seeds) > 1:  # septa: the faces of the seeds' Voronoi cells, ``thickness`` mm thick
            value = np.where(_voronoi_faces(cv.grid(box), np.array(seeds)) < thickness / 2, wall, value)
        value = np.where(sd > -thickness, wall, value).astype(np.float32)
        cv.paint(box, sd, value, edge=0.5)
        facts["locules"] = len(seeds)
    else:
        sd = sd - np.float32(0.04 * r_eq) * _noise(rng, cv, box, 0.6 * r_eq)
        value = enh(rng.uniform(*site.hyper_enhancement)) + rng.uniform(6, 12) * texture
        if atypical and (rng.random() < 0.5 or r_eq < 8 * s):  # weakly enhancing: close to parenchyma
            value = value - enh(rng.uniform(*site.hyper_enhancement)) + enh(rng.uniform(60, 85))
            facts["variant"] = "weakly enhancing"
        elif atypical:  # cystic degeneration: an enhancing rim around fluid, mimicking a cyst
            value = np.where(sd < -rng.uniform(0.2, 0.35) * r_eq, rng.uniform(10, 30), value)
            facts["variant"] = "cystic degeneration"
        cv.paint(box, sd, value.astype(np.float32), edge=1.0)
    inside = sd < 0
    if not inside.any():  # a tiny lesion between voxel centres: keep the voxel nearest its centre
        inside = np.zeros_like(inside)
        inside[tuple(int(np.argmin(np.abs(g.ravel() - np.float32(c)))) for g, c in zip(cv.grid(box), center))] = True
    cv.label[box][inside] = 2
    return facts


def _voronoi_faces(grid: tuple[np.ndarray, ...], seeds: np.ndarray) -> np.ndarray:
    """Distance (mm) from each voxel to the face between its two nearest seeds' Voronoi cells."""
    d2 = np.stack([sum((g - np.float32(c)) ** 2 for g, c in zip(grid, seed)) for seed in seeds])
    nearest = np.argsort(d2, axis=0)[:2]
    first, second = (np.take_along_axis(d2, nearest[i:i + 1], 0)[0] for i in range(2))
    gap = np.linalg.norm(seeds[:, None] - seeds[None], axis=2)[nearest[0], nearest[1]]
    return (second - first) / (2 * gap)  # distance to the bisecting plane of the two seeds


def _resample_sd(cv: _Canvas, shape_sd: tuple[tuple[slice, slice, slice], np.ndarray],
                 box: tuple[slice, slice, slice]) -> np.ndarray:
    """Express a signed distance computed on another box on ``box`` (outside its own box: far away)."""
    other_box, other = shape_sd
    out = np.full([s.stop - s.start for s in box], np.inf, np.float32)
    inter = [slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(box, other_box)]
    if all(s.stop > s.start for s in inter):
        dst = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(inter, box))
        src = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(inter, other_box))
        out[dst] = other[src]
    return out


# ------------------------------------------------------------------------------------------------------- cases


def make_case(rng_or_seed: np.random.Generator | int | Sequence[int], subtype: int, preset: str | Preset = "small",
              size_class: str | None = None, site: str | Site = "A") -> tuple[sitk.Image, sitk.Image, dict[str, Any]]:
    """One phantom case: int16 CT image, mask (uint8, or float32 with the real data's 1.0000152587890625 quirk)
    sharing its geometry exactly, and facts measured on what is returned (lesion volume, mean lesion HU...).

    ``size_class`` (tiny, medium, large) fixes the lesion's size class; None draws it (shares ``SIZE_SHARES``).
    ``site`` (a name of ``SITES`` or a :class:`Site`) sets the scanner, protocol and lesion mixture."""
    if subtype not in SUBTYPES:
        raise ValueError(f"subtype must be one of {SUBTYPES}, got {subtype!r}")
    if size_class is not None and size_class not in SIZE_CLASSES:
        raise ValueError(f"size_class must be one of {SIZE_CLASSES} or None, got {size_class!r}")
    preset, site = _preset(preset), _site(site)
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    cv, facts = _draw_case(rng, subtype, preset, size_class, site)
    # Partial volume: the scanner's point spread, wider along z (slice profile) than in-plane.
    sigma_xy = rng.uniform(0.3, 0.5) * site.blur_scale
    hu = ndimage.gaussian_filter(cv.hu, (rng.uniform(0.35, 0.6), sigma_xy, sigma_xy), mode="nearest")
    # CT noise is correlated in-plane (reconstruction kernel): filter white noise, then set its level.
    noise_sd = rng.uniform(10, 25) * preset.noise_scale * site.noise_scale
    grain = site.noise_grain
    noise = ndimage.gaussian_filter(rng.standard_normal(cv.shape, dtype=np.float32), (0, grain, grain))
    hu += noise * np.float32(noise_sd / noise.std())
    if site.hu_offset != (0.0, 0.0):  # drawn only for such sites, so site A's random stream stays as it was
        hu += np.float32(rng.uniform(*site.hu_offset))
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    quirk = bool(rng.random() < QUIRK_FRACTION)
    mask = cv.label.astype(np.float32) if quirk else cv.label
    if quirk:
        mask[cv.label == 1] = QUIRK_ONE
    flipped = bool(rng.random() < 0.25)  # header-only variety: geometry must be copied, never assumed
    direction = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0) if flipped else tuple(np.eye(3).ravel().tolist())
    origin = (round(rng.uniform(40, 130), 2) * (1 if flipped else -1),
              round(rng.uniform(120, 230), 2) * (1 if flipped else -1), round(rng.uniform(-650, -250), 2))
    images = []
    for array in (image, mask):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(tuple(float(v) for v in reversed(cv.spacing)))
        img.SetOrigin(origin)
        img.SetDirection(direction)
        images.append(img)

    lesion, pancreas = cv.label == 2, cv.label == 1
    voxel_ml = float(np.prod(cv.spacing)) / 1000.0
    lesion_hu = image[lesion].astype(np.float64)
    facts = {"subtype": int(subtype), "preset": preset.name, "site": site.name, "shape_zyx": list(cv.shape),
             "spacing_zyx": list(cv.spacing), "lesion_voxels": int(lesion.sum()),
             "lesion_volume_ml": round(float(lesion.sum()) * voxel_ml, 4),
             "lesion_diameter_mm": round(float(np.cbrt(6 * lesion.sum() * voxel_ml * 1000 / np.pi)), 2),
             "pancreas_volume_ml": round(float((lesion | pancreas).sum()) * voxel_ml, 3),
             "mean_lesion_hu": round(float(lesion_hu.mean()), 1),
             "median_lesion_hu": round(float(np.median(lesion_hu)), 1),
             "median_parenchyma_hu": round(float(np.median(image[pancreas])), 1),
             "noise_sd_hu": round(float(noise_sd), 1), "float_mask_quirk": quirk, "flipped_direction": flipped,
             **facts}
    return images[0], images[1], facts


def _site(site: str | Site) -> Site:
    return _lookup(site, Site, SITES, "site")


def _preset(preset: str | Preset) -> Preset:
    return _lookup(preset, Preset, PRESETS, "preset")


def _lookup(value, kind: type, table: dict, what: str):
    """``value`` itself when it is already a ``kind``, else its entry in ``table`` (an error naming the choices)."""
    if isinstance(value, kind):
        return value
    if value not in table:
        raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(table)}")
    return table[value]


def _test_subtypes(n_test: int, rng: np.random.Generator) -> list[int]:
    """Subtypes of the test cases in the real split's proportions (largest remainder), in random order."""
    share = np.array(REAL_TRAIN, float) / sum(REAL_TRAIN) * n_test
    counts = np.floor(share).astype(int)
    counts[np.argsort(counts - share)[: n_test - counts.sum()]] += 1
    order = [k for k in SUBTYPES for _ in range(counts[k])]
    return [order[i] for i in rng.permutation(n_test)]


def _size_class(seed: Sequence[int]) -> str:
    """The lesion size class of case ``(seed, split, subtype, index)``, stratified within its split and subtype.

    Drawn independently per case, the 60 training cases of the small preset held 4 tiny lesions (2 of them
    atypical) while its 36 test cases held 5: the test set then scored, for one case in seven, what training had
    barely shown. A real split is stratified. Here the group's indices are dealt out in turn to the class furthest
    behind its share (from a seeded head start of up to half a case), so the first n cases of any group hold
    ``SIZE_SHARES`` to within one case (measured: at most 0.92 off, 900 groups of up to 40 cases; so a group's
    first case is always medium), and a case's class depends on its own seed only: changing the counts changes no
    other case.
    """
    *group, index = seed
    shares = np.array(SIZE_SHARES)
    # index MAX_CASES: a key no case seed has (a case's own stream must not double as its group's head start)
    credit = np.random.default_rng([*group, MAX_CASES]).random(len(shares)) * 0.5
    counts = np.zeros(len(shares))
    for i in range(int(index) + 1):
        chosen = int(np.argmax(shares * (i + 1) + credit - counts))
        counts[chosen] += 1
    return SIZE_CLASSES[chosen]


def _counts(name: str, value: Sequence[int] | None, default: tuple[int, int, int]) -> tuple[int, int, int]:
    counts = tuple(default if value is None else (int(v) for v in value))
    if len(counts) != len(SUBTYPES) or min(counts) < 1:
        # Every subtype folder must exist and be non-empty in both labelled splits, or import rejects the layout.
        raise ValueError(f"{name} needs one count of at least 1 per subtype {SUBTYPES}, got {list(counts)}")
    return counts  # type: ignore[return-value]


def plan_cases(preset: str | Preset = "small", seed: int = 0, train_per_subtype: Sequence[int] | None = None,
               val_per_subtype: Sequence[int] | None = None, n_test: int | None = None,
               site: str | Site = "A") -> list[dict[str, Any]]:
    """Which cases the dataset holds: split, subtype, the per-case seed, the lesion size class and the file names.

    Ids are a seeded permutation over the whole dataset, so the id tells nothing about the split or subtype. Sites
    other than A draw other patients (their seeds carry the site), so a cross-site test shares no case."""
    preset, site = _preset(preset), _site(site)
    # site A keeps the original seeds; another site's seeds start with its own key
    head = [seed] if site.name == "A" else [seed, 100 + list(SITES).index(site.name)]
    train = _counts("train", train_per_subtype, preset.train)
    val = _counts("validation", val_per_subtype, preset.validation)
    n_test = preset.test if n_test is None else int(n_test)
    if n_test < 0:
        raise ValueError(f"the number of test cases must not be negative, got {n_test}")
    total = sum(train) + sum(val) + n_test
    if total > MAX_CASES:
        raise ValueError(f"at most {MAX_CASES} cases (three-digit ids), asked for {total}")
    cases = [{"split": split, "subtype": k, "seed": [*head, code, k, i]}
             for code, (split, counts) in enumerate((("train", train), ("validation", val)))
             for k in SUBTYPES for i in range(counts[k])]
    seen = dict.fromkeys(SUBTYPES, 0)
    for k in _test_subtypes(n_test, np.random.default_rng([*head, 2])):
        cases.append({"split": "test", "subtype": k, "seed": [*head, 2, k, seen[k]]})
        seen[k] += 1
    for case in cases:
        case["size_class"] = _size_class(case["seed"])
    for case, number in zip(cases, np.random.default_rng([*head, 3]).permutation(total)):
        if case["split"] == "test":
            case["name"] = f"quiz_{number:03d}"
            case["image"] = f"test/{case['name']}_0000.nii.gz"
            case["mask"] = f"test_groundtruth/{case['name']}.nii.gz"
        else:
            case["name"] = f"quiz_{case['subtype']}_{number:03d}"
            folder = f"{case['split']}/subtype{case['subtype']}"
            case["image"] = f"{folder}/{case['name']}_0000.nii.gz"
            case["mask"] = f"{folder}/{case['name']}.nii.gz"
    return cases


# ----------------------------------------------------------------------------------------------------- dataset


def generate_phantom_dataset(out_dir: str | os.PathLike, preset: str = "small", seed: int = 0,
                             train_per_subtype: Sequence[int] | None = None,
                             val_per_subtype: Sequence[int] | None = None, n_test: int | None = None,
                             preview: bool = False, force: bool = False, progress: bool = True,
                             site: str = "A") -> dict[str, Any]:
    """Write a phantom dataset in the published layout and return the summary also written to phantom.json.

    Built in a hidden sibling folder and renamed at the end, so ``out_dir`` never holds a half-written dataset.
    An existing non-empty ``out_dir`` raises FileExistsError; ``force`` replaces it only when it is an earlier
    phantom dataset (it has phantom.json), so a typo cannot delete unrelated work."""
    from tqdm import tqdm

    out = Path(out_dir).resolve()
    cases = plan_cases(preset, seed, train_per_subtype, val_per_subtype, n_test, site)
    _check_target(out, force)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shown: dict[int, tuple[dict[str, Any], np.ndarray, np.ndarray]] = {}
        for case in tqdm(cases, desc="phantom", unit="case", disable=not progress):
            image, mask, facts = make_case(case["seed"], case["subtype"], preset, case["size_class"], site)
            for key, img in (("image", image), ("mask", mask)):
                (tmp / case[key]).parent.mkdir(parents=True, exist_ok=True)
                sitk.WriteImage(img, str(tmp / case[key]), useCompression=True)
            case.update(facts)
            k = case["subtype"]
            if preview and case["split"] != "test" and (k not in shown or _typical(case) > _typical(shown[k][0])):
                shown[k] = (case, sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(mask))
        test = [c for c in cases if c["split"] == "test"]
        if test:
            with open(tmp / "test_groundtruth" / "subtype_results.csv", "w", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(["Names", "Subtype"])
                writer.writerows([f"{c['name']}.nii.gz", c["subtype"]] for c in sorted(test, key=lambda c: c["name"]))
        previews = [_preview(tmp / "preview", *shown[k]) for k in sorted(shown)]
        summary = _summary(_preset(preset), seed, cases, previews, _site(site))
        (tmp / "phantom.json").write_text(json.dumps(summary, indent=1) + "\n")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _typical(case: dict[str, Any]) -> int:
    """A preview should show what defines the subtype: best a typical, medium-sized lesion, then any typical one."""
    return 2 * (not case["atypical"]) + (case["size_class"] == "medium")


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty (use --force to replace an earlier phantom dataset)")
        if not (out / "phantom.json").is_file():
            raise FileExistsError(f"{out} is not empty and holds no phantom.json; refusing to replace a folder "
                                  "that is not a phantom dataset, remove it yourself")


def _replace(tmp: Path, out: Path) -> None:
    """Swap the finished dataset in; an old one is moved aside first and deleted only after the swap."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _summary(preset: Preset, seed: int, cases: list[dict[str, Any]], previews: list[str],
             site: Site = SITES["A"]) -> dict[str, Any]:
    """Everything but timings, so the same seed gives the same phantom.json too."""
    def counts(split: str) -> list[int]:
        return [sum(c["split"] == split and c["subtype"] == k for c in cases) for k in SUBTYPES]

    volumes = [c["lesion_volume_ml"] for c in cases]
    return {"generator": f"nnunet-mtl {__version__} phantom", "preset": preset.name, "site": site.name,
            # lists, not tuples: the summary equals what phantom.json reads back
            "site_profile": json.loads(json.dumps(dataclasses.asdict(site))), "seed": seed,
            "counts": {"train": counts("train"), "validation": counts("validation"),
                       "test": sum(c["split"] == "test" for c in cases)},
            "n_cases": len(cases), "float_mask_quirk_cases": sum(c["float_mask_quirk"] for c in cases),
            "lesion_volume_ml": {"min": min(volumes), "median": float(np.median(volumes)), "max": max(volumes)},
            "preview": previews, "cases": cases}


def _preview(folder: Path, case: dict[str, Any], image: np.ndarray, mask: np.ndarray) -> str:
    """Axial and coronal slice through the lesion centre, W400/L40, pancreas and lesion outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    label = np.rint(mask).astype(np.uint8)
    zc, yc, _ = (int(round(v)) for v in ndimage.center_of_mass(label == 2))
    zc = int(np.argmax((label == 2).sum(axis=(1, 2))))  # the axial slice with the most lesion
    sz, sy, sx = case["spacing_zyx"]
    nz, ny, nx = image.shape
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), gridspec_kw={"width_ratios": [ny * sy, nz * sz]})
    views = [(image[zc], label[zc], [0, nx * sx, ny * sy, 0], "upper", f"axial z={zc}"),
             (image[:, yc], label[:, yc], [0, nx * sx, 0, nz * sz], "lower", f"coronal y={yc}")]
    for ax, (img, lab, extent, origin, title) in zip(axes, views):
        ax.imshow(img, cmap="gray", vmin=40 - 200, vmax=40 + 200, extent=extent, origin=origin,
                  interpolation="nearest")
        for level, colour in ((0.5, "yellow"), (1.5, "red")):
            if (lab > level).any():
                ax.contour(lab > level, levels=[0.5], colors=colour, linewidths=0.8, extent=extent, origin=origin)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("x (mm, patient left ->)")
    axes[0].set_ylabel("y (mm, posterior ->)")
    axes[1].set_ylabel("z (mm, superior ->)")
    variant = f", {case['variant']}" if "variant" in case else ""
    fig.suptitle(f"{case['name']}  subtype {case['subtype']}{variant}: lesion {case['lesion_volume_ml']:.2f} ml "
                 f"({case['lesion_diameter_mm']:.0f} mm), mean {case['mean_lesion_hu']:.0f} HU; parenchyma "
                 f"{case['median_parenchyma_hu']:.0f} HU  [W400/L40; yellow pancreas, red lesion]", fontsize=9)
    fig.tight_layout()
    path = folder / f"subtype{case['subtype']}_{case['name']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"preview/{path.name}"
