"""Galaxy images: pixel geometry, a synthetic edge-on disk generator, the Galaxy10 loader and
training augmentation.

Geometry (shared with :mod:`pyro_physvae.models.galaxy`): a square image of ``size`` pixels
covers ``[-1, 1]`` in both directions, pixel centres included, ``x`` increasing to the right
(columns) and ``y`` upwards (row 0 is the top, ``y = +1``). An angle ``theta`` is measured
counter-clockwise from the ``+x`` axis as the image is displayed; a galaxy's major axis at
``theta`` looks the same at ``theta + pi``.

Synthetic truth (richer than the model's physics ``I0 exp(-r)``): a Sersic disk
``I0 exp(-r^(1/n))`` with index ``n`` around 1, a small redder bulge, a dust lane that dims the
light along the disk plane (more in blue), bands whose scale lengths grow towards blue
(a colour gradient), Gaussian PSF blur, a centre offset of a fraction of a pixel, pixel
integration (supersampling), sky and signal-dependent noise, clipping to ``[0, 1]`` and
8-bit quantisation, as in the Galaxy10 JPEG cut-outs. The data set keeps the true ``I0``, ``A``,
``e`` and ``theta`` of the disk (the quantities the model's physics means) and every nuisance
parameter.

Data sets hold ``x`` with dims ``(sequence, band, row, col)``, values in ``[0, 1]``, bands
ordered red, green, blue; the coordinates ``row`` and ``col`` are the ``y`` and ``x`` of the
pixel centres.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from torch import Tensor

from pyro_physvae.data.io import generate_splits
from pyro_physvae.data.reference import read_npy_array
from pyro_physvae.validation import check_positive_int

SYSTEM = "galaxy"
#: The physics parameters of the model (true values of the synthetic disk).
PARAMS = ("I0", "A", "e", "theta")
#: Nuisance parameters of the synthetic truth, kept in the data sets.
NUISANCE = ("sersic_index", "bulge_fraction", "bulge_radius", "dust_depth", "dust_width",
            "colour_green", "colour_blue", "colour_gradient", "psf_fwhm", "noise_std")
BANDS = ("red", "green", "blue")
UNITS = {"I0": "1 (fraction of full scale)", "A": "half image widths", "e": "1", "theta": "rad",
         "bulge_radius": "half image widths", "dust_width": "half image widths",
         "psf_fwhm": "half image widths", "noise_std": "1"}
#: The Galaxy10 (SDSS) class of the paper: "disk, edge-on, no bulge".
GALAXY10_EDGE_ON_CLASS = 6


# -- geometry ---------------------------------------------------------------------------------
def pixel_grid(size: int, *, dtype: torch.dtype | None = None, device=None) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates ``x, y``, each ``(size, size)``: ``x`` from -1 (left) to 1
    (right) along columns, ``y`` from 1 (top row) to -1 (bottom row)."""
    check_positive_int(size, "image size")
    if size < 2:
        raise ValueError(f"image size must be at least 2 pixels, got {size}")
    t = torch.linspace(-1.0, 1.0, size, dtype=dtype, device=device)
    return t[None, :].expand(size, size), t.flip(0)[:, None].expand(size, size)


