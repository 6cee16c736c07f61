"""Reading image folders and ``.zip`` archives as uint8 NCHW batches (for the metrics CLI)."""

from __future__ import annotations

import io
import os
import zipfile
from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = ["IMAGE_EXTENSIONS", "ImageFiles", "iterate_image_batches"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _is_image(name: str) -> bool:
    base = os.path.basename(name)
    return name.lower().endswith(IMAGE_EXTENSIONS) and not base.startswith(".") and "__MACOSX" not in name


class ImageFiles(torch.utils.data.Dataset):
    """The images of a folder (recursive) or a ``.zip``, in sorted order, as uint8 RGB [3, H, W]."""

    def __init__(self, path: str | os.PathLike):
        try:
            import PIL.Image  # noqa: F401
        except ImportError as e:
            raise ImportError("reading image files needs Pillow: pip install pillow") from e
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            self.is_zip = False
            names = []
            for folder, dirs, files in os.walk(self.path):
                dirs.sort()
                names += [os.path.relpath(os.path.join(folder, f), self.path) for f in files if _is_image(f)]
        elif os.path.isfile(self.path) and zipfile.is_zipfile(self.path):
            self.is_zip = True
            with zipfile.ZipFile(self.path) as z:
                names = [n for n in z.namelist() if not n.endswith("/") and _is_image(n)]
        elif os.path.exists(self.path):
            raise ValueError(f"{self.path} is neither a folder nor a .zip archive of images")
        else:
            raise FileNotFoundError(f"image folder or .zip not found: {self.path}")
        self.names = sorted(names)
        if not self.names:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {self.path}")
        self._zip = None
        self._zip_pid = None

    def __len__(self) -> int:
        return len(self.names)

    def _read(self, name: str) -> bytes:
        if not self.is_zip:
            with open(os.path.join(self.path, name), "rb") as f:
                return f.read()
        if self._zip is None or self._zip_pid != os.getpid():  # one handle per (worker) process
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip.read(name)

    def __getitem__(self, index: int) -> torch.Tensor:
        import PIL.Image

        name = self.names[index]
        try:
            with PIL.Image.open(io.BytesIO(self._read(name))) as img:
                arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except Exception as e:
            raise ValueError(f"could not read image {name!r} in {self.path}: {e}") from e
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def __getstate__(self):  # zip handles do not pickle (DataLoader workers)
        state = dict(self.__dict__)
        state["_zip"] = state["_zip_pid"] = None
        return state


class BuiltinImages(torch.utils.data.Dataset):
    """A built-in dataset (``builtin:digits``, ``builtin:mnist``, ``builtin:shapes?n=..``, as ``fastdiff train``
    takes them; options such as ``?resolution=32`` included) as uint8 RGB [3, H, W] images, in order."""

    def __init__(self, spec: str):
        from fastdiff.data import open_dataset

        self.path = str(spec)
        self.dataset = open_dataset(self.path, use_labels=False)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.dataset[index][0]
        return image.expand(3, *image.shape[1:]).contiguous() if image.shape[0] == 1 else image


def open_images(path) -> torch.utils.data.Dataset:
    """The images a metrics command reads: ``builtin:NAME`` (:class:`BuiltinImages`), else a folder or a
    ``.zip`` (:class:`ImageFiles`)."""
    if str(path).startswith("builtin:"):
        return BuiltinImages(str(path))
    return ImageFiles(path)


class _Items(torch.utils.data.Dataset):
    """``(index, image)`` for each index, or ``(index, message)`` for an image that cannot be read: a reading
    error travels back from a DataLoader worker as a value, to be raised as one line in the main process
    (not as a worker's traceback text)."""

    def __init__(self, files, indices):
        self.files, self.indices = files, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        idx = self.indices[i]
        try:
            return idx, self.files[idx]
        except Exception as e:  # reported by iterate_image_batches
            return idx, f"{e}"


def _list(items):
    return items


def _image_name(files, idx: int) -> str:
    names = getattr(files, "names", None)
    return repr(names[idx]) if names is not None else f"image {idx}"


def iterate_image_batches(files: torch.utils.data.Dataset, indices: Sequence[int], batch_size: int,
                          num_workers: int = 0, resolution: tuple[int, int] | None = None,
                          what: str = "the reference") -> Iterator[torch.Tensor]:
    """Yield uint8 [n, 3, H, W] batches of ``files[i] for i in indices``, in order. Every image must have
    the same ``(H, W)``: ``resolution`` (``what``'s, e.g. the reference statistics') when given, else the
    first image's; a ``ValueError`` names the first that differs (or cannot be read)."""
    where = getattr(files, "path", "images")
    loader = torch.utils.data.DataLoader(_Items(files, indices), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=_list,
                                         prefetch_factor=2 if num_workers else None)
    size, source = (tuple(int(v) for v in resolution), what) if resolution is not None else (None, None)
    for items in loader:
        for idx, x in items:
            if isinstance(x, str):
                raise ValueError(x)
            if size is None:
                size, source = tuple(x.shape[1:]), f"the first image ({_image_name(files, idx)})"
            elif tuple(x.shape[1:]) != size:
                raise ValueError(f"{where}: images of different sizes: {_image_name(files, idx)} is "
                                 f"{x.shape[2]}x{x.shape[1]}, {source} {size[1]}x{size[0]}; every image must have "
                                 "one resolution (resize them first)")
        yield torch.stack([x for _, x in items])
