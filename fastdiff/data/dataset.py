"""Training datasets in the official EDM2 format, and in-memory arrays.

A dataset is a folder, or an (uncompressed) zip file, of equally sized square images (PNG, JPEG, WebP) or
``.npy`` arrays (``[C, H, W]``, e.g. VAE latents), with class labels, if any, in ``dataset.json``
(``{"labels": [["00000/img00000000.png", 6], ...]}``). Items are ``(image, label)``: a ``[C, H, W]`` tensor
(``uint8`` pixels or the stored float dtype) and an ``int64`` class (``-1`` without labels); ``xflip=True``
doubles the dataset with mirrored copies at ``i + len``, deterministic and resumable.
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile

import numpy as np
import torch

__all__ = ["Dataset", "ImageDataset", "ArrayDataset", "IMAGE_EXTENSIONS", "to_model_input", "DatasetError",
           "parse_label_table", "warn_unknown_labels"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_ALL_EXTENSIONS = IMAGE_EXTENSIONS + (".npy",)
MAX_ITEM_ENV = "FASTDIFF_MAX_ITEM_MB"
DEFAULT_MAX_ITEM_BYTES = 64 << 20  # before the resolution is known: a 4096x4096 RGBA image, uncompressed


def item_byte_cap(resolution: int | None, channels: int | None = None) -> int:
    """The most bytes one stored item (a PNG / JPEG / ``.npy`` member, inflated) may take: what an image of the
    target ``resolution`` can need, generously (16 bytes per pixel and channel, at least 4 channels, plus 1 MiB:
    uncompressed PNGs and float64 arrays fit), else :data:`DEFAULT_MAX_ITEM_BYTES`. The environment variable
    ``FASTDIFF_MAX_ITEM_MB`` sets it instead (for data that really is larger)."""
    env = os.environ.get(MAX_ITEM_ENV, "").strip()
    if env:
        try:
            mb = float(env)
        except ValueError:
            raise DatasetError(f"{MAX_ITEM_ENV}={env!r}: expected a number of megabytes") from None
        if not mb > 0:
            raise DatasetError(f"{MAX_ITEM_ENV}={env!r}: expected a positive number of megabytes")
        return int(mb * (1 << 20))
    if not resolution:
        return DEFAULT_MAX_ITEM_BYTES
    return 16 * int(resolution) ** 2 * max(int(channels or 4), 4) + (1 << 20)


class DatasetError(ValueError):
    """Bad data: the message names the file."""


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """Pixels ``uint8 [0, 255]`` -> ``float32 [-1, 1]``; float data (latents) passes through as float32."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 127.5 - 1.0
    return images.to(torch.float32)


def parse_label_table(raw, where: str) -> dict[str, int]:
    """``dataset.json``'s ``"labels"`` list ``[[name, int], ...]`` as ``{name: class}`` (names with ``/``).
    ``DatasetError`` naming ``where`` for anything else: a label that is not an integer (``3.0``, ``"3"``,
    ``true``), an entry that is not a pair, or one file labelled twice with different classes (the same pair
    twice is harmless)."""
    if not isinstance(raw, list):
        raise DatasetError(f'{where}: "labels" must be a list of [name, int] pairs or null, '
                           f"got {type(raw).__name__}")
    table: dict[str, int] = {}
    for i, entry in enumerate(raw):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise DatasetError(f"{where}: labels[{i}] must be [name, int], got {entry!r:.80}")
        name, lab = entry[0].replace("\\", "/"), entry[1]
        if isinstance(lab, bool) or not isinstance(lab, int):
            raise DatasetError(f"{where}: the label of {name!r} must be an integer class index, got {lab!r} "
                               f"({type(lab).__name__})")
        if not 0 <= lab < 2**31:
            raise DatasetError(f"{where}: the label of {name!r} is {lab}; class indices lie in [0, 2^31)")
        if table.setdefault(name, lab) != lab:
            raise DatasetError(f"{where}: {name!r} is labelled twice with different classes "
                               f"({table[name]} and {lab})")
    return table