def rotated_coordinates(x: Tensor, y: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """Coordinates along (``u``) and across (``v``) an axis at angle ``theta`` [rad].

    ``x, y``: ``(H, W)``; ``theta``: ``(...)``. Returns ``u, v`` of shape ``(..., H, W)``.
    """
    c, s = torch.cos(theta)[..., None, None], torch.sin(theta)[..., None, None]
    return c * x + s * y, c * y - s * x


def elliptical_radius(x: Tensor, y: Tensor, A: Tensor, e: Tensor, theta: Tensor) -> Tensor:
    """``r = sqrt((u / A)^2 + (v / B)^2)`` with ``B = A (1 - e)``: the radius in units of the
    scale ``A`` along the major axis at ``theta``, for parameters ``(...)``; ``(..., H, W)``.

    A tiny constant under the square root keeps the gradient finite at the centre pixel.
    """
    u, v = rotated_coordinates(x, y, theta)
    a = A[..., None, None]
    b = a * (1.0 - e[..., None, None])
    return torch.sqrt((u / a).pow(2) + (v / b).pow(2) + 1e-12)


def exponential_disk(I0: Tensor, A: Tensor, e: Tensor, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """The model's physics: ``I0 exp(-r)`` on the grid ``x, y (H, W)`` for parameters
    ``(...)``; returns ``(..., H, W)``."""
    return I0[..., None, None] * torch.exp(-elliptical_radius(x, y, A, e, theta))


def check_images(x: Tensor | np.ndarray, name: str = "x", *, size: int | None = None,
                 bands: int = 3, value_range: tuple[float, float] | None = (0.0, 1.0)) -> None:
    """Check a batch of images ``(N, bands, H, W)``: rank, band count, square size, at least
    one image, finite values inside ``value_range`` (``None``: not checked)."""
    shape = tuple(x.shape)
    if len(shape) != 4:
        raise ValueError(f"{name} must have 4 dimensions (image, band, row, col), got shape {shape}")
    if shape[0] < 1:
        raise ValueError(f"{name} holds no images (shape {shape})")
    if shape[1] != bands:
        raise ValueError(f"{name} must have {bands} bands in dimension 1, got shape {shape}")
    if shape[2] != shape[3] or (size is not None and shape[2] != size):
        want = f"{size}x{size}" if size is not None else "square"
        raise ValueError(f"{name} must hold {want} images, got shape {shape}")
    arr = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    finite = torch.isfinite(arr)
    if not bool(finite.all()):
        rows = torch.nonzero(~finite.flatten(1).all(1)).flatten()[:5].tolist()
        raise ValueError(f"{name} contains NaN or infinite values (first bad images: {rows})")
    if value_range is not None:
        lo, hi = float(arr.min()), float(arr.max())
        if lo < value_range[0] or hi > value_range[1]:
            raise ValueError(f"{name} must lie in [{value_range[0]:g}, {value_range[1]:g}] "
                             f"(images scaled to full scale 1), got values in [{lo:.4g}, {hi:.4g}]")


# -- synthetic data ---------------------------------------------------------------------------
@dataclass(frozen=True)
class GalaxyDataConfig:
    """Sizes, resolution and ranges (``(low, high)``, uniform draws) of the synthetic set.

    Lengths are in half image widths (the image spans ``[-1, 1]``), so that a data set of
    another resolution shows the same galaxies. ``I0`` is the disk's central intensity in the
    red band before dust; ``A`` its e-folding scale along the major axis; ``e`` its ellipticity
    (minor scale ``A (1 - e)``); ``theta`` the major axis angle.
    """

    n_train: int = 1000
    n_valid: int = 200
    n_test: int = 500
    image_size: int = 69
    I0: tuple[float, float] = (0.5, 0.9)
    A: tuple[float, float] = (0.2, 0.7)
    e: tuple[float, float] = (0.35, 0.8)
    theta: tuple[float, float] = (0.0, math.pi)
    sersic_index: tuple[float, float] = (0.7, 1.5)
    bulge_fraction: tuple[float, float] = (0.0, 0.3)
    bulge_radius: tuple[float, float] = (0.03, 0.08)
    bulge_axis_ratio: tuple[float, float] = (0.6, 1.0)
    dust_depth: tuple[float, float] = (0.0, 0.6)
    dust_width: tuple[float, float] = (0.01, 0.03)
    colour_green: tuple[float, float] = (0.75, 1.0)
    colour_blue: tuple[float, float] = (0.5, 0.9)
    colour_gradient: tuple[float, float] = (0.0, 0.2)
    psf_fwhm: tuple[float, float] = (0.03, 0.06)
    centre_jitter: float = 0.015
    sky_noise: tuple[float, float] = (0.005, 0.015)
    shot_noise: float = 5e-4
    supersample: int = 3
    quantize: bool = True

    def __post_init__(self) -> None:
        for name in ("n_train", "n_valid", "n_test", "image_size", "supersample"):
            check_positive_int(getattr(self, name), name)
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {self.image_size}")
        for name, value in asdict(self).items():
            if isinstance(value, tuple):
                lo, hi = value
                if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                    raise ValueError(f"range of {name} must be finite with low <= high, got {value}")
        checks = {"I0": (0.0, 1.0), "e": (0.0, 0.99), "bulge_fraction": (0.0, 1.0),
                  "bulge_axis_ratio": (0.05, 1.0), "dust_depth": (0.0, 0.9),
                  "colour_green": (0.0, 1.0), "colour_blue": (0.0, 1.0)}
        for name, (lo, hi) in checks.items():
            a, b = getattr(self, name)
            if a < lo or b > hi:
                raise ValueError(f"range of {name} must lie in [{lo}, {hi}], got {(a, b)}")
        for name in ("A", "sersic_index", "bulge_radius", "dust_width", "psf_fwhm"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"range of {name} must be positive, got {getattr(self, name)}")
        for name in ("centre_jitter", "shot_noise"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.sky_noise[0] < 0:
            raise ValueError(f"sky_noise must be >= 0, got {self.sky_noise}")


def _draw_parameters(n: int, config: GalaxyDataConfig, g: torch.Generator) -> dict[str, Tensor]:
    """Uniform float64 draws ``(n,)`` of every ranged field of ``config`` (and offsets)."""
    names = [k for k, v in asdict(config).items() if isinstance(v, tuple)]
    out = {k: getattr(config, k)[0] + (getattr(config, k)[1] - getattr(config, k)[0])
           * torch.rand(n, generator=g, dtype=torch.float64) for k in names}
    for k in ("dx", "dy"):
        out[k] = config.centre_jitter * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)
    out["dust_offset"] = 0.5 * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)
    return out


def _fine_grid(size: int, factor: int) -> tuple[Tensor, Tensor]:
    """Sub-pixel sample positions: ``factor x factor`` per pixel of a ``size`` grid."""
    h = 2.0 / (size - 1)
    half = h * (factor - 1) / (2 * factor)
    t = torch.linspace(-1.0 - half, 1.0 + half, size * factor, dtype=torch.float64)
    return t[None, :].expand(len(t), len(t)), t.flip(0)[:, None].expand(len(t), len(t))


def render_truth(p: dict[str, Tensor], size: int, supersample: int = 3) -> Tensor:
    """Noise-free three-band images ``(n, 3, size, size)`` (float64, before blur) of the
    synthetic galaxies with parameters ``p`` (each ``(n,)``), integrated over pixels."""
    x, y = _fine_grid(size, supersample)
    x = x - p["dx"][:, None, None]
    y = y - p["dy"][:, None, None]
    u, v = rotated_coordinates(x, y, p["theta"])  # (n, H', W')
    col = lambda t: t[:, None, None]  # noqa: E731
    b_minor = col(p["A"] * (1 - p["e"]))
    bands = []
    gradient = (0.0, 0.5, 1.0)
    colour = (torch.ones_like(p["I0"]), p["colour_green"], p["colour_blue"])
    bulge_colour = (1.0, 0.8, 0.65)
    dust_boost = (1.0, 1.25, 1.5)
    r_b = torch.sqrt((u / col(p["bulge_radius"])).pow(2)
                     + (v / col(p["bulge_radius"] * p["bulge_axis_ratio"])).pow(2))
    lane = (torch.exp(-0.5 * ((v - col(p["dust_offset"]) * b_minor) / col(p["dust_width"])).pow(2))
            * torch.exp(-0.5 * (u / (1.5 * col(p["A"]))).pow(2)))
    for k in range(3):
        scale = col(p["A"] * (1 + p["colour_gradient"] * gradient[k]))
        r = torch.sqrt((u / scale).pow(2) + (v / (scale * (1 - col(p["e"])))).pow(2))
        disk = col(p["I0"] * colour[k]) * torch.exp(-r.pow(1.0 / col(p["sersic_index"])))
        bulge = col(p["I0"] * p["bulge_fraction"] * colour[k] * bulge_colour[k]) * torch.exp(-r_b.sqrt())
        tau = (col(p["dust_depth"]) * dust_boost[k]).clamp(max=0.95)
        bands.append((disk + bulge) * (1 - tau * lane))
    fine = torch.stack(bands, 1)
    return F.avg_pool2d(fine, supersample)


def gaussian_blur(images: Tensor, fwhm: Tensor, pixel: float) -> Tensor:
    """Blur each image ``(n, C, H, W)`` with its own Gaussian PSF of full width at half
    maximum ``fwhm (n,)`` (coordinate units; ``pixel`` is the pixel spacing), separably."""
    n, c, h, w = images.shape
    sigma = (fwhm / (2 * math.sqrt(2 * math.log(2))) / pixel).clamp_min(1e-3)  # pixels
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    t = torch.arange(-radius, radius + 1, dtype=images.dtype)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None]).pow(2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, K)
    flat = images.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0)), k[:, None, None, :], groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius)), k[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def generate_split(n: int, config: GalaxyDataConfig, generator: torch.Generator, split: str = "train",
                   chunk: int = 100) -> xr.Dataset:
    """One split of ``n`` synthetic galaxy images with their true parameters."""
    p = _draw_parameters(n, config, generator)
    size = config.image_size
    images = []
    for i in range(0, n, chunk):
        q = {k: v[i:i + chunk] for k, v in p.items()}
        clean = gaussian_blur(render_truth(q, size, config.supersample), q["psf_fwhm"], 2.0 / (size - 1))
        std = torch.sqrt(q["sky_noise"][:, None, None, None].pow(2) + config.shot_noise * clean.clamp_min(0))
        noisy = (clean + std * torch.randn(clean.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
        if config.quantize:
            noisy = torch.round(noisy * 255) / 255
        images.append(noisy)
    x = torch.cat(images).numpy()
    params = {k: p[k].numpy() for k in PARAMS}
    params.update({k: p[k].numpy() for k in NUISANCE if k in p})
    params["noise_std"] = p["sky_noise"].numpy()
    return make_dataset(x, params, split=split,
                        attrs={"source": "synthetic", "shot_noise": config.shot_noise})


def generate(config: GalaxyDataConfig = GalaxyDataConfig(), seed: int = 0) -> dict[str, xr.Dataset]:
    """All three splits, reproducible from ``seed``."""
    return generate_splits(config, seed, generate_split)


def make_dataset(x: np.ndarray, params: dict[str, np.ndarray] | None = None, *, split: str = "",
                 attrs: dict | None = None, extra: dict[str, np.ndarray] | None = None) -> xr.Dataset:
    """Wrap images ``x (N, 3, S, S)`` in ``[0, 1]`` and true parameters ``(N,)`` in a Dataset
    (``extra``: further per-image integer variables, e.g. indices into a source file)."""
    check_images(x, "x")
    n, _, size, _ = x.shape
    px, _ = pixel_grid(size, dtype=torch.float64)
    axis = px[0].numpy()
    data_vars = {"x": (("sequence", "band", "row", "col"), np.asarray(x, dtype=np.float32),
                       {"units": "1", "long_name": "image intensity, full scale 1"})}
    for name, values in {**(params or {}), **(extra or {})}.items():
        values = np.asarray(values)
        if values.shape != (n,):
            raise ValueError(f"per-image variable {name!r} must have shape ({n},), got {values.shape}")
        data_vars[name] = (("sequence",), values, {"units": UNITS.get(name, "1")})
    coords = {"sequence": np.arange(n), "band": list(BANDS),
              "row": ("row", axis[::-1].copy(), {"long_name": "y of pixel centres (up)"}),
              "col": ("col", axis, {"long_name": "x of pixel centres (right)"})}
    return xr.Dataset(data_vars, coords, attrs={"system": SYSTEM, "split": split, **(attrs or {})})


# -- Galaxy10 ---------------------------------------------------------------------------------
#: The reference's file of the chosen images (n-takeishi/phys-vae, data/galaxy/makedata.py):
#: ``np.save`` of the class-6 images of Galaxy10.h5 as float32 ``(N, 3, 69, 69)`` in [0, 1].
REFERENCE_NPY = "data_all.npy"
#: Names of the Galaxy10 HDF5 file looked for in a directory.
GALAXY10_NAMES = ("Galaxy10.h5", "Galaxy10_DECals.h5", "Galaxy10_DECaLS.h5")


class UnknownSplitError(KeyError, ValueError):
    """A split name that a :class:`Splits` mapping does not hold (a ``KeyError`` for mapping
    code, a ``ValueError`` for callers that report bad input)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Splits(dict):
    """The ``train``, ``valid`` and ``test`` data sets of a file; looking up another name
    raises :class:`UnknownSplitError` with a message naming the file."""

    def __init__(self, splits: dict[str, xr.Dataset], source: Path) -> None:
        super().__init__(splits)
        self.source = source

    def __missing__(self, key: object) -> xr.Dataset:
        raise UnknownSplitError(f"unknown split {key!r} for {self.source}: choose one of "
                                f"{', '.join(self)}")


def load_galaxy10(path: str | os.PathLike, *, class_label: int = GALAXY10_EDGE_ON_CLASS,
                  n_train: int = 400, n_valid: int = 100, n_test: int | None = None, seed: int = 0,
                  image_size: int | None = None) -> dict[str, xr.Dataset]:
    """Read the public Galaxy10 HDF5 file (or the reference's ``data_all.npy``), keep one
    class and split it reproducibly.

    The HDF5 file holds ``images`` ``(N, S, S, 3)`` (``uint8`` 0-255, or floats in ``[0, 1]``
    or ``[0, 255]``) and the labels ``ans`` ``(N,)``. The images of ``class_label`` (default
    6, "disk, edge-on, no bulge", the paper's choice) are scaled to ``[0, 1]``, put band-first
    and shuffled by a permutation seeded with ``seed``; the first ``n_train`` form the training
    split, the next ``n_valid`` the validation split and the next ``n_test`` (default: all
    the rest) the test split. ``image_size`` resamples the images (area averaging when
    shrinking, bilinear when enlarging; e.g. 69 for Galaxy10 DECaLS' 256-pixel images).

    ``path`` may also be the reference's :data:`REFERENCE_NPY` (its makedata.py's class-6
    images, ``(N, 3, S, S)`` in ``[0, 1]``; ``class_label`` must then be 6), or a directory
    holding ``Galaxy10.h5`` (or a DECaLS name) or ``data_all.npy``.

    Each split keeps ``source_index``, the images' rows in the file. The result is a
    :class:`Splits` mapping: an unknown split name is a ``ValueError`` (and ``KeyError``).

    Raises:
        FileNotFoundError: no such file (or none of the known names in the directory).
        ValueError: naming the file and the problem: not HDF5 (or ``.npy``), missing keys,
            images of the wrong rank, shape, type or range, labels not integers, or too few
            images of the class for the requested splits.
    """
    path = _galaxy10_file(Path(path))
    if path.suffix == ".npy":
        if class_label != GALAXY10_EDGE_ON_CLASS:
            raise ValueError(f"{path} holds the reference's class-{GALAXY10_EDGE_ON_CLASS} images "
                             f"only; class {class_label} needs the Galaxy10 HDF5 file")
        band_first = _read_reference_npy(path)
        chosen = np.arange(band_first.shape[0])
    else:
        images, labels = _read_galaxy10(path)
        chosen = np.flatnonzero(labels == class_label)
        if chosen.size == 0:
            raise ValueError(f"{path}: no images of class {class_label}; classes present: "
                             f"{sorted(np.unique(labels).tolist())}")
    for name, value in (("n_train", n_train), ("n_valid", n_valid)):
        check_positive_int(value, name)
    n_test = chosen.size - n_train - n_valid if n_test is None else check_positive_int(n_test, "n_test")
    if n_test < 1 or n_train + n_valid + n_test > chosen.size:
        raise ValueError(f"{path}: class {class_label} has {chosen.size} images, too few for "
                         f"{n_train} train + {n_valid} valid + {max(n_test, 1)} test")
    perm = chosen[torch.randperm(chosen.size, generator=torch.Generator().manual_seed(int(seed))).numpy()]
    bounds = {"train": (0, n_train), "valid": (n_train, n_train + n_valid),
              "test": (n_train + n_valid, n_train + n_valid + n_test)}
    out = {}
    for split, (a, b) in bounds.items():
        idx = np.sort(perm[a:b])
        x = band_first[idx] if path.suffix == ".npy" else _scaled(images[idx], path)
        if image_size is not None:
            x = resize_images(torch.as_tensor(x), check_positive_int(image_size, "image_size")).numpy()
        out[split] = make_dataset(x, split=split, extra={"source_index": idx},
                                  attrs={"source": str(path), "class_label": int(class_label),
                                         "seed": int(seed)})
    return Splits(out, path)


def _galaxy10_file(path: Path) -> Path:
    """``path`` itself, or the Galaxy10 file (or ``data_all.npy``) in the directory ``path``."""
    if path.is_dir():
        for name in (*GALAXY10_NAMES, REFERENCE_NPY):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"Galaxy10 file not found in {path}: expected one of "
                                f"{', '.join((*GALAXY10_NAMES, REFERENCE_NPY))}")
    if not path.is_file():
        raise FileNotFoundError(f"Galaxy10 file not found: {path}")
    return path


def _read_reference_npy(path: Path) -> np.ndarray:
    """The reference's ``data_all.npy``: float32 images ``(N, 3, S, S)`` in ``[0, 1]``."""
    x = read_npy_array(path, "images (N, 3, S, S) in [0, 1] (the reference's makedata.py)")
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3] or min(x.shape) < 1:
        raise ValueError(f"{path}: images must have shape (N, 3, S, S) (band first, as the "
                         f"reference's makedata.py writes them), got {x.shape}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: the images contain NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"{path}: pixel values must lie in [0, 1] (the reference's scaling), got "
                         f"[{lo:g}, {hi:g}]")
    return x


def _read_galaxy10(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``images (N, S, S, 3)`` and integer ``labels (N,)`` from a Galaxy10 HDF5 file."""
    import h5py

    arrays = {}
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("images", "ans") if k not in f]
            if missing:
                raise _BadGalaxy10(f"not a Galaxy10 file, it lacks the keys {missing} "
                                   f"(keys: {sorted(f.keys())})")
            for key in ("images", "ans"):
                if not isinstance(f[key], h5py.Dataset):
                    raise _BadGalaxy10(f"{key!r} is a group, not an array")
                arrays[key] = np.asarray(f[key])
    except _BadGalaxy10 as e:
        raise ValueError(f"{path}: {e}") from None
    except Exception as e:  # h5py raises OSError, KeyError, RuntimeError, ... for a damaged file
        raise ValueError(f"cannot read {path} as HDF5: expected a Galaxy10 file with 'images' "
                         f"(N, S, S, 3) and 'ans' (N,) ({type(e).__name__}: {e})") from e
    images, labels = arrays["images"], arrays["ans"]
    if images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"{path}: 'images' must have shape (N, S, S, 3), got {images.shape}")
    if images.dtype.kind not in "biuf":
        raise ValueError(f"{path}: 'images' must hold numbers, got dtype {images.dtype}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{path}: 'ans' must have shape ({images.shape[0]},) to match 'images', "
                         f"got {labels.shape}")
    if (labels.dtype.kind not in "biuf" or not np.all(np.isfinite(labels))
            or not np.all(labels == np.round(labels))):
        raise ValueError(f"{path}: 'ans' must hold integer class labels")
    return images, labels.astype(np.int64)


class _BadGalaxy10(Exception):
    """An HDF5 file that is readable but not laid out as Galaxy10."""


def _scaled(images: np.ndarray, path: Path) -> np.ndarray:
    """``(n, S, S, 3)`` pixels -> ``(n, 3, S, S)`` float32 in ``[0, 1]``."""
    x = images.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{path}: 'images' contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 255:
        raise ValueError(f"{path}: pixel values must lie in [0, 255] (or [0, 1]), got [{lo:g}, {hi:g}]")
    if np.issubdtype(images.dtype, np.integer) or hi > 1:
        x = x / 255.0
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def resize_images(x: Tensor, size: int) -> Tensor:
    """Images ``(N, C, S, S)`` resampled to ``(N, C, size, size)``, kept in ``[0, 1]``."""
    if x.shape[-1] == size:
        return x
    mode = "area" if size < x.shape[-1] else "bilinear"
    extra = {} if mode == "area" else {"align_corners": True}
    return F.interpolate(x, size=(size, size), mode=mode, **extra).clamp(0, 1)


# -- augmentation -----------------------------------------------------------------------------
def augment_images(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random flips and rotations of images ``(N, C, H, W)`` (the paper's training
    augmentation): each image is mirrored left-right and up-down with probability 1/2 each
    and rotated by an angle uniform in ``[0, 2 pi)`` about its centre (bilinear resampling,
    corners filled by reflection). The draws come from ``generator`` (CPU)."""
    n = x.shape[0]
    phi = 2 * math.pi * torch.rand(n, generator=generator)
    flips = 1.0 - 2.0 * (torch.rand(n, 2, generator=generator) < 0.5).float()
    c, s = torch.cos(phi), torch.sin(phi)
    mat = torch.stack((torch.stack((c * flips[:, 0], -s * flips[:, 1], torch.zeros(n)), 1),
                       torch.stack((s * flips[:, 0], c * flips[:, 1], torch.zeros(n)), 1)), 1)
    grid = F.affine_grid(mat.to(x), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


def rotate_images(x: Tensor, angle: Tensor | float, padding_mode: str = "zeros") -> Tensor:
    """Rotate images ``(..., C, H, W)`` counter-clockwise (as displayed) by ``angle`` [rad]
    about their centre (broadcast over the leading dims); bilinear resampling.

    A structure at angle ``phi`` ends up at ``phi + angle`` (the convention of
    :func:`rotated_coordinates`).
    """
    lead = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:])
    angle = torch.as_tensor(angle, dtype=x.dtype, device=x.device).expand(lead).reshape(-1)
    c, s = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(c)
    # Output pixel (gx, gy) (grid coordinates, gy downwards) reads the input at R(-angle) p in
    # the upward-y frame, i.e. (c gx - s gy, s gx + c gy) in grid coordinates.
    mat = torch.stack((torch.stack((c, -s, zero), -1), torch.stack((s, c, zero), -1)), -2)
    grid = F.affine_grid(mat, list(flat.shape), align_corners=True)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
    return out.reshape(x.shape)
