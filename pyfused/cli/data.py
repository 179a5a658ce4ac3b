"""Training data as whole tensors on the training device: Fashion-MNIST, or a synthetic stand-in.

Both sets are ``(n, 784)`` float32 images in [0, 1] and ``(n,)`` int64 labels in [0, 10), already on the
device, so a training loop indexes them with an on-device permutation instead of a per-step DataLoader.

Fashion-MNIST is read from the IDX files in torchvision's layout, ``<root>/FashionMNIST/raw/
train-images-idx3-ubyte`` and its three siblings, each plain or gzipped (``.gz``), and scaled by 1/255 as
``ToTensor`` does. The files are parsed here (a 16-byte header and raw bytes), not through torchvision, whose
import alone costs seconds; torchvision is imported only to download them.

The synthetic set is deterministic (fixed generator seeds, independent of any training seed) and built so
that the accuracy curve of an MLP means something: each image is one of 10 smooth "object" prototypes,
blended with another class's prototype, rotated, scaled, shifted, contrast-changed and given smooth noise.
"""
from __future__ import annotations

import dataclasses
import gzip
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

SIDE = 28
N_CLASSES = 10
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SYNTHETIC_SIZES = {"train": 60_000, "test": 10_000}
_PROTOTYPE_SEED = 20_240_420
_SPLIT_SEEDS = {"train": 1, "test": 2}
_CHUNK = 8192


class DatasetNotFound(FileNotFoundError):
    """Fashion-MNIST is not in the data directory (or could not be downloaded into it)."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A classification set on one device: ``train_x`` (n_train, 784) float32 in [0, 1], ``train_y`` (n_train,)
    int64, and the same for the test split. ``name`` is "fashion-mnist" or "synthetic"; ``source`` says where
    it came from (a directory, or "generated")."""

    name: str
    source: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def describe(self) -> str:
        return f"{self.name} ({len(self.train_y):,} train / {len(self.test_y):,} test, {self.source})"


