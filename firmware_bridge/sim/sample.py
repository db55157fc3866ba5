"""A synthetic Pap smear that looks, to the OMIS pipeline, like the real instrument's slides.

The physical model is written up in ``docs/simulator.md``; in short:

* A slide is an endless plane of cells generated tile by tile from the slide's seed, so any
  stage position shows the same cells every time and a distant position shows other cells.
* Each cell is a cytoplasm ellipse (eosinophilic or cyanophilic counterstain) and a nucleus
  (hematoxylin, textured chromatin); debris and leukocytes are nuisance blobs.  Optical
  densities add (Beer-Lambert), so overlapping cells are darker.
* Diffuse light (W) gives ``white * exp(-OD)``.  Polarized light (P) additionally loses
  ``exp(-A)`` and shifts the red/blue balance by ``(1 + D, 1, 1 - D)``, where ``A`` and ``D``
  are largest in dense, coarse chromatin.  The Pap group acts on nuclear size, N/C ratio,
  hyperchromasia, chromatin texture and these polarization terms, hence on R/(R+B) between
  W and P and on the W-P intensity difference that the OMIS spectrum measures.
* Camera: vignetting, exposure drift between W and P, PSF blur, shot + read noise, offset,
  and rare saturated, dark, defocused or misregistered fields.

Everything is deterministic for (slide seed, stage position, illumination, image size).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Final

import cv2
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from firmware_bridge.exceptions import InputError

log = logging.getLogger(__name__)

GENERATOR_VERSION: Final = "omis-sim-v2"
PAP_GROUPS: tuple[str, ...] = ("II", "III", "IV", "V")
STUDY_COUNTS: dict[str, int] = {"II": 141, "III": 112, "IV": 42, "V": 146}
RISK: dict[str, str] = {"II": "low", "III": "low", "IV": "high", "V": "high"}
ILLUMINATIONS: tuple[str, ...] = ("off", "diffuse", "polarized")

RGB = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]

# Mean latent lesion grade per group: 0 = normal, 1 = carcinoma.  The low/high boundary is 0.5.
GROUP_GRADE: Final = {"II": 0.0, "III": 0.33, "IV": 0.67, "V": 1.0}
# Between-slide spread of the grade at difficulty 1; it sets how much III and IV overlap.
GRADE_SD: Final = 0.28

# Absorbance (OD per unit stain) in the R, G, B channels, rows in map order H, E, L, K.
# Hematoxylin from Ruifrok's colour-deconvolution vectors; E = eosin/orange G (keratin,
# appears pink-orange), L = light green (cyanophilic cytoplasm), K = neutral debris.
ABSORBANCE: Final = np.array(
    [
        [0.65, 0.70, 0.29],
        [0.10, 0.85, 0.55],
        [0.90, 0.30, 0.45],
        [0.60, 0.60, 0.60],
    ],
    dtype=np.float32,
)
_NEG_ABSORBANCE_T: Final = np.ascontiguousarray(-ABSORBANCE.T)  # cv2.transform: dst = M · src
# Map channels: four optical densities, then D (P red/blue shift) and A (extra P loss).
N_MAPS: Final = 6
MAP_D: Final = 4
MAP_A: Final = 5
RB_SIGN: Final = np.array([1.0, 0.0, -1.0], dtype=np.float32)
WHITE_DN: Final = np.array([214.0, 222.0, 200.0], dtype=np.float32)  # clear glass, W, nominal

TILE_UM: Final = 200.0
SUBPIXEL: Final = 16  # cv2 drawing with shift=4: 1/16 pixel precision
MAX_BLOB_UM: Final = 40.0  # no blob reaches further than this from its tile
# The scene is rasterised 320-640 px across the field of view (1-2 µm at 640 µm), then resampled
# to the sensor: a raster detail, not part of the sample, which is defined in µm throughout.
RENDER_MIN_PX: Final = 320
RENDER_MAX_PX: Final = 640
CHROMATIN_GRAIN_UM: Final = 2.0  # grain of the chromatin texture
MIN_BLOB_PX: Final = 0.35  # smaller blobs are drawn this size at the same integrated density
# Vignetting is radial about the optical axis: ``vignetting`` is the loss at the corner of a
# 5:4 field (squared distance 1 + 0.8**2 half-widths), so every sensor shape sees the same optics.
VIGNETTE_CORNER2: Final = 1.0 + 0.8**2
TILE_CACHE: Final = 256
NOISE_BANK_LEN: Final = 1 << 23
_NOISE_BANK: list[F32] = []


class SimConfig(BaseModel):
    """Knobs of the synthetic sample and camera (defaults match the published study)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    difficulty: float = Field(
        1.0,
        ge=0.0,
        le=5.0,
        description="scales the between-slide overlap of the lesion grade and the slide nuisance;"
        " 0 = the groups' grades do not overlap, 1 = about the study's accuracy",
    )
    fov_width_um: float = Field(
        640.0, gt=10.0, le=5000.0, description="field of view width in µm, whatever the pixels"
    )
    cell_density_per_mm2: float = Field(
        420.0, ge=0.0, le=5000.0, description="mean epithelial cells per mm² (before clustering)"
    )
    debris_density_per_mm2: float = Field(
        250.0, ge=0.0, le=20000.0, description="mean debris particles per mm²"
    )
    stain_sd: float = Field(
        0.15, ge=0.0, le=1.0, description="log-sd of the slide's stain strength (at difficulty 1)"
    )
    vignetting: float = Field(
        0.22, ge=0.0, le=0.9, description="relative illumination loss in the field corners (radial)"
    )
    exposure_drift_sd: float = Field(
        0.03, ge=0.0, le=0.5, description="sd of the relative P-vs-W exposure drift per field"
    )
    polarizer_gain: float = Field(
        0.62, gt=0.0, le=1.0, description="P/W intensity ratio on clear glass"
    )
    psf_sigma_um: float = Field(0.6, ge=0.0, le=10.0, description="optical blur (Gaussian sd)")
    read_noise_dn: float = Field(1.5, ge=0.0, le=50.0, description="read noise sd in DN")
    shot_noise_gain: float = Field(
        0.04, ge=0.0, le=5.0, description="DN per photo-electron: shot variance = gain x signal"
    )
    dark_offset_dn: float = Field(2.0, ge=0.0, le=50.0, description="black level in DN")
    saturated_rate: float = Field(
        0.02, ge=0.0, le=1.0, description="fraction of overexposed fields"
    )
    dark_rate: float = Field(0.02, ge=0.0, le=1.0, description="fraction of underexposed fields")
    defocus_rate: float = Field(0.03, ge=0.0, le=1.0, description="fraction of out-of-focus fields")
    misregistration_rate: float = Field(
        0.02, ge=0.0, le=1.0, description="fraction of fields whose P is shifted against W"
    )
    misregistration_um: float = Field(
        2.0, ge=0.0, le=50.0, description="largest W/P shift on a misregistered field (µm)"
    )

    @model_validator(mode="after")
    def _fault_rates_fit(self) -> SimConfig:
        total = self.saturated_rate + self.dark_rate + self.defocus_rate
        if total + self.misregistration_rate > 1.0:
            raise ValueError("the four fault rates must add up to at most 1")
        return self