def warn_unknown_labels(table: dict[str, int], names, where: str) -> None:
    """One warning, with the count, for labels of files that are not in the dataset (they are not used)."""
    present = set(names)
    unknown = [n for n in table if n not in present]
    if unknown:
        warnings.warn(f"{where}: labels {len(unknown)} file(s) that are not in the dataset (e.g. {unknown[0]!r}); "
                      "those labels are ignored", UserWarning, stacklevel=3)


class Dataset(torch.utils.data.Dataset):
    """Common interface: ``resolution``, ``num_channels``, ``label_dim`` (0 without labels), ``has_labels``,
    ``name``, ``raw_len`` (before the x-flip doubling), ``xflip``."""

    name = "dataset"

    def __init__(self, xflip: bool = False):
        self.xflip = bool(xflip)

    # Subclasses provide these.
    raw_len: int = 0
    resolution: int = 0
    num_channels: int = 0
    label_dim: int = 0

    def _load_raw(self, raw_idx: int) -> np.ndarray:  # [C, H, W]
        raise NotImplementedError

    def _raw_label(self, raw_idx: int) -> int:
        raise NotImplementedError

    @property
    def has_labels(self) -> bool:
        return self.label_dim > 0

    def __len__(self) -> int:
        return self.raw_len * (2 if self.xflip else 1)

    def __getitem__(self, idx: int):
        idx = int(idx)
        if not 0 <= idx < len(self):
            raise IndexError(f"{self.name}: index {idx} out of range for {len(self)} items")
        raw = idx % self.raw_len
        arr = self._load_raw(raw)
        if idx >= self.raw_len:
            arr = arr[:, :, ::-1]
        arr = np.ascontiguousarray(arr)
        if not arr.flags.writeable:  # e.g. a view of Pillow's buffer: torch wants writable memory
            arr = arr.copy()
        return torch.from_numpy(arr), torch.tensor(self._raw_label(raw), dtype=torch.int64)

    def labels_onehot(self, labels: torch.Tensor, label_dim: int | None = None) -> torch.Tensor:
        dim = self.label_dim if label_dim is None else int(label_dim)
        return torch.nn.functional.one_hot(labels.to(torch.int64), dim).to(torch.float32)

    def describe(self) -> str:
        lab = f"{self.label_dim} classes" if self.has_labels else "no labels"
        flip = ", x-flip" if self.xflip else ""
        return (f"{self.name}: {self.raw_len} items, {self.num_channels}x{self.resolution}x{self.resolution}, "
                f"{lab}{flip}")


class ArrayDataset(Dataset):
    """Images held in memory: ``images`` ``[N, C, H, W]`` (uint8 pixels or float), ``labels`` ``[N]`` ints or None."""

    def __init__(self, images, labels=None, name: str = "array", xflip: bool = False, label_dim: int | None = None):
        super().__init__(xflip)
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[2] != images.shape[3]:
            raise DatasetError(f"{name}: expected images [N, C, H, W] with H == W, got shape {images.shape}")
        if images.shape[0] == 0:
            raise DatasetError(f"{name}: the dataset is empty")
        self.images = images
        self.name = name
        self.raw_len = images.shape[0]
        self.num_channels = images.shape[1]
        self.resolution = images.shape[2]
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int64).reshape(-1)
            if labels.shape[0] != self.raw_len:
                raise DatasetError(f"{name}: {labels.shape[0]} labels for {self.raw_len} images")
            if labels.min() < 0:
                raise DatasetError(f"{name}: negative label {labels.min()}")
            self.label_dim = int(label_dim if label_dim is not None else labels.max() + 1)
        self.labels = labels

    def _load_raw(self, raw_idx):
        return self.images[raw_idx]

    def _raw_label(self, raw_idx):
        return -1 if self.labels is None else int(self.labels[raw_idx])


