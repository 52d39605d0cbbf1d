"""Image files on disk: safe discovery (symlinks, duplicates), full-decode checks, bit-depth aware loading."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

log = logging.getLogger(__name__)

#: Integer modes of more than 8 bits per pixel; their values are taken as 16-bit (0..65535), which is
#: how Pillow opens 16-bit PNGs and TIFFs. ``I`` values above 65535 are scaled as 32-bit instead.
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
UINT16_MAX, INT32_MAX = 65535.0, float(2**31 - 1)
#: File suffixes ``data=image_folder`` reads as images: torchvision's ``IMG_EXTENSIONS`` (no GIF, so that
#: the files, and so the splits, of an existing folder never change); ``predict.py`` also takes GIFs.
IMAGE_EXTENSIONS = IMG_EXTENSIONS


def to_rgb8(image: Image.Image, source: str = "image") -> Image.Image:
    """Any Pillow image -> 8-bit RGB, *scaling* 16/32-bit and float pixels instead of clipping them.

    ``Image.convert("RGB")`` clips ``I;16`` values at 255, which turns every 16-bit image into a
    blank one. Integer modes are scaled from their full range (see :data:`HIGH_BIT_MODES`); float
    (``F``) images must hold values in ``[0, 1]``.

    Args:
        image: A decoded image.
        source: Name used in error messages (the file).

    Raises:
        ValueError: If a float image has values outside ``[0, 1]``, naming ``source``.

    Example::

        rgb = to_rgb8(Image.open("scan_16bit.png"))  # 65535 -> 255, 32768 -> 128
    """
    if image.mode not in (*HIGH_BIT_MODES, "F"):
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
        if low < 0 or high > 1:
            raise ValueError(f"{source}: float (mode F) pixels must lie in [0, 1], found [{low:g}, {high:g}]")
        full = 1.0
    else:
        full = UINT16_MAX if values.max(initial=0.0) <= UINT16_MAX else INT32_MAX
    pixels = np.clip(np.rint(values / full * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="L").convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open, fully decode and convert an image file to 8-bit RGB (see :func:`to_rgb8`).

    The one way this project reads an image file: training, evaluation, the feature cache and
    ``predict.py`` all go through it, so a file means the same pixels everywhere (a palette image's
    colours, not its indices; alpha dropped; 16-bit levels scaled).

    Args:
        path: The image file.

    Raises:
        ValueError: If the file cannot be decoded (not an image, truncated, a decompression bomb) or
            holds float pixels outside ``[0, 1]``, naming the file.

    Example::

        rgb = load_rgb("photos/cat/0001.gif")  # mode "RGB", whatever the file's mode
    """
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb8(image, str(path))  # its own ValueError names the file
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {str(path)!r}: {error}") from error


def inspect_image(path: str) -> tuple[str | None, str]:
    """Decode ``path`` completely, as training will; return ``(problem or None, content digest)``.

    ``Image.verify()`` only parses headers, so a truncated JPEG passes it and fails at test time;
    this decodes every pixel. A decompression bomb (over ``PIL.Image.MAX_IMAGE_PIXELS``) is a
    problem too, reported with its pixel count.
    """
    try:
        data = Path(path).read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                to_rgb8(image, path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return f"decompression bomb ({error}); raise PIL.Image.MAX_IMAGE_PIXELS if it is genuine", ""
    except (OSError, SyntaxError, ValueError) as error:
        return f"{type(error).__name__}: {error}", ""
    return None, hashlib.blake2b(data, digest_size=16).hexdigest()


def inspect_images(paths: Sequence[str]) -> list[tuple[str | None, str]]:
    """:func:`inspect_image` over many files on a few threads (decoding releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(inspect_image, paths))


def class_folders(root: Path) -> list[str]:
    """Sorted names of the sub-folders of ``root`` (the classes)."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


def find_images(root: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    """``(path, label)`` of every image under ``root/<class>/``, each real file counted once.

    Links are handled so that a folder cannot yield samples it does not hold: symlinked *folders*
    inside a class folder are never followed (``cat/loop -> ..`` would relabel every dog as a
    cat and recurse), and are logged; symlinked *files* are read, but a real file reached twice
    within a class is kept once (logged) and one reached from two classes is an error.

    Raises:
        ValueError: If one real file is in two class folders, naming both.
    """
    owner: dict[str, tuple[str, str]] = {}
    samples, repeats, skipped_links, skipped_gifs = [], 0, [], []
    for label, name in enumerate(classes):
        for path in _walk_files(root / name, skipped_links, skipped_gifs):
            real = os.path.realpath(path)
            first_class, first_path = owner.setdefault(real, (name, path))
            if first_class != name:
                raise ValueError(
                    f"{first_path} (class {first_class!r}) and {path} (class {name!r}) are the same file "
                    f"under {root}; a file can have only one label"
                )
            if first_path != path:
                repeats += 1
                continue
            samples.append((path, label))
    if skipped_links:
        log.warning(
            "did not follow %d folder links under %s (first: %s)", len(skipped_links), root, skipped_links[0]
        )
    if repeats:
        log.warning("kept once each %d files reached twice through links under %s", repeats, root)
    if skipped_gifs:
        log.warning(
            "left out %d GIF files under %s (first: %s): image folders read %s only",
            len(skipped_gifs),
            root,
            skipped_gifs[0],
            ", ".join(IMAGE_EXTENSIONS),
        )
    return samples


def _walk_files(folder: Path, skipped_links: list[str], skipped_gifs: list[str]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        skipped_links.extend(
            os.path.join(dirpath, d) for d in dirnames if os.path.islink(os.path.join(dirpath, d))
        )
        found.extend(
            os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        skipped_gifs.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(".gif"))
    return found


def check_disjoint(splits: dict[str, Sequence[tuple[str, int]]], digests: dict[str, str]) -> None:
    """Stop when one real file is in two splits; warn, with a count, about byte-identical copies.

    The same file in train and test (a link, or a folder reached twice) is a construction error.
    Identical bytes under two names can be a genuine duplicate in the data, so it is a warning.

    Raises:
        ValueError: Naming the file and both splits.
    """
    real_split: dict[str, str] = {}
    digest_split: dict[str, tuple[str, str]] = {}
    copies: list[str] = []
    for split, samples in splits.items():
        for path, _ in samples:
            real = os.path.realpath(path)
            if real_split.setdefault(real, split) != split:
                raise ValueError(
                    f"{path} is in both the {real_split[real]} and the {split} split; remove one"
                )
            first = digest_split.setdefault(digests.get(path, real), (split, path))
            if first[0] != split:
                copies.append(f"{path} = {first[1]}")
    if copies:
        log.warning(
            "%d images are byte-identical copies of images in another split (first: %s)",
            len(copies),
            copies[0],
        )


class ImageFiles(Dataset):
    """``(transform(load_rgb(path)), label)`` for a list of ``(path, label)`` samples.

    Args:
        samples: Image paths and integer labels.
        classes: Class names, indexed by label.
        transform: Applied to the 8-bit RGB image.
    """

    def __init__(
        self, samples: Sequence[tuple[str, int]], classes: Sequence[str], transform: Callable
    ) -> None:
        self.samples, self.classes, self.transform = list(samples), list(classes), transform

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(load_rgb(path)), label