@dataclass(frozen=True)
class SlideTraits:
    """Per-slide latent state: the lesion grade and the slide's nuisance factors."""

    grade: float
    abnormal_fraction: float
    cellularity: float
    keratin_fraction: float
    inflammation: float
    stain: float
    hematoxylin_balance: float
    polarizer_gain: float
    background_shift: float
    vignetting: float
    noise_scale: float


@dataclass(frozen=True)
class FieldState:
    """Per-field conditions shared by W and P (so both show the same cells and faults)."""

    fault: str
    exposure: float
    p_drift: float
    blur_um: float
    shift_um: tuple[float, float]
    vignette_centre: tuple[float, float]


class _Blobs:
    """Ellipses with additive map contributions: cytoplasm, nuclei, debris (columns below)."""

    # x, y, ax, ay (µm), angle (deg), texture amplitude, then N_MAPS map values
    COLS: Final = 6 + N_MAPS

    def __init__(self, data: F32) -> None:
        self.data = data

    @staticmethod
    def concat(parts: list[_Blobs]) -> _Blobs:
        """All blobs of several tiles."""
        return _Blobs(np.concatenate([b.data for b in parts], axis=0))


def _f32(a: object) -> F32:
    # OpenCV's stubs type every result as a generic Mat; the data stays float32
    return np.asarray(a, dtype=np.float32)


