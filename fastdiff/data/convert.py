"""Convert an image folder (or a built-in dataset, or another dataset) to the training format.

Output: a zip (``--dest out.zip``) or folder of PNGs named ``00000/img00000000.png`` with ``dataset.json``
labels, written atomically. Labels come from the source's ``dataset.json``, else from first-level subfolders
(one class each), else there are none. The transforms (``center-crop``, ``center-crop-wide``,
``center-crop-dhariwal``, ``resize``, ``none``) are described at :func:`convert_dataset`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import zipfile

import numpy as np

from fastdiff._atomic import remove_orphan_temps, temp_dir_beside, temp_file_beside
from fastdiff.data.dataset import IMAGE_EXTENSIONS, DatasetError, parse_label_table, warn_unknown_labels

__all__ = ["convert_dataset", "TRANSFORMS"]

TRANSFORMS = ("center-crop", "center-crop-wide", "center-crop-dhariwal", "resize", "none")


def _transform(img, resolution: int | None, transform: str, where: str):
    from PIL import Image

    w, h = img.size
    if resolution is None:
        if transform != "none" or w != h:
            if w != h:
                raise DatasetError(f"{where}: {w}x{h} is not square; give --resolution and --transform center-crop")
        return img
    if transform == "none":
        if (w, h) != (resolution, resolution):
            raise DatasetError(f"{where}: {w}x{h} image, expected {resolution}x{resolution} (--transform none)")
        return img
    if transform == "center-crop":
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    elif transform == "center-crop-wide":
        # Crop to a 2:1 strip around the center, then pad to square with black (wide images stay whole-ish).
        ch = min(h, w // 2)
        cw = 2 * ch
        left, top = (w - cw) // 2, (h - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
        canvas = Image.new(img.mode, (cw, cw))
        canvas.paste(img, (0, (cw - ch) // 2))
        img = canvas
    elif transform == "center-crop-dhariwal":
        while min(img.size) >= 2 * resolution:
            img = img.resize((img.size[0] // 2, img.size[1] // 2), Image.Resampling.BOX)
        scale = resolution / min(img.size)
        img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.Resampling.BICUBIC)
        left, top = (img.size[0] - resolution) // 2, (img.size[1] - resolution) // 2
        return img.crop((left, top, left + resolution, top + resolution))
    elif transform != "resize":
        raise DatasetError(f"unknown transform {transform!r}; expected one of {', '.join(TRANSFORMS)}")
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return img


def _iter_folder(source: str, resolution, transform, channels):
    from PIL import Image

    names = []
    for root, _dirs, files in os.walk(source):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), source).replace(os.sep, "/")
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                names.append(rel)
    names.sort()
    if not names:
        raise DatasetError(f"{source}: no images found (.png/.jpg/.jpeg/.webp/.bmp); the dataset is empty")
    labels = None
    meta = os.path.join(source, "dataset.json")
    if os.path.isfile(meta):
        try:
            with open(meta) as f:
                raw = json.load(f).get("labels")
            if raw is not None:
                table = parse_label_table(raw, meta)
                missing = [n for n in names if n not in table]
                if missing:
                    raise DatasetError(f"{meta}: no label for {missing[0]!r}")
                warn_unknown_labels(table, names, meta)
                labels = [table[n] for n in names]
        except RecursionError:
            raise DatasetError(f"{meta}: the JSON is nested too deeply to be a label table") from None
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            if isinstance(exc, DatasetError):
                raise
            raise DatasetError(f"{meta}: expected {{\"labels\": [[name, int], ...]}} ({exc})") from exc
    elif all("/" in n for n in names):
        classes = sorted({n.split("/", 1)[0] for n in names})
        if len(classes) > 1:
            index = {c: i for i, c in enumerate(classes)}
            labels = [index[n.split("/", 1)[0]] for n in names]
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    for i, name in enumerate(names):
        path = os.path.join(source, name)
        try:
            with Image.open(path) as img:
                img.load()
                img = img.convert(mode)
        except Exception as exc:
            raise DatasetError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
        yield _transform(img, resolution, transform, path), (None if labels is None else labels[i])


def _iter_dataset(ds, resolution, transform):
    from PIL import Image

    for i in range(ds.raw_len):
        arr = ds._load_raw(i)
        if arr.dtype != np.uint8:
            raise DatasetError(f"{ds.name}: only pixel datasets can be converted to PNGs (got {arr.dtype})")
        hwc = arr.transpose(1, 2, 0)
        img = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
        lab = ds._raw_label(i)
        yield _transform(img, resolution, transform, f"{ds.name}[{i}]"), (lab if lab >= 0 else None)


def convert_dataset(source: str, dest: str, resolution: int | None = None, transform: str = "center-crop",
                    channels: int = 3, max_images: int | None = None, progress: bool = True) -> int:
    """Write ``source`` to ``dest`` in the training format; returns the number of images written.

    Transforms: ``center-crop`` (the largest centered square, then Lanczos to the resolution), ``center-crop-wide``
    (a centered 2:1 strip padded to square), ``center-crop-dhariwal`` (the ImageNet preparation of ADM, Dhariwal &
    Nichol 2021, that EDM2 uses for its ImageNet-64 and -512 sets: halve with a box filter while the short side is
    at least twice the resolution, resize bicubically so that the short side is the resolution, crop the center),
    ``resize`` (Lanczos, no crop) and ``none``.
    """
    if transform not in TRANSFORMS:
        raise DatasetError(f"unknown transform {transform!r}; expected one of {', '.join(TRANSFORMS)}")
    if channels not in (1, 3, 4):
        raise DatasetError(f"channels must be 1, 3 or 4, got {channels}")
    if source.startswith("builtin:"):
        from fastdiff.data.builtin import load_builtin

        items = _iter_dataset(load_builtin(source[len("builtin:"):], channels=channels), resolution, transform)
    elif os.path.isdir(source):
        items = _iter_folder(source, resolution, transform, channels)
    elif os.path.isfile(source):
        from fastdiff.data.dataset import ImageDataset

        items = _iter_dataset(ImageDataset(source, channels=channels), resolution, transform)
    else:
        raise FileNotFoundError(f"no such source: {source}")

    dest = os.path.abspath(dest)
    to_zip = dest.lower().endswith(".zip")
    if os.path.exists(dest) and not (to_zip and os.path.isfile(dest)) and os.listdir(dest):
        raise FileExistsError(f"{dest}: exists and is not empty")
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    # What a killed convert to this destination left (only its temporaries: the folder may hold others').
    remove_orphan_temps(parent, of=os.path.basename(dest), dirs=True)
    tmp = temp_file_beside(dest) if to_zip else temp_dir_beside(dest)
    count = 0
    labels = []
    shape = None
    try:
        zf = zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) if to_zip else None

        def put(name: str, data: bytes):
            if zf is not None:
                zf.writestr(name, data)
            else:
                path = os.path.join(tmp, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)

        if progress:
            from tqdm import tqdm

            items = tqdm(items, desc="convert", unit="img", file=sys.stderr)
        for img, lab in items:
            if max_images is not None and count >= max_images:
                break
            if shape is None:
                shape = img.size
            elif img.size != shape:
                raise DatasetError(f"image {count} is {img.size[0]}x{img.size[1]}, the first was "
                                   f"{shape[0]}x{shape[1]}; give --resolution")
            name = f"{count // 1000:05d}/img{count:08d}.png"
            buf = io.BytesIO()
            img.save(buf, format="png", compress_level=0 if to_zip else 6)
            put(name, buf.getvalue())
            labels.append([name, lab])
            count += 1
        if count == 0:
            raise DatasetError(f"{source}: no images to convert")
        has_labels = all(lab is not None for _, lab in labels)
        put("dataset.json", json.dumps({"labels": labels if has_labels else None}).encode())
        if zf is not None:
            zf.close()
        if not to_zip and os.path.isdir(dest):
            os.rmdir(dest)  # empty (checked above)
        os.replace(tmp, dest)
    except BaseException:
        if to_zip:
            try:
                os.remove(tmp)
            except OSError:
                pass
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count