class ImageDataset(Dataset):
    """A folder or zip of images (or ``.npy`` arrays) with optional ``dataset.json`` labels.

    ``resolution`` / ``channels``: what the caller expects; a mismatch is an error naming the first file that
    differs (``channels`` given: grayscale PNGs are expanded to RGB, RGB(A) to RGB, etc., as Pillow converts).
    ``max_size``: use only the first that many items. Files are checked lazily as they are read, and the
    first one eagerly (``validate()`` checks them all).
    """

    def __init__(self, path, resolution: int | None = None, channels: int | None = None, xflip: bool = False,
                 use_labels: bool = True, max_size: int | None = None):
        super().__init__(xflip)
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path.rstrip("/")) or self.path
        self._zip = None
        self._zip_pid = None
        self._want_resolution = resolution
        if os.path.isdir(self.path):
            self._type = "dir"
            names = []
            for root, _dirs, files in os.walk(self.path):
                for f in files:
                    names.append(os.path.relpath(os.path.join(root, f), self.path).replace(os.sep, "/"))
        elif os.path.isfile(self.path):
            if not zipfile.is_zipfile(self.path):
                raise DatasetError(f"{self.path}: not a folder or a zip file")
            self._type = "zip"
            names = [n for n in self._get_zip().namelist() if not n.endswith("/")]
        else:
            raise FileNotFoundError(f"dataset not found: {self.path}")
        all_names = set(names)
        self._fnames = sorted(n for n in names if n.lower().endswith(_ALL_EXTENSIONS)
                              and not os.path.basename(n).startswith("."))
        if not self._fnames:
            raise DatasetError(f"{self.path}: no images (.png/.jpg/.npy) found; the dataset is empty")
        kinds = {n.lower().endswith(".npy") for n in self._fnames}
        if len(kinds) > 1:
            raise DatasetError(f"{self.path}: mixes .npy arrays and images; use one kind")
        self.is_latent = kinds == {True}
        self._truncated = max_size is not None and int(max_size) < len(self._fnames)
        if max_size is not None:
            self._fnames = self._fnames[: int(max_size)]
        self.raw_len = len(self._fnames)
        self._want_channels = channels
        # Labels.
        self.labels = None
        if "dataset.json" in all_names and use_labels:
            self.labels = self._read_labels()  # None for {"labels": null}: an unlabelled dataset
            if self.labels is not None:
                self.label_dim = int(self.labels.max()) + 1 if self.labels.size else 0
        # Shape from the first item.
        first = self._load_raw(0)
        self.num_channels, h, w = first.shape
        if h != w:
            raise DatasetError(f"{self._describe_file(0)}: images must be square, got {w}x{h}")
        self.resolution = h
        if resolution is not None and h != int(resolution):
            raise DatasetError(f"{self._describe_file(0)}: {w}x{h} image, expected {resolution}x{resolution} "
                               f"(convert with `fastdiff dataset convert --resolution {resolution}`)")
        # Stored VAE mean/std (EDM2's latent datasets) have twice the channels of the latents they give.
        mean_std = self.is_latent and channels is not None and self.num_channels == 2 * int(channels)
        if channels is not None and self.num_channels != int(channels) and not mean_std:
            raise DatasetError(f"{self._describe_file(0)}: {self.num_channels} channels, expected {channels}")

    # ---- files ----------------------------------------------------------------------------------------

    def _get_zip(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():  # one handle per (worker) process
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def _open(self, fname: str):
        if self._type == "dir":
            return open(os.path.join(self.path, fname), "rb")
        return self._get_zip().open(fname, "r")

    def _describe_file(self, raw_idx: int) -> str:
        fname = self._fnames[raw_idx]
        return os.path.join(self.path, fname) if self._type == "dir" else f"{self.path}:{fname}"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"] = None
        return state

    def close(self):
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def _read_labels(self) -> np.ndarray:
        where = (os.path.join(self.path, "dataset.json") if self._type == "dir" else f"{self.path}:dataset.json")
        try:
            with self._open("dataset.json") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc})") from exc
        except RecursionError:
            raise DatasetError(f"{where}: the JSON is nested too deeply to be a label table") from None
        if not isinstance(data, dict) or "labels" not in data:
            raise DatasetError(f'{where}: expected {{"labels": [[name, int], ...]}} or {{"labels": null}}')
        raw = data["labels"]
        if raw is None:
            return None
        table = parse_label_table(raw, where)
        missing = [n for n in self._fnames if n not in table]
        if missing:
            raise DatasetError(f"{where}: no label for {missing[0]!r}" +
                               (f" and {len(missing) - 1} more files" if len(missing) > 1 else ""))
        present = set(self._fnames)
        unknown = [n for n in table if n not in present]
        if unknown and not self._truncated:
            raise DatasetError(f"{where}: labels name {unknown[0]!r}, which is not in the dataset "
                               f"({len(unknown)} such names)")
        labels = np.array([table[n] for n in self._fnames], dtype=np.int64)
        if labels.size and labels.min() < 0:
            bad = self._fnames[int(np.argmin(labels))]
            raise DatasetError(f"{where}: negative label {labels.min()} for {bad!r}")
        return labels

    def _read_capped(self, raw_idx: int) -> tuple[bytes, int]:
        """An item's bytes, read only up to :func:`item_byte_cap` (a zip member that inflates to gigabytes is
        refused, not read whole); and that cap."""
        fname = self._fnames[raw_idx]
        res = getattr(self, "resolution", 0) or self._want_resolution
        cap = item_byte_cap(res, getattr(self, "num_channels", 0) or self._want_channels)
        size = self._get_zip().getinfo(fname).file_size if self._type == "zip" else None
        with self._open(fname) as f:
            data = f.read(cap + 1) if size is None or size <= cap else b""
        if (size is not None and size > cap) or len(data) > cap:
            why = f"an image of {res}x{res} needs far less" if res else "the limit before the resolution is known"
            raise DatasetError(f"{self._describe_file(raw_idx)}: holds more than {cap:,} bytes ({why}); set "
                               f"{MAX_ITEM_ENV} to allow larger items")
        return data, cap

    def _load_raw(self, raw_idx: int) -> np.ndarray:
        fname = self._fnames[raw_idx]
        try:
            data, cap = self._read_capped(raw_idx)
            if fname.lower().endswith(".npy"):
                arr = np.load(io.BytesIO(data), allow_pickle=False)
                if arr.ndim == 2:
                    arr = arr[None]
                if arr.ndim != 3:
                    raise ValueError(f"expected an array [C, H, W], got shape {arr.shape}")
            else:
                from PIL import Image

                with Image.open(io.BytesIO(data)) as img:
                    # The size is known before decoding: no decoding of an image that cannot be used.
                    res = getattr(self, "resolution", 0) or self._want_resolution
                    w, h = img.size
                    if res and (w, h) != (int(res), int(res)):
                        raise DatasetError(f"{self._describe_file(raw_idx)}: {w}x{h} image, expected {res}x{res} "
                                           f"(convert with `fastdiff dataset convert --resolution {res}`)")
                    if w * h > cap:
                        raise DatasetError(f"{self._describe_file(raw_idx)}: {w}x{h} image, more than the {cap:,} "
                                           f"pixels allowed; set {MAX_ITEM_ENV} to allow larger items")
                    want = self._want_channels
                    if want is not None:
                        mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(int(want))
                        if mode is not None and img.mode != mode:
                            img = img.convert(mode)
                    arr = np.asarray(img)
                if arr.ndim == 2:
                    arr = arr[:, :, None]
                arr = arr.transpose(2, 0, 1)
                if arr.dtype != np.uint8:
                    raise ValueError(f"expected 8-bit pixels, got {arr.dtype}")
        except DatasetError:
            raise
        except Exception as exc:
            raise DatasetError(f"{self._describe_file(raw_idx)}: cannot read ({type(exc).__name__}: {exc})") from exc
        if hasattr(self, "resolution") and self.resolution and raw_idx != 0:
            if arr.shape != (self.num_channels, self.resolution, self.resolution):
                raise DatasetError(f"{self._describe_file(raw_idx)}: shape {tuple(arr.shape)} differs from the "
                                   f"dataset's {(self.num_channels, self.resolution, self.resolution)}")
        return arr

    def _raw_label(self, raw_idx: int) -> int:
        return -1 if self.labels is None else int(self.labels[raw_idx])

    def validate(self) -> None:
        """Read every item once (raises ``DatasetError`` naming the first bad file)."""
        for i in range(self.raw_len):
            self._load_raw(i)
