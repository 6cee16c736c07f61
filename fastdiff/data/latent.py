"""Latent data: EDM2's per-channel latent normalization, and datasets of stored VAE mean/std.

EDM2 (Karras et al. 2024, Sec. 5 and App. C) trains its ImageNet-512 models in the 4x64x64 latent space of the
Stable Diffusion VAE; the dataset stores each image's posterior mean and std (8 channels), and every use draws
one latent and normalizes it per channel (:class:`LatentScaling`, where the map and EDM2's constants are).

This module needs only torch: the VAE itself (diffusers) is in :mod:`fastdiff.vae`.
"""

from __future__ import annotations

import os
import sys
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["LatentScaling", "OFFICIAL_SCALING", "sample_latents", "mean_std_channels", "encoder_record_of",
           "scaling_of", "OFFICIAL_RAW_MEAN", "OFFICIAL_RAW_STD", "OFFICIAL_FINAL_MEAN", "OFFICIAL_FINAL_STD",
           "VAE_ENCODER_CLASS", "PIXEL_ENCODER_CLASS", "encode_dataset", "latent_name"]

OFFICIAL_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
OFFICIAL_RAW_STD = (4.17, 4.62, 3.71, 3.28)
OFFICIAL_FINAL_MEAN = 0.0
OFFICIAL_FINAL_STD = 0.5
VAE_ENCODER_CLASS = "training.encoders.StabilityVAEEncoder"  # the official pickles' encoder record
PIXEL_ENCODER_CLASS = "training.encoders.StandardRGBEncoder"
_MAX_CHANNELS = 64  # a crafted record cannot make us allocate without bound


def _floats(value, what: str) -> tuple[float, ...]:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=np.float64).reshape(-1) if not isinstance(value, (str, bytes, dict)) else None
    if arr is None or arr.size == 0 or arr.size > _MAX_CHANNELS:
        raise ValueError(f"{what}: expected 1..{_MAX_CHANNELS} numbers (one per latent channel), got {value!r}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: expected finite numbers, got {value!r}")
    return tuple(float(v) for v in arr)