def default_data_dir() -> Path:
    """``$XDG_CACHE_HOME/pyfused`` (``~/.cache/pyfused`` when unset): where Fashion-MNIST is looked for."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "pyfused"


def fashion_mnist_raw_dir(root) -> Path:
    """The folder that holds the IDX files, as torchvision lays it out: ``<root>/FashionMNIST/raw``."""
    return Path(root) / "FashionMNIST" / "raw"


def _find(raw: Path, name: str) -> Path | None:
    for candidate in (raw / name, raw / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def fashion_mnist_present(root) -> bool:
    """Whether all four IDX files (plain or ``.gz``) are in :func:`fashion_mnist_raw_dir`."""
    raw = fashion_mnist_raw_dir(root)
    return all(_find(raw, name) is not None for pair in FASHION_FILES.values() for name in pair)


def download_fashion_mnist(root) -> None:
    """Fetch Fashion-MNIST into ``root`` with torchvision; DatasetNotFound naming ``root`` if that fails."""
    from urllib.error import URLError

    from torchvision.datasets import FashionMNIST

    try:
        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
    except (RuntimeError, URLError, OSError) as err:
        detail = " ".join(str(err).split())  # torchvision's message spans lines; keep the warning on one
        raise DatasetNotFound(f"could not download Fashion-MNIST into {Path(root)}: {detail}") from err


def read_idx(path: Path) -> torch.Tensor:
    """An unsigned-byte IDX file (plain or gzipped) as a uint8 tensor of the shape in its header.

    Layout: two zero bytes, type code 0x08 (unsigned byte), the number of dimensions d, d big-endian uint32
    sizes, then the bytes in row-major order.
    """
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + math.prod(shape):
        raise ValueError(f"{path}: header says shape {shape} ({math.prod(shape)} bytes), "
                         f"file holds {len(raw) - header} bytes of data")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def _fashion_split(raw: Path, split: str, device, limit):
    image_name, label_name = FASHION_FILES[split]
    images_path, labels_path = _find(raw, image_name), _find(raw, label_name)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dim() != 3 or tuple(images.shape[1:]) != (SIDE, SIDE):
        raise ValueError(f"{images_path} must hold (n, {SIDE}, {SIDE}) images, got shape {tuple(images.shape)}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"{labels_path} must hold {images.shape[0]} labels to match {images_path}, "
                         f"got shape {tuple(labels.shape)}")
    if labels.numel() and int(labels.max()) >= N_CLASSES:
        raise ValueError(f"{labels_path} holds label {int(labels.max())}, outside [0, {N_CLASSES})")
    images, labels = images[:limit], labels[:limit]
    x = images.reshape(len(images), SIDE * SIDE).to(device).to(torch.float32).div_(255)
    return x, labels.to(device=device, dtype=torch.int64)


def load_fashion_mnist(root, device, limit: int | None = None) -> Dataset:
    """Fashion-MNIST from ``root`` (torchvision's layout) onto ``device``, the first ``limit`` samples of each
    split; DatasetNotFound naming the directory when files are missing."""
    raw = fashion_mnist_raw_dir(root)
    missing = [name for pair in FASHION_FILES.values() for name in pair if _find(raw, name) is None]
    if missing:
        raise DatasetNotFound(f"Fashion-MNIST not found in {raw} (missing {', '.join(missing)}, plain or .gz)")
    train_x, train_y = _fashion_split(raw, "train", device, limit)
    test_x, test_y = _fashion_split(raw, "test", device, limit)
    return Dataset("fashion-mnist", str(raw), train_x, train_y, test_x, test_y)


def _interp_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) bilinear upsampling matrix (half-pixel centres, edges clamped): ``up = M @ low @ Mᵀ``."""
    pos = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5).clamp(0, n_in - 1)
    low = pos.floor().long()
    high = (low + 1).clamp(max=n_in - 1)
    frac = pos - low
    rows = torch.arange(n_out)
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    matrix.index_put_((rows, low), 1 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix.float()


def _smooth(low: torch.Tensor) -> torch.Tensor:
    """Upsample (n, k, k) to (n, 28, 28) bilinearly."""
    up = _interp_matrix(low.shape[-1], SIDE)
    return up @ low @ up.t()


def _prototypes() -> torch.Tensor:
    """(10, 784): a smooth random texture per class inside a soft ellipse of random width and height."""
    gen = torch.Generator().manual_seed(_PROTOTYPE_SEED)
    texture = _smooth(torch.rand(N_CLASSES, 7, 7, generator=gen))
    half_w = 0.45 + 0.4 * torch.rand(N_CLASSES, 1, 1, generator=gen)
    half_h = 0.45 + 0.4 * torch.rand(N_CLASSES, 1, 1, generator=gen)
    c = torch.linspace(-1, 1, SIDE)
    mask = torch.sigmoid(6 * (1 - (c.view(1, 1, -1) / half_w) ** 2 - (c.view(1, -1, 1) / half_h) ** 2))
    return (texture * mask).reshape(N_CLASSES, SIDE * SIDE)


def _grid_basis() -> torch.Tensor:
    """(6, 28·28·2) B with ``theta.view(n, 6) @ B`` = the (n, 28, 28, 2) sampling grid of affine ``theta``
    (n, 2, 3) over pixel centres in [-1, 1], i.e. F.affine_grid(theta, ..., align_corners=False)."""
    c = (torch.arange(SIDE, dtype=torch.float32) * 2 + 1) / SIDE - 1
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    points = torch.stack([xs.reshape(-1), ys.reshape(-1), torch.ones(SIDE * SIDE)], 0)
    basis = torch.zeros(2, 3, SIDE * SIDE, 2)
    for j in range(2):
        basis[j, :, :, j] = points
    return basis.reshape(6, -1)


def _synthetic_chunk(prototypes, basis, labels, other, params, noise):
    """Images (n, 784) from labels (n,), a second class ``other`` (n,), uniform ``params`` (n, 6), uniform
    ``noise`` (n, 14, 14): lerp(proto[label], proto[other], ≤0.45), rotate ±0.3 rad, scale 1±0.2, shift
    ±0.175, contrast 0.6–1.4, + smooth noise of std 0.15, clamped to [0, 1]."""
    n = len(labels)
    mix, angle, scale, shift_x, shift_y, contrast = params.unbind(1)
    weights = torch.zeros(n, N_CLASSES)
    weights.index_put_((torch.arange(n), labels), 1 - 0.45 * mix, accumulate=True)
    weights.index_put_((torch.arange(n), other), 0.45 * mix, accumulate=True)
    images = (weights @ prototypes).view(n, 1, SIDE, SIDE)
    angle, scale = (angle - 0.5) * 0.6, 1 + (scale - 0.5) * 0.4
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([cos, -sin, (shift_x - 0.5) * 0.35, sin, cos, (shift_y - 0.5) * 0.35], 1)
    grid = (theta @ basis).view(n, SIDE, SIDE, 2)
    images = F.grid_sample(images, grid, align_corners=False).view(n, SIDE, SIDE)
    images.mul_((0.6 + 0.8 * contrast).view(n, 1, 1))
    images.add_(_smooth(noise.sub_(0.5)), alpha=0.15 * math.sqrt(12))
    return images.clamp_(0, 1).view(n, SIDE * SIDE)


def synthetic_split(split: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` (default: 60,000 train / 10,000 test) samples of a synthetic split, on the CPU.

    Every random component has its own generator with a fixed seed, drawn in order, so the set does not
    depend on ``n`` except for its length (the first k samples are the same for every n ≥ k).
    """
    if split not in SYNTHETIC_SIZES:
        raise ValueError(f"split must be one of {tuple(SYNTHETIC_SIZES)}, got {split!r}")
    n = SYNTHETIC_SIZES[split] if n is None else n
    seed = _SPLIT_SEEDS[split]
    gens = [torch.Generator().manual_seed(1000 * seed + k) for k in range(4)]
    prototypes, basis = _prototypes(), _grid_basis()
    xs, ys = [], []
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        labels = torch.randint(0, N_CLASSES, (m,), generator=gens[0])
        other = torch.randint(0, N_CLASSES, (m,), generator=gens[1])
        params = torch.rand(m, 6, generator=gens[2])
        noise = torch.rand(m, 14, 14, generator=gens[3])
        xs.append(_synthetic_chunk(prototypes, basis, labels, other, params, noise))
        ys.append(labels)
    if not xs:
        return torch.zeros(0, SIDE * SIDE), torch.zeros(0, dtype=torch.int64)
    return torch.cat(xs), torch.cat(ys)


def load_synthetic(device, limit: int | None = None) -> Dataset:
    """The synthetic set on ``device``, at most ``limit`` samples per split."""
    splits = []
    for split, size in SYNTHETIC_SIZES.items():
        x, y = synthetic_split(split, size if limit is None else min(size, limit))
        splits += [x.to(device), y.to(device)]
    return Dataset("synthetic", "generated", *splits)


def load(kind: str, root, device, download: bool = False, limit: int | None = None) -> tuple[Dataset, str | None]:
    """(dataset, warning) for ``kind`` "fashion-mnist", "synthetic" or "auto".

    "auto" takes Fashion-MNIST when present in ``root`` (or downloaded there when ``download``), else the
    synthetic set together with a warning that says why; "fashion-mnist" raises DatasetNotFound instead.
    """
    if kind not in ("auto", "fashion-mnist", "synthetic"):
        raise ValueError(f"kind must be 'auto', 'fashion-mnist' or 'synthetic', got {kind!r}")
    if kind == "synthetic":
        return load_synthetic(device, limit), None
    if not fashion_mnist_present(root) and download:
        try:
            download_fashion_mnist(root)
        except DatasetNotFound as err:
            if kind == "fashion-mnist":
                raise
            return load_synthetic(device, limit), f"{err}; training on the SYNTHETIC stand-in instead"
    if fashion_mnist_present(root) or kind == "fashion-mnist":
        return load_fashion_mnist(root, device, limit), None
    return load_synthetic(device, limit), (
        f"Fashion-MNIST not found in {fashion_mnist_raw_dir(root)} (pass --download to fetch it, or --data-dir); "
        f"training on the SYNTHETIC stand-in instead")