def _seed_seq(*keys: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([k % (1 << 64) for k in keys])


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(_seed_seq(*keys))


def _noise_bank() -> F32:
    # Drawing ~4 M normals per 1280x1024 image costs more than rendering it; slices of one bank
    # at random offsets are statistically independent enough for sensor noise.
    if not _NOISE_BANK:
        bank = np.random.default_rng(0x0415).standard_normal(NOISE_BANK_LEN, dtype=np.float32)
        _NOISE_BANK.append(bank)
    return _NOISE_BANK[0]


def _um_key(v: float) -> int:
    return round(v * 1000.0)


def check_group(group: str) -> str:
    """Return ``group`` if it is a known Pap group, else raise :class:`InputError`."""
    if group not in PAP_GROUPS:
        raise InputError(f"unknown Pap group {group!r}; known: {', '.join(PAP_GROUPS)}")
    return group


def check_size(size: tuple[int, int]) -> tuple[int, int]:
    """Validate an image size given as (width, height)."""
    if len(size) != 2 or not all(isinstance(v, int | np.integer) for v in size):
        raise InputError(f"image size must be two integers (width, height), got {size!r}")
    w, h = int(size[0]), int(size[1])
    if not (8 <= w <= 8192 and 8 <= h <= 8192):
        raise InputError(f"image size {w}x{h} out of range (8..8192 pixels per side)")
    return w, h


def _draw_traits(group: str, seed: int, cfg: SimConfig) -> SlideTraits:
    rng = _rng(seed, 1)
    d = cfg.difficulty
    grade = GROUP_GRADE[group] + rng.normal(0.0, GRADE_SD * d)
    g = float(np.clip(grade, -0.3, 1.4))
    return SlideTraits(
        grade=float(grade),
        abnormal_fraction=float(np.clip(0.03 + 0.55 * g, 0.0, 0.8)),
        cellularity=float((1.0 + 0.25 * max(g, 0.0)) * rng.lognormal(0.0, 0.15)),
        keratin_fraction=float(np.clip(rng.normal(0.55, 0.15), 0.1, 0.9)),
        inflammation=float(rng.lognormal(-0.5, 0.8)),
        stain=float(rng.lognormal(0.0, cfg.stain_sd * d)),
        hematoxylin_balance=float(rng.lognormal(0.0, 0.08 * d)),
        polarizer_gain=float(cfg.polarizer_gain * rng.lognormal(0.0, 0.02 * d)),
        background_shift=float(rng.normal(0.0, 0.004 * d)),
        vignetting=float(cfg.vignetting * rng.uniform(0.6, 1.4)),
        noise_scale=float(rng.uniform(0.8, 1.25)),
    )


def _epithelial_blobs(
    rng: np.random.Generator, t: SlideTraits, n: int, x0: float, y0: float
) -> F32:
    """Cytoplasm and nucleus blobs of ``n`` squamous cells in the tile at (x0, y0)."""
    # a third of the cells cluster (sheets and overlapping groups), the rest lie alone
    n_cl = rng.integers(1, 3)
    centres = rng.uniform(0, TILE_UM, size=(n_cl, 2))
    clustered = rng.random(n) < 0.35
    pos = rng.uniform(0, TILE_UM, size=(n, 2))
    near = centres[rng.integers(0, n_cl, n)] + rng.normal(0, 18.0, size=(n, 2))
    pos[clustered] = np.clip(near[clustered], 0, TILE_UM)
    abnormal = rng.random(n) < t.abnormal_fraction
    sev = np.where(abnormal, np.clip(t.grade + rng.normal(0, 0.2, n), 0.1, 1.4), 0.0)
    big_r = rng.uniform(18, 28, n) * (1 - 0.4 * np.minimum(sev, 1.0))
    aspect = rng.uniform(0.65, 1.0, n)
    ang = rng.uniform(0, 180, n)
    nuc_r = np.minimum(rng.uniform(2.4, 3.4, n) * (1 + 1.6 * sev), 0.75 * big_r * aspect)
    nuc_aspect = rng.uniform(0.7, 1.0, n) - 0.1 * sev
    # clipped so that no nucleus reaches beyond MAX_BLOB_UM from its tile
    off = np.clip(rng.normal(0, 0.15, size=(n, 2)), -0.3, 0.3) * big_r[:, None]
    keratin = (rng.random(n) < t.keratin_fraction * (1 - 0.7 * np.minimum(sev, 1))).astype(float)
    e = np.clip(0.15 + 0.7 * keratin + rng.normal(0, 0.05, n), 0.0, 1.0)
    cyto_od = rng.uniform(0.14, 0.32, n) * t.stain
    nuc_od = rng.uniform(0.45, 0.65, n) * (1 + 0.9 * sev) * t.stain * t.hematoxylin_balance

    cyto = np.zeros((n, _Blobs.COLS), np.float32)
    cyto[:, 0:2] = pos + np.array([x0, y0])
    cyto[:, 2], cyto[:, 3], cyto[:, 4] = big_r, big_r * aspect, ang
    cyto[:, 6 + 0] = 0.04 * cyto_od  # faint hematoxylin uptake
    cyto[:, 6 + 1] = cyto_od * e
    cyto[:, 6 + 2] = cyto_od * (1 - e)
    cyto[:, 6 + MAP_D] = 0.006 + 0.02 * e  # keratin is weakly birefringent
    cyto[:, 6 + MAP_A] = 0.03
    nuc = np.zeros((n, _Blobs.COLS), np.float32)
    nuc[:, 0:2] = cyto[:, 0:2] + off
    nuc[:, 2], nuc[:, 3], nuc[:, 4] = nuc_r, nuc_r * nuc_aspect, rng.uniform(0, 180, n)
    nuc[:, 5] = 0.12 + 0.5 * sev  # chromatin coarseness
    nuc[:, 6 + 0] = nuc_od
    nuc[:, 6 + MAP_D] = (0.05 + 0.11 * sev) * rng.uniform(0.8, 1.2, n)
    nuc[:, 6 + MAP_A] = 0.06 + 0.22 * sev
    return np.concatenate([cyto, nuc], axis=0)


def _nuisance_blobs(
    rng: np.random.Generator, t: SlideTraits, cfg: SimConfig, x0: float, y0: float
) -> F32:
    """Debris particles and leukocytes (small dark nuclei) of one tile."""
    area_mm2 = (TILE_UM / 1000.0) ** 2
    n_deb = rng.poisson(cfg.debris_density_per_mm2 * area_mm2)
    n_leu = rng.poisson(150.0 * t.inflammation * area_mm2)
    deb = np.zeros((n_deb, _Blobs.COLS), np.float32)
    deb[:, 0:2] = rng.uniform(0, TILE_UM, size=(n_deb, 2)) + np.array([x0, y0])
    r = rng.gamma(2.0, 0.8, n_deb) + 0.4
    deb[:, 2], deb[:, 3], deb[:, 4] = (
        r,
        r * rng.uniform(0.4, 1.0, n_deb),
        rng.uniform(0, 180, n_deb),
    )
    deb[:, 6 + 3] = rng.uniform(0.2, 1.2, n_deb)
    deb[:, 6 + MAP_D] = rng.normal(0, 0.06, n_deb)
    deb[:, 6 + MAP_A] = rng.uniform(0.0, 0.3, n_deb)
    leu = np.zeros((n_leu, _Blobs.COLS), np.float32)
    leu[:, 0:2] = rng.uniform(0, TILE_UM, size=(n_leu, 2)) + np.array([x0, y0])
    lr = rng.uniform(2.5, 3.5, n_leu)
    leu[:, 2], leu[:, 3], leu[:, 4] = (
        lr,
        lr * rng.uniform(0.6, 0.9, n_leu),
        rng.uniform(0, 180, n_leu),
    )
    leu[:, 5] = 0.3
    leu[:, 6 + 0] = rng.uniform(0.7, 1.1, n_leu) * t.stain
    leu[:, 6 + MAP_D] = 0.06
    leu[:, 6 + MAP_A] = 0.1
    return np.concatenate([deb, leu], axis=0)


class SyntheticSlide:
    """One simulated Pap smear: render W/P fields at any stage position.

    Not thread-safe (it caches tiles and the last field's scene); use one per thread.
    """

    def __init__(
        self, slide_id: str, pap_group: str, seed: int, config: SimConfig | None = None
    ) -> None:
        self.slide_id = slide_id
        self.pap_group = check_group(pap_group)
        self.seed = int(seed)
        self.config = config or SimConfig()
        self._tiles: OrderedDict[tuple[int, int], _Blobs] = OrderedDict()
        self._scene_key: tuple[int, int, int, int] | None = None
        self._scene: tuple[F32, FieldState, float] | None = None

    def __repr__(self) -> str:
        return f"SyntheticSlide({self.slide_id!r}, {self.pap_group!r}, seed={self.seed})"

    @property
    def risk(self) -> str:
        """``low`` (II, III) or ``high`` (IV, V)."""
        return RISK[self.pap_group]

    @cached_property
    def traits(self) -> SlideTraits:
        """The slide's latent grade and nuisance factors (drawn from its seed)."""
        return _draw_traits(self.pap_group, self.seed, self.config)

    def field_positions(self, n: int) -> list[tuple[float, float]]:
        """``n`` well separated stage positions (µm) on this slide, as a scan would visit them."""
        rng = _rng(self.seed, 2)
        step = 1.25 * self.config.fov_width_um
        x0, y0 = rng.uniform(2000.0, 6000.0, size=2)
        cols = 8
        return [(float(x0 + (k % cols) * step), float(y0 + (k // cols) * step)) for k in range(n)]

    def field_fault(self, x_um: float, y_um: float) -> str:
        """The simulated fault of the field at (x_um, y_um): ``ok``, ``saturated``, ``dark``,
        ``defocus`` or ``misregistered`` (ground truth for quality-control tests)."""
        return self._field_state(x_um, y_um).fault

    def render_field(  # noqa: PLR0917 -- positional signature fixed for the camera simulator
        self,
        x_um: float,
        y_um: float,
        illumination: str,
        size: tuple[int, int] = (1280, 1024),
        led_current: float = 1.0,
        exposure: float = 1.0,
    ) -> RGB:
        """The RGB uint8 H×W×3 camera frame of the field centred at (x_um, y_um)."""
        if illumination not in ILLUMINATIONS:
            raise InputError(
                f"unknown illumination {illumination!r}; known: {', '.join(ILLUMINATIONS)}"
            )
        width, height = check_size(size)
        if not (math.isfinite(led_current) and led_current >= 0):
            raise InputError(f"led_current must be >= 0, got {led_current}")
        if not (math.isfinite(exposure) and exposure > 0):
            raise InputError(f"exposure must be > 0, got {exposure}")
        noise_rng = _rng(
            self.seed,
            _um_key(x_um),
            _um_key(y_um),
            ILLUMINATIONS.index(illumination),
            width,
            height,
            7,
        )
        if illumination == "off" or led_current == 0:
            signal = np.zeros((height, width, 3), np.float32)
            return self._camera(signal, noise_rng)
        maps, state, px_um = self._field_scene(x_um, y_um, width, height)
        light = self._light(maps, state, px_um, illumination == "polarized")
        signal = self._optics(light, state, px_um, illumination == "polarized", (width, height))
        signal *= np.float32(led_current * exposure)
        return self._camera(signal, noise_rng)

    def render_pair(
        self, x_um: float, y_um: float, size: tuple[int, int] = (1280, 1024)
    ) -> tuple[RGB, RGB]:
        """(diffuse, polarized) frames of one field, aligned as the instrument takes them."""
        w = self.render_field(x_um, y_um, "diffuse", size)
        p = self.render_field(x_um, y_um, "polarized", size)
        return w, p

    # -- scene -------------------------------------------------------------------------------

    def _tile(self, tx: int, ty: int) -> _Blobs:
        key = (tx, ty)
        cached = self._tiles.get(key)
        if cached is not None:
            self._tiles.move_to_end(key)
            return cached
        t, cfg = self.traits, self.config
        rng = _rng(self.seed, 3, tx, ty)
        x0, y0 = tx * TILE_UM, ty * TILE_UM
        n = rng.poisson(cfg.cell_density_per_mm2 * t.cellularity * (TILE_UM / 1000.0) ** 2)
        blobs = _Blobs(
            np.concatenate(
                [_epithelial_blobs(rng, t, n, x0, y0), _nuisance_blobs(rng, t, cfg, x0, y0)]
            )
        )
        self._tiles[key] = blobs
        if len(self._tiles) > TILE_CACHE:
            self._tiles.popitem(last=False)
        return blobs

    def _field_state(self, x_um: float, y_um: float) -> FieldState:
        cfg, d = self.config, self.config.difficulty
        rng = _rng(self.seed, _um_key(x_um), _um_key(y_um), 5)
        u = rng.random()
        cuts = np.cumsum(
            [cfg.saturated_rate, cfg.dark_rate, cfg.defocus_rate, cfg.misregistration_rate]
        )
        fault = ("saturated", "dark", "defocus", "misregistered", "ok")[
            int(np.searchsorted(cuts, u, "right"))
        ]
        exposure = {"saturated": rng.uniform(1.6, 3.0), "dark": rng.uniform(0.03, 0.12)}.get(
            fault, 1.0
        )
        blur = rng.uniform(4.0, 8.0) if fault == "defocus" else self.config.psf_sigma_um
        shift = (0.0, 0.0)
        if fault == "misregistered":
            ang = rng.uniform(0, 2 * math.pi)
            mag = rng.uniform(0.4, 1.0) * cfg.misregistration_um
            shift = (mag * math.cos(ang), mag * math.sin(ang))
        return FieldState(
            fault=fault,
            exposure=float(exposure * rng.lognormal(0.0, 0.02)),
            p_drift=float(rng.lognormal(0.0, cfg.exposure_drift_sd * d)),
            blur_um=float(blur),
            shift_um=shift,
            vignette_centre=(float(rng.uniform(-0.1, 0.1)), float(rng.uniform(-0.1, 0.1))),
        )

    def _field_scene(
        self, x_um: float, y_um: float, width: int, height: int
    ) -> tuple[F32, FieldState, float]:
        key = (_um_key(x_um), _um_key(y_um), width, height)
        if self._scene_key == key and self._scene is not None:
            return self._scene
        rw = min(max(width, RENDER_MIN_PX), RENDER_MAX_PX)
        rh = max(1, round(height * rw / width))
        px_um = self.config.fov_width_um / rw
        x_left = x_um - rw * px_um / 2
        y_top = y_um - rh * px_um / 2
        blobs = self._blobs_in(x_left, y_top, rw * px_um, rh * px_um)
        rng = _rng(self.seed, key[0], key[1], 6)
        maps = _rasterize(blobs, (x_left, y_top), px_um, (rh, rw), rng)
        log.debug("%s: field (%.0f, %.0f) µm, %d blobs", self.slide_id, x_um, y_um, len(blobs.data))
        self._scene_key, self._scene = key, (maps, self._field_state(x_um, y_um), px_um)
        return self._scene

    def _blobs_in(self, x: float, y: float, w: float, h: float) -> _Blobs:
        tx0 = math.floor((x - MAX_BLOB_UM) / TILE_UM)
        tx1 = math.floor((x + w + MAX_BLOB_UM) / TILE_UM)
        ty0 = math.floor((y - MAX_BLOB_UM) / TILE_UM)
        ty1 = math.floor((y + h + MAX_BLOB_UM) / TILE_UM)
        tiles = [self._tile(tx, ty) for ty in range(ty0, ty1 + 1) for tx in range(tx0, tx1 + 1)]
        return _Blobs.concat(tiles)

    # -- light and camera --------------------------------------------------------------------

    def _light(self, maps: F32, state: FieldState, px_um: float, polarized: bool) -> F32:
        """Noise-free irradiance (DN at exposure 1) of the field, at render resolution."""
        t = self.traits
        # cv2.transform, not a numpy matmul: OpenBLAS worker threads spin and double the CPU
        # time of every render on a busy machine
        neg_od = cv2.transform(np.ascontiguousarray(maps[..., :4]), _NEG_ABSORBANCE_T)
        light = _f32(cv2.exp(neg_od))
        light *= WHITE_DN
        if polarized:
            extra = np.exp(-maps[..., MAP_A])[..., None]
            shift = maps[..., MAP_D, None] + np.float32(t.background_shift)
            light *= extra * (1.0 + shift * RB_SIGN)
            light *= np.float32(t.polarizer_gain * state.p_drift)
        illum = _vignette(maps.shape[:2], state.vignette_centre, t.vignetting)
        light *= (illum * np.float32(state.exposure))[..., None]
        return light

    def _optics(
        self, light: F32, state: FieldState, px_um: float, polarized: bool, size: tuple[int, int]
    ) -> F32:
        """PSF blur, W/P misregistration and resampling to the sensor size."""
        sigma = state.blur_um / px_um
        if sigma > 0.05:
            light = _f32(cv2.GaussianBlur(light, (0, 0), sigma, borderType=cv2.BORDER_REFLECT))
        if polarized and state.shift_um != (0.0, 0.0):
            dx, dy = (v / px_um for v in state.shift_um)
            m = np.array([[1, 0, dx], [0, 1, dy]], np.float32)
            light = _f32(
                cv2.warpAffine(
                    light, m, (light.shape[1], light.shape[0]), borderMode=cv2.BORDER_REFLECT
                )
            )
        width, height = size
        if light.shape[1] != width or light.shape[0] != height:
            interp = cv2.INTER_AREA if width < light.shape[1] else cv2.INTER_LINEAR
            light = _f32(cv2.resize(light, (width, height), interpolation=interp))
        return light

    def _camera(self, signal: F32, rng: np.random.Generator) -> RGB:
        """Shot and read noise, black level, 8-bit quantisation with clipping."""
        cfg = self.config
        scale = np.float32(self.traits.noise_scale)
        n = signal.size
        bank = _noise_bank()
        if n <= bank.size // 2:
            start = int(rng.integers(0, bank.size - n))
            noise = bank[start : start + n].reshape(signal.shape)
        else:
            noise = rng.standard_normal(signal.shape, dtype=np.float32)
        var = signal * np.float32(cfg.shot_noise_gain * scale)
        var += np.float32((cfg.read_noise_dn * scale) ** 2)
        np.sqrt(var, out=var)
        var *= noise
        var += signal
        var += np.float32(cfg.dark_offset_dn + 0.5)  # +0.5: truncation below rounds
        np.clip(var, 0.0, 255.0, out=var)
        out: RGB = var.astype(np.uint8)
        return out


def _vignette(shape: tuple[int, ...], centre: tuple[float, float], amount: float) -> F32:
    """Radial illumination fall-off about the optical axis, in half field widths.

    ``centre`` is the axis's offset from the field centre, in half widths; the loss is
    ``amount`` at the squared distance VIGNETTE_CORNER2 (the corner of a 5:4 field).
    """
    rh, rw = shape[0], shape[1]
    # pixel centres in half field widths: the same point of the field at any raster size
    xs = ((np.arange(rw, dtype=np.float32) + 0.5) * (2 / rw) - 1 - centre[0]) ** 2
    ys = ((np.arange(rh, dtype=np.float32) + 0.5) * (2 / rw) - rh / rw - centre[1]) ** 2
    illum: F32 = 1.0 - np.float32(amount / VIGNETTE_CORNER2) * (ys[:, None] + xs[None, :])
    np.maximum(illum, 0.05, out=illum)  # strong settings must not give negative light
    return illum


def _rasterize(
    blobs: _Blobs,
    origin_um: tuple[float, float],
    px_um: float,
    shape: tuple[int, int],
    rng: np.random.Generator,
) -> F32:
    """Additive maps (H, E, L, K, D, A) of the field at render resolution."""
    rh, rw = shape
    maps = np.zeros((rh, rw, N_MAPS), np.float32)
    # chromatin texture: smooth noise of CHROMATIN_GRAIN_UM grain, shared by the field's nuclei
    grain_px = CHROMATIN_GRAIN_UM / px_um
    grid = (math.ceil(rh / grain_px) + 1, math.ceil(rw / grain_px) + 1)
    tex = _f32(
        cv2.resize(
            rng.standard_normal(grid, dtype=np.float32), (rw, rh), interpolation=cv2.INTER_LINEAR
        )
    )
    # mucus / background haze: very low-frequency counterstain
    haze = cv2.resize(rng.random((4, 5), dtype=np.float32), (rw, rh), interpolation=cv2.INTER_CUBIC)
    maps[..., 1] += 0.02 * haze
    maps[..., 2] += 0.02 * (1 - haze)
    d = blobs.data
    # centre x, y, half-axes, reach (pixels), density scale
    geom = np.empty((d.shape[0], 6), np.float64)
    geom[:, 0] = (d[:, 0] - origin_um[0]) / px_um
    geom[:, 1] = (d[:, 1] - origin_um[1]) / px_um
    axes = d[:, 2:4] / px_um
    # sub-pixel blobs are drawn larger and fainter: the same integrated density at any raster
    geom[:, 2:4] = np.maximum(axes, MIN_BLOB_PX)
    geom[:, 4] = geom[:, 2:4].max(axis=1) + 2
    geom[:, 5] = axes.prod(axis=1) / geom[:, 2:4].prod(axis=1)
    cx, cy, reach = geom[:, 0], geom[:, 1], geom[:, 4]
    keep = (cx + reach > 0) & (cx - reach < rw) & (cy + reach > 0) & (cy - reach < rh)
    for i in np.flatnonzero(keep):
        _draw_blob(maps, tex, d[i], geom[i])
    return maps


def _draw_blob(maps: F32, tex: F32, row: F32, geom: npt.NDArray[np.float64]) -> None:
    """Add one anti-aliased ellipse's map values, drawn only inside its bounding box."""
    cx, cy, ax, ay, reach, density = (float(v) for v in geom)
    rh, rw = maps.shape[:2]
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, rw)
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, rh)
    if x1 <= x0 or y1 <= y0:
        return
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.ellipse(
        mask,
        (round((cx - x0) * SUBPIXEL), round((cy - y0) * SUBPIXEL)),
        (round(ax * SUBPIXEL), round(ay * SUBPIXEL)),
        float(row[4]),
        0,
        360,
        255,
        -1,
        cv2.LINE_AA,
        4,
    )
    m = mask.astype(np.float32) * np.float32(1 / 255)
    amp = row[5]
    if amp > 0:
        m *= np.maximum(1.0 + amp * tex[y0:y1, x0:x1], 0.0)
    maps[y0:y1, x0:x1] += m[..., None] * (row[6:] * np.float32(density))


def scale_counts(n: int, groups: dict[str, float] | None = None) -> dict[str, int]:
    """Split ``n`` slides over Pap groups in the given proportions (default: the study's).

    Largest-remainder rounding, ties broken by group order, so the result is deterministic
    and sums to ``n``; weights that already sum to ``n`` are returned unchanged.
    """
    if n < 1:
        raise InputError(f"number of slides must be >= 1, got {n}")
    weights = dict(STUDY_COUNTS if groups is None else groups)
    for g, v in weights.items():
        check_group(g)
        if not (math.isfinite(v) and v >= 0):
            raise InputError(f"group {g}: weight must be >= 0, got {v}")
    total = sum(weights.values())
    if total <= 0:
        raise InputError("group weights sum to zero")
    exact = {g: n * weights.get(g, 0) / total for g in PAP_GROUPS}
    counts = {g: math.floor(v) for g, v in exact.items()}
    left = n - sum(counts.values())
    order = sorted(PAP_GROUPS, key=lambda g: (-(exact[g] - counts[g]), PAP_GROUPS.index(g)))
    for g in order[:left]:
        counts[g] += 1
    return counts


def group_for(index: int, seed: int, groups: dict[str, int] | None = None) -> str:
    """The Pap group of slide ``index`` of a dataset with these group counts (a seeded shuffle).

    Indices beyond the total continue in further shuffled blocks of the same counts.
    """
    counts = dict(STUDY_COUNTS if groups is None else groups)
    for g in counts:
        check_group(g)
    labels = [g for g in PAP_GROUPS for _ in range(int(counts.get(g, 0)))]
    if not labels:
        raise InputError("group counts are all zero")
    if index < 0:
        raise InputError(f"slide index must be >= 0, got {index}")
    block, pos = divmod(index, len(labels))
    order = _rng(seed, 4, block).permutation(len(labels))
    return labels[int(order[pos])]


def slide_id_for(index: int, seed: int) -> str:
    """The slide id of slide ``index`` of the dataset with ``seed``."""
    return f"sim{seed}-{index:04d}"


def slide_for(
    index: int, seed: int, groups: dict[str, int] | None = None, config: SimConfig | None = None
) -> SyntheticSlide:
    """Slide ``index`` of the synthetic dataset with ``seed`` (deterministic)."""
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    group = group_for(index, seed, groups)
    slide_seed = int(_seed_seq(seed, 8, index).generate_state(1, np.uint64)[0])
    return SyntheticSlide(slide_id_for(index, seed), group, slide_seed, config)