@dataclass(frozen=True)
class LatentScaling:
    """EDM2's per-channel affine map between raw VAE latents and the network's latents.

    ``scale`` and ``bias`` hold one float per latent channel, float32-exact (as the official encoder computes
    them in float32).

    EDM2 (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 5 and
    App. C) trains its ImageNet-512 models in the 4x64x64 latent space of the Stable Diffusion VAE. The dataset
    stores, per image, the VAE encoder's posterior *mean and std* (8 channels: 4 means, then 4 stds; "raw
    latents"). Each time the training loop uses an image it draws one latent from that posterior and maps each
    channel ``c`` affinely so that its assumed raw statistics ``(raw_mean[c], raw_std[c])`` become
    ``(final_mean, final_std)``:

        z     = mean + std * n,                  n ~ N(0, I)
        x[c]  = z[c] * scale[c] + bias[c],       scale = final_std / raw_std,  bias = final_mean - raw_mean * scale

    with EDM2's constants ``raw_mean = [5.81, 3.25, 0.12, -2.15]``, ``raw_std = [4.17, 4.62, 3.71, 3.28]``,
    ``final_mean = 0``, ``final_std = 0.5`` (so the latents match the networks' ``sigma_data = 0.5``). Decoding
    inverts the map, ``z = (x - bias) / scale``, before the VAE decoder (:mod:`fastdiff.vae`).
    """

    scale: tuple[float, ...]
    bias: tuple[float, ...]

    def __post_init__(self):
        scale = _floats(self.scale, "latent scale")
        bias = _floats(self.bias, "latent bias")
        if len(scale) != len(bias):
            raise ValueError(f"latent scale has {len(scale)} channels, bias {len(bias)}")
        if any(s == 0 for s in scale):
            raise ValueError(f"latent scale must be non-zero per channel, got {scale}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "bias", bias)

    @classmethod
    def from_stats(cls, raw_mean=OFFICIAL_RAW_MEAN, raw_std=OFFICIAL_RAW_STD, final_mean=OFFICIAL_FINAL_MEAN,
                   final_std=OFFICIAL_FINAL_STD) -> "LatentScaling":
        """``scale = final_std / raw_std``, ``bias = final_mean - raw_mean * scale``, in float32."""
        raw_mean = np.float32(_floats(raw_mean, "raw_mean"))
        raw_std = np.float32(_floats(raw_std, "raw_std"))
        if raw_mean.shape != raw_std.shape and raw_mean.size != 1 and raw_std.size != 1:
            raise ValueError(f"raw_mean has {raw_mean.size} channels, raw_std {raw_std.size}")
        if np.any(raw_std <= 0):
            raise ValueError(f"raw_std must be positive, got {raw_std.tolist()}")
        scale = np.float32(_floats(final_std, "final_std")) / raw_std
        bias = np.float32(_floats(final_mean, "final_mean")) - raw_mean * scale
        n = max(scale.size, bias.size)
        return cls(tuple(np.broadcast_to(scale, n).tolist()), tuple(np.broadcast_to(bias, n).tolist()))

    @classmethod
    def from_encoder_record(cls, record) -> "LatentScaling | None":
        """The scaling an official encoder record describes; ``None`` for the pixel encoder.

        ``record``: ``{'class_name', 'init_kwargs', 'attributes'}`` as :func:`fastdiff.io.load_edm2_pickle`
        parses the pickles' ``encoder`` entry (or as fastdiff stores it). The stored ``scale`` / ``bias``
        attributes win; else they are computed from the constructor's ``raw_mean`` / ``raw_std`` /
        ``final_mean`` / ``final_std`` (the official defaults where absent)."""
        if not isinstance(record, dict) or not isinstance(record.get("class_name"), str):
            raise ValueError(f"encoder record: expected a dict with a 'class_name', got {type(record).__name__}")
        name = record["class_name"]
        short = name.rsplit(".", 1)[-1]
        if short == PIXEL_ENCODER_CLASS.rsplit(".", 1)[-1]:
            return None
        if short != VAE_ENCODER_CLASS.rsplit(".", 1)[-1]:
            raise ValueError(f"encoder record: unknown encoder class {name!r}; expected {VAE_ENCODER_CLASS} "
                             f"or {PIXEL_ENCODER_CLASS}")
        attrs = record.get("attributes") or {}
        kwargs = record.get("init_kwargs") or {}
        if not isinstance(attrs, dict) or not isinstance(kwargs, dict):
            raise ValueError("encoder record: 'attributes' and 'init_kwargs' must be dicts")
        if attrs.get("scale") is not None and attrs.get("bias") is not None:
            return cls(attrs["scale"], attrs["bias"])
        known = ("raw_mean", "raw_std", "final_mean", "final_std")
        return cls.from_stats(**{k: kwargs[k] for k in known if k in kwargs})

    def record(self) -> dict:
        """A JSON-able encoder record, readable by :meth:`from_encoder_record`."""
        return {"class_name": VAE_ENCODER_CLASS, "init_kwargs": {},
                "attributes": {"scale": list(self.scale), "bias": list(self.bias)}}

    @property
    def channels(self) -> int:
        return len(self.scale)

    def _consts(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if like.ndim != 4 or like.shape[1] != self.channels:
            raise ValueError(f"expected latents [N, {self.channels}, H, W], got shape {tuple(like.shape)}")
        kw = dict(dtype=torch.float32, device=like.device)
        return (torch.tensor(self.scale, **kw).reshape(1, -1, 1, 1),
                torch.tensor(self.bias, **kw).reshape(1, -1, 1, 1))

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the network's latents: ``raw * scale + bias`` (float32)."""
        raw = raw.to(torch.float32)
        scale, bias = self._consts(raw)
        return raw * scale + bias

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """The network's latents -> raw VAE latents: ``(x - bias) / scale`` (float32)."""
        x = latents.to(torch.float32)
        scale, bias = self._consts(x)
        return (x - bias) / scale

    def sample(self, mean_std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One latent per image from stored ``[N, 2C, H, W]`` posterior mean/std: ``normalize(mean + std * n)``;
        ``n`` is drawn with ``generator`` (on ``mean_std``'s device) in one ``torch.randn`` call."""
        if mean_std.ndim != 4 or mean_std.shape[1] != 2 * self.channels:
            raise ValueError(f"expected stored mean/std [N, {2 * self.channels}, H, W] (means, then stds), got "
                             f"shape {tuple(mean_std.shape)}")
        mean, std = mean_std.to(torch.float32).chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        return self.normalize(mean + noise * std)


OFFICIAL_SCALING = LatentScaling.from_stats()


def sample_latents(mean_std: torch.Tensor, generator: torch.Generator | None = None,
                   scaling: LatentScaling = OFFICIAL_SCALING) -> torch.Tensor:
    """:meth:`LatentScaling.sample` with EDM2's constants by default."""
    return scaling.sample(mean_std, generator)


def mean_std_channels(dataset, net_channels: int) -> bool:
    """Whether ``dataset`` holds stored VAE mean/std for a network of ``net_channels`` latent channels: float
    ``.npy`` items with twice the network's channels (the official latent datasets' layout)."""
    return bool(getattr(dataset, "is_latent", False)) and int(dataset.num_channels) == 2 * int(net_channels)


def encoder_record_of(net) -> dict | None:
    """The encoder record a loaded network carries, if any: a fastdiff file's ``checkpoint_extra['encoder']``
    (training on latents records it) or ``['source_entries']['encoder']`` (converted from an official pickle),
    or an imported pickle's ``source_entries['encoder']``."""
    extra = getattr(net, "checkpoint_extra", None)
    for holder in (extra if isinstance(extra, dict) else {},
                   (extra or {}).get("source_entries") if isinstance(extra, dict) else None,
                   getattr(net, "source_entries", None)):
        if isinstance(holder, dict) and isinstance(holder.get("encoder"), dict):
            return holder["encoder"]
    return None


def scaling_of(net) -> LatentScaling | None:
    """The latent scaling of a loaded network from its encoder record (:func:`encoder_record_of`); ``None``
    when it has none, it is the pixel encoder, or its channels are not the network's (then it does not
    describe this network)."""
    record = encoder_record_of(net)
    scaling = None if record is None else LatentScaling.from_encoder_record(record)
    if scaling is not None and scaling.channels != int(getattr(net, "img_channels", scaling.channels)):
        return None
    return scaling


# ---- encoding an image dataset into a latent dataset (resumable) ------------------------------------------

ENCODE_FORMAT = "fastdiff.encode/1"


def latent_name(idx: int) -> str:
    """The official latent datasets' member name for image ``idx``: ``00000/img-mean-std-00000000.npy``."""
    s = f"{idx:08d}"
    return f"{s[:5]}/img-mean-std-{s}.npy"


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _chunk_path(work: str, k: int) -> str:
    return os.path.join(work, f"chunk-{k:06d}.zip")


def _chunk_complete(path: str, expected: int) -> bool:
    """A chunk is written atomically, so one that is there is whole; its member count is checked (the zip's
    directory only, not every byte: a resume of a large encode must not reread it all)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return len(zf.namelist()) == expected
    except (OSError, zipfile.BadZipFile):
        return False


def encode_dataset(source, dest, vae, batch: int = 8, chunk: int = 1000, max_images: int | None = None,
                   workers: int = 0, progress: bool = True, fingerprint: str | None = None, log=None) -> int:
    """Encode the images of ``source`` (a folder, zip or ``builtin:NAME``; uint8 RGB, sides multiples of the
    VAE's factor) into a latent dataset at ``dest`` (``.zip`` or folder) in the official layout: per image
    ``00000/img-mean-std-00000000.npy``, float32 ``[2C, H/f, W/f]`` (:meth:`fastdiff.vae.VAE.encode`), and
    ``dataset.json`` with the source's labels. Returns the number of images.

    Streaming and resumable: images are encoded ``batch`` at a time and written ``chunk`` at a time, each
    chunk atomically into the work folder ``DEST.partial/`` next to a progress record (``progress.json``);
    rerunning after a kill continues at the first missing chunk (the record must match: same source, image
    count, chunk and VAE ``fingerprint``) and gives the same bytes as an uninterrupted run. At the end the
    chunks are joined into ``dest`` (written atomically; it takes the dataset's size once more on disk
    meanwhile) and the work folder is removed. ``workers``: DataLoader processes that read and decode the
    source images."""
    import json
    import shutil

    from fastdiff._atomic import atomic_open, atomic_write, remove_orphan_temps
    from fastdiff.data import open_dataset
    from fastdiff.data.dataset import DatasetError

    say = log or (lambda msg: None)
    if int(batch) < 1 or int(chunk) < 1:
        raise ValueError(f"batch and chunk must be >= 1, got batch={batch}, chunk={chunk}")
    batch, chunk = int(batch), int(chunk)
    ds = open_dataset(str(source), channels=3)
    n = ds.raw_len if max_images is None else min(int(max_images), ds.raw_len)
    if n < 1:
        raise DatasetError(f"{source}: no images to encode")
    first = ds[0][0]
    if first.dtype != torch.uint8:
        raise DatasetError(f"{source}: holds {first.dtype} arrays, not uint8 images; is it already encoded?")
    res = int(ds.resolution)
    if res % vae.factor:
        raise DatasetError(f"{source}: {res}x{res} images, the VAE needs sides that are multiples of {vae.factor}")

    dest = os.path.abspath(os.fspath(dest))
    to_zip = dest.lower().endswith(".zip")
    work = dest + ".partial"
    parent = os.path.dirname(dest)
    # What a killed run left beside the destination: the join's temporary, a work folder being deleted.
    os.makedirs(parent, exist_ok=True)
    remove_orphan_temps(parent, of=os.path.basename(dest), dirs=True)
    remove_orphan_temps(parent, of=os.path.basename(work), dirs=True)
    dest_exists = os.path.exists(dest) and (to_zip or bool(os.listdir(dest)))
    if dest_exists and not os.path.isdir(work):
        raise FileExistsError(f"{dest}: exists" + ("" if to_zip else " and is not empty"))
    os.makedirs(work, exist_ok=True)
    remove_orphan_temps(work)  # a chunk being written when the last run was killed
    record = {"format": ENCODE_FORMAT, "source": os.path.abspath(str(source)) if os.path.exists(str(source))
              else str(source), "num_images": n, "resolution": res, "chunk": chunk,
              "vae": fingerprint or repr(dict(vae.model.config)), "scaling": vae.scaling.record()}
    record_path = os.path.join(work, "progress.json")
    if os.path.isfile(record_path):
        try:
            with open(record_path) as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError, RecursionError) as exc:
            raise DatasetError(f"{record_path}: unreadable progress record ({type(exc).__name__}: {exc}); delete "
                               f"{work} to start over") from None
        differs = [k for k in record if old.get(k) != record[k]]
        if differs:
            raise DatasetError(f"{work}: an unfinished encode with other settings ({', '.join(differs)} differ); "
                               f"rerun with the same ones, or delete {work} to start over")
    num_chunks = -(-n // chunk)
    sizes = [min(chunk, n - k * chunk) for k in range(num_chunks)]
    done = 0
    while done < num_chunks and _chunk_complete(_chunk_path(work, done), sizes[done]):
        done += 1
    if dest_exists:
        if done < num_chunks or not os.path.isfile(record_path):
            raise FileExistsError(f"{dest}: exists" + ("" if to_zip else " and is not empty") +
                                  f", beside an unfinished encode in {work}; remove one of them")
        # Killed after the join put dest in place, before the work folder was removed: only that is left.
        say(f"{dest} was complete; removing the work folder {work}")
        _remove_work(work)
        return n

    def save_record(chunks_done: int) -> None:
        with atomic_open(record_path, "w") as f:
            json.dump(dict(record, chunks_done=chunks_done, images_done=sum(sizes[:chunks_done])), f, indent=1)

    save_record(done)
    if done:
        say(f"resuming at image {sum(sizes[:done])} of {n} ({done} of {num_chunks} chunks in {work})")
    # Batches never cross a chunk boundary, so a resumed run feeds the VAE the same batches.
    batches = [list(range(k * chunk + s, k * chunk + min(s + batch, sizes[k])))
               for k in range(done, num_chunks) for s in range(0, sizes[k], batch)]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=int(workers))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, initial=sum(sizes[:done]), unit="img", desc="encode", file=sys.stderr)
    members: list[tuple[str, bytes]] = []
    k = done
    for idx, (images, _labels) in zip(batches, loader):
        mean_std = vae.encode(images)
        members.extend((latent_name(i), _npy_bytes(a)) for i, a in zip(idx, mean_std.numpy()))
        if len(members) == sizes[k]:
            def write(tmp, items=members):
                with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
                    for name, data in items:
                        zf.writestr(name, data)

            atomic_write(_chunk_path(work, k), write)
            k += 1
            members = []
            save_record(k)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()

    # Join the chunks (each member copied as is) and add the labels.
    labels = [[latent_name(i), int(ds._raw_label(i))] for i in range(n)] if ds.has_labels else None
    meta = json.dumps({"labels": labels}).encode()
    if to_zip:
        def join(tmp):
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as out:
                for c in range(num_chunks):
                    with zipfile.ZipFile(_chunk_path(work, c)) as zf:
                        for name in zf.namelist():
                            out.writestr(name, zf.read(name))
                out.writestr("dataset.json", meta)

        atomic_write(dest, join)
    else:
        from fastdiff._atomic import temp_dir_beside

        tmp = temp_dir_beside(dest)
        try:
            for c in range(num_chunks):
                with zipfile.ZipFile(_chunk_path(work, c)) as zf:
                    zf.extractall(tmp)
            with open(os.path.join(tmp, "dataset.json"), "wb") as f:
                f.write(meta)
            if os.path.isdir(dest):
                os.rmdir(dest)  # empty (checked above)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _remove_work(work)
    return n


def _remove_work(work: str) -> None:
    """Remove the work folder: first renamed to a temporary name (one atomic step: a kill during the deletion
    leaves no half-deleted folder that looks like an unfinished encode), then deleted."""
    import shutil

    from fastdiff._atomic import temp_dir_beside

    trash = temp_dir_beside(work)
    os.replace(work, trash)  # over the fresh empty folder
    shutil.rmtree(trash, ignore_errors=True)
