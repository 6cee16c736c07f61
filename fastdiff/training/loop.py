"""The EDM2 training loop (EDM2 Sec. 3 and Appendix B: loss, Adam, inverse-sqrt learning-rate decay).

:func:`training_loop` trains a ``Precond``-like network with an ``EDM2Loss``: Adam with the EDM2 learning-rate
schedule, gradient accumulation, non-finite gradients zeroed, optional bf16 / fp16 autocast, power-function
EMAs with snapshots, checkpoints with automatic resume, DDP under ``torch.distributed``, label dropout for CFG
and latent datasets. A resumed run follows the trajectory of an uninterrupted one; its docstring says how.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fastdiff._runtime import dtype_of, nvtx_range
from fastdiff.data.latent import OFFICIAL_SCALING, mean_std_channels
from fastdiff.training.training_state import (capture_rng, checkpoint_records, latest_checkpoint, orphan_weights,
                                          prune_checkpoints, restore_rng, save_checkpoint)
from fastdiff.training.rundir import RunDirectoryBusy, RunLock
from fastdiff.training.phema import PowerFunctionEMA, std_to_exp
from fastdiff.training.snapshots import atomic_write, network_config, save_snapshot, snapshot_name
from fastdiff.training.stats import StatsLog, memory_gib, trim_stats

__all__ = ["learning_rate_schedule", "TrainConfig", "training_loop"]


def learning_rate_schedule(cur_nimg, batch_size, ref_lr=100e-4, ref_batches=70e3, rampup_Mimg=10):
    """``ref_lr / sqrt(max(t / ref_batches, 1)) * min(cur_nimg / (rampup_Mimg * 1e6), 1)``, ``t = cur_nimg /
    batch_size`` (steps taken). ``ref_batches <= 0`` disables the decay, ``rampup_Mimg <= 0`` the warm-up."""
    lr = float(ref_lr)
    if ref_batches > 0:
        lr /= math.sqrt(max(cur_nimg / (ref_batches * batch_size), 1.0))
    if rampup_Mimg > 0:
        lr *= min(cur_nimg / (rampup_Mimg * 1e6), 1.0)
    return lr


@dataclass
class TrainConfig:
    """Everything but the network, the loss and the data. Counts of images unless named otherwise."""

    batch: int = 2048                 # global batch (all processes, all accumulation rounds)
    batch_gpu: int = 0                # images per forward per process (0: batch / processes, no accumulation)
    duration: int = 1 << 27           # train until this many images
    status: int = 128 << 10           # status line / stats record every this many images
    snapshot: int = 8 << 20           # EMA snapshots every this many images (0: only at the end; < 0: never)
    checkpoint: int = 128 << 20       # checkpoint every this many images (0: only at the end; < 0: never)
    lr: float = 0.0100                # alpha_ref
    lr_decay: float = 70000           # t_ref in steps (0: no decay)
    rampup_mimg: float = 10.0         # warm-up length in millions of images (0: none)
    ema_stds: tuple = (0.050, 0.100)  # power-function EMA relative stds
    seed: int = 0
    precision: str = "fp32"           # fp32 | bf16 | fp16 (autocast; the weights stay float32)
    loss_scaling: float = 1.0
    cond: bool = True                 # use the dataset's class labels (when the network takes labels)
    label_dropout: float = 0.0        # probability that an image's label is replaced by the null (all-zero) label
    workers: int = 2                  # DataLoader worker processes
    keep_checkpoints: int = 0         # keep this many newest checkpoints (0: all)
    progress: bool = True             # tqdm bar
    tensorboard: bool = False
    resume: bool = True               # continue from the newest complete checkpoint in outdir
    extra: dict = field(default_factory=dict)  # free-form, recorded in the run's options (preset, data, ...)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["ema_stds"] = list(self.ema_stds)
        return d


_PRECISIONS = ("fp32", "bf16", "fp16")  # fp32: no autocast; the others autocast to that dtype


def _seed_of(*values: int) -> int:
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1, np.uint64)[0] >> 1)


def _check_label_dropout(p) -> float:
    try:
        value = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"label_dropout must be a number in [0, 1), got {p!r}") from None
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise ValueError(f"label_dropout must lie in [0, 1) (the probability of the null label), got {p!r}")
    return value


def _drop_labels(onehot: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``onehot`` with each row replaced by the null label (all zeros) with probability ``p``; the mask is
    ``torch.rand(len(onehot), generator=generator) < p`` on ``onehot``'s device."""
    if p <= 0:
        return onehot
    drop = torch.rand(onehot.shape[0], device=onehot.device, generator=generator) < p
    return onehot.masked_fill(drop[:, None], 0)


def _takes_generator(loss_fn) -> bool:
    try:
        return "generator" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return False


class _Stop:
    """Set by SIGTERM / SIGINT: finish the step, write a checkpoint, return."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _log(msg: str, rank: int) -> None:
    if rank == 0:
        print(f"fastdiff train: {msg}", file=sys.stderr, flush=True)


def _own_run_directory(outdir: str, cfg: TrainConfig, rank: int, world: int, device) -> RunLock | None:
    """Rank 0 takes the run directory's lock (``RunDirectoryBusy`` on every rank when another run holds it),
    then clears what a killed run left: temporaries of the atomic writes and checkpoint weights whose JSON
    record was never written; when starting over (``cfg.resume`` False), the old checkpoints too."""
    from fastdiff._atomic import remove_orphan_temps
    from fastdiff import _dist as D

    lock, busy = None, None
    if rank == 0:
        try:
            lock = RunLock(outdir).acquire()
        except RunDirectoryBusy as exc:
            busy = exc
    if world > 1:
        flag = torch.tensor([0.0 if busy is None else 1.0], device=device)
        D.all_reduce_sum(flag)
        if busy is None and flag.item() > 0:
            busy = RunDirectoryBusy(f"run directory {outdir} is in use by another training run (rank 0 could not "
                                    f"lock it)")
    if busy is not None:
        raise busy
    if rank == 0:
        try:
            for path in remove_orphan_temps(outdir):
                _log(f"removed {path} (a temporary file left by a killed run)", rank)
            for path in orphan_weights(outdir):
                os.remove(path)
                _log(f"removed {path} (the weights of a checkpoint whose record was never written)", rank)
            if not cfg.resume:
                for path in checkpoint_records(outdir):
                    weights = path[: -len(".json")] + ".safetensors"
                    for p in (path, weights):  # the JSON first: never a JSON without its weights
                        if os.path.exists(p):
                            os.remove(p)
                    _log(f"starting over: removed checkpoint {path}", rank)
        except BaseException:
            lock.release()
            raise
    return lock


def training_loop(net: torch.nn.Module, loss_fn, dataset, outdir: str, config: TrainConfig | None = None,
                  device="cpu") -> dict:
    """Train; returns ``{'nimg', 'step', 'stopped', 'resumed_from'}``.

    The run owns ``outdir`` while it trains: a second run on the same folder gets ``RunDirectoryBusy``
    (an flock, see ``fastdiff.training.rundir``; under torch.distributed rank 0 holds it).

    ``training_loop(net, loss_fn, dataset, outdir, config)`` trains ``net`` (a ``Precond``, or anything called as
    ``net(x, sigma, labels, return_logvar=True) -> (D, logvar)``) with ``loss_fn(net, images, labels)`` (an
    ``EDM2Loss``; per-element losses): Adam (0.9, 0.99, 1e-8) with the EDM2 learning-rate schedule, gradient
    accumulation, non-finite gradients zeroed (and counted), optional bf16 / fp16 autocast over float32 master
    weights, power-function EMAs with periodic snapshots, checkpoints with automatic resume, and DDP when
    ``torch.distributed`` is initialized (e.g. under ``torchrun``).

    Determinism: the data order is a function of the seed and the image count (``fastdiff.data.InfiniteSampler``);
    the noise of each micro-batch comes from a generator seeded by (seed, step, position of the micro-batch in the
    global batch), and the global RNG is reseeded the same way before each forward (dropout). A run resumed from
    a checkpoint therefore follows the trajectory of an uninterrupted one, and the global batch a step sees does
    not depend on the number of processes (only the reduction order of the gradients does).

    Label dropout (``TrainConfig.label_dropout = p``, for classifier-free guidance): each training image's one-hot
    label is replaced by the null label (all zeros) with probability ``p``, so that the network also learns the
    unconditional denoiser that CFG's null-label branch evaluates (``fastdiff.sampling.CFG``). The mask of each
    micro-batch comes from its own generator, seeded like the noise by (seed, step, position of the micro-batch
    in the global batch): deterministic, resume-safe, and independent of the number of processes in the same
    sense. ``p = 0`` draws nothing, so the trajectory is exactly that of a run without the option.

    Latent datasets (EDM2's ImageNet-512 set-up): when the dataset holds stored VAE posterior mean/std (float
    ``.npy`` items with twice the network's channels, as ``fastdiff dataset encode`` and the official tool write
    them), every use of an image draws a fresh latent ``mean + std * n`` and normalizes it per channel with EDM2's
    constants (``fastdiff.data.latent.sample_latents``). ``n`` comes from a generator seeded like the noise, by
    (seed, step, position of the micro-batch in the global batch), so a resumed run stays exact. The snapshots
    record the latent scaling (``extra['encoder']``), so ``fastdiff generate --vae`` knows how to decode.
    """
    locks: list = []  # filled by _training_loop once the arguments are checked (nothing is written before)
    try:
        return _training_loop(net, loss_fn, dataset, os.fspath(outdir), config, device, locks)
    finally:
        for lock in locks:
            if lock is not None:
                lock.release()


def _training_loop(net: torch.nn.Module, loss_fn, dataset, outdir: str, config: TrainConfig | None, device,
                   locks: list) -> dict:
    from fastdiff.data import InfiniteSampler, make_loader, to_model_input
    from fastdiff import _dist as D

    cfg = config or TrainConfig()
    device = torch.device(device)
    rank, world = D.rank(), D.world_size()
    log = lambda msg: _log(msg, rank)  # noqa: E731

    # ---- sizes ------------------------------------------------------------------------------------------
    batch = int(cfg.batch)
    if batch <= 0 or batch % world:
        raise ValueError(f"--batch {batch} must be a positive multiple of the number of processes ({world})")
    per_rank = batch // world
    batch_gpu = int(cfg.batch_gpu) or per_rank
    if per_rank % batch_gpu:
        raise ValueError(f"--batch-gpu {batch_gpu} must divide the per-process batch {per_rank} (= {batch} / {world})")
    rounds = per_rank // batch_gpu
    if cfg.precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}, got {cfg.precision!r}")
    amp_dtype = None if cfg.precision == "fp32" else dtype_of(cfg.precision)
    label_dropout = _check_label_dropout(cfg.label_dropout)

    # ---- data vs network ----------------------------------------------------------------------------------
    res, chans, label_dim = int(net.img_resolution), int(net.img_channels), int(getattr(net, "label_dim", 0))
    latent = OFFICIAL_SCALING if mean_std_channels(dataset, chans) else None  # stored VAE mean/std
    if dataset.resolution != res or (dataset.num_channels != chans and latent is None):
        raise ValueError(f"dataset {dataset.name} has {dataset.num_channels}x{dataset.resolution}x{dataset.resolution}"
                         f" items, the network expects {chans}x{res}x{res}")
    use_labels = bool(cfg.cond) and label_dim > 0
    if use_labels:
        if not dataset.has_labels:
            raise ValueError(f"the network is conditional (label_dim={label_dim}) but dataset {dataset.name} has no "
                             f"labels; train unconditionally (--uncond, and a network with label_dim 0) or add labels")
        if dataset.label_dim > label_dim:
            raise ValueError(f"dataset {dataset.name} has {dataset.label_dim} classes, the network only {label_dim}")
    elif label_dropout > 0:
        why = "the network takes no labels (label_dim 0)" if label_dim == 0 else "the run is unconditional (cond=False)"
        raise ValueError(f"label_dropout={label_dropout:g} needs class-conditional training, but {why}; "
                         f"use label_dropout=0 (--label-dropout 0) or train a conditional network")
    if len(dataset) < 1:
        raise ValueError(f"dataset {dataset.name} is empty")

    locks.append(_own_run_directory(outdir, cfg, rank, world, device))
    os.makedirs(outdir, exist_ok=True)
    net = net.to(device).train().requires_grad_(True)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8)

    ddp = net
    if world > 1:
        # Broadcasts rank 0's initial weights, so every rank starts identical.
        ddp = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=label_dim > 0 and not use_labels)
    ema = PowerFunctionEMA(net, stds=cfg.ema_stds) if cfg.ema_stds else None

    # ---- resume -------------------------------------------------------------------------------------------
    cur_nimg, step, resumed_from = 0, 0, None
    totals = {"nonfinite": 0, "train_time_s": 0.0}
    found = latest_checkpoint(outdir, device="cpu", log=log) if cfg.resume else None
    if found is not None:
        tensors, state, resumed_from = found
        if int(state["batch"]) != batch and int(state["nimg"]) % batch:
            raise ValueError(f"{resumed_from}: cannot resume at {state['nimg']} images with --batch {batch}")
        _check_resume_compatible(resumed_from, state, tensors, net, cfg)
        _load_state(net, optimizer, ema, tensors, state, resumed_from)
        restore_rng(tensors, state.get("rng", {}))
        cur_nimg, step = int(state["nimg"]), int(state["step"])
        totals.update(state.get("totals", {}))
        log(f"resuming from {resumed_from} at {cur_nimg} images, step {step}")
        del tensors
    start_nimg = cur_nimg
    if rank == 0:
        dropped = trim_stats(os.path.join(outdir, "stats.jsonl"), start_nimg)
        if dropped:
            log(f"stats.jsonl: dropped {dropped} record(s) past {start_nimg} images (written again by this run)")

    if rank == 0:
        options = dict(config=cfg.to_json(), network=network_config(net), world_size=world, batch_gpu=batch_gpu,
                       accumulation_rounds=rounds, dataset=dataset.describe(), device=str(device),
                       loss=repr(loss_fn))
        atomic_write(os.path.join(outdir, "training_options.json"),
                     lambda tmp: open(tmp, "w").write(json.dumps(options, indent=1, default=str)))
        log(f"{dataset.describe()}; batch {batch} = {world} process(es) x {rounds} round(s) x {batch_gpu}; "
            f"{cfg.precision}; device {device}" + (f"; label dropout {label_dropout:g}" if label_dropout else "")
            + ("; latents drawn from the stored VAE mean/std" if latent is not None else ""))

    # ---- data -----------------------------------------------------------------------------------------------
    sampler = InfiniteSampler(len(dataset), batch, rank, world, cfg.seed, start_nimg=cur_nimg)
    loader = make_loader(dataset, batch_gpu, sampler, workers=cfg.workers, pin_memory=device.type == "cuda")
    data_iter = iter(loader)
    gen = torch.Generator(device=device)
    drop_gen = torch.Generator(device=device) if label_dropout > 0 else None
    latent_gen = torch.Generator(device=device) if latent is not None else None
    gen_kw = {"generator": gen} if _takes_generator(loss_fn) else {}

    stats = StatsLog(outdir, tensorboard=cfg.tensorboard, enabled=rank == 0)
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.duration, initial=min(cur_nimg, cfg.duration), unit="img", unit_scale=True,
                   dynamic_ncols=True, file=sys.stderr, desc="train")

    # Interval accumulators (tensors on the device, read once per status interval: no per-step sync).
    acc = {"loss": torch.zeros((), dtype=torch.float64, device=device),
           "gnorm": torch.zeros((), dtype=torch.float64, device=device),
           "nonfinite": torch.zeros((), dtype=torch.int64, device=device)}
    interval = {"steps": 0, "nimg": 0, "t0": time.time(), "lr": 0.0}

    def crossed(every: int) -> bool:
        return every > 0 and cur_nimg // every > (cur_nimg - batch) // every

    def report() -> None:
        vals = torch.stack([acc["loss"], acc["gnorm"], acc["nonfinite"].to(torch.float64),
                            torch.tensor(float(interval["steps"]), dtype=torch.float64, device=device)])
        D.all_reduce_sum(vals)
        loss_sum, gnorm_sum, nonfinite, steps_all = vals.tolist()
        dt = max(time.time() - interval["t0"], 1e-9)
        # Gradients are identical on every rank after the all-reduce: per-rank sums counted world times.
        nonfinite = int(round(nonfinite / world))
        totals["nonfinite"] += nonfinite
        totals["train_time_s"] += dt
        record = {
            "nimg": cur_nimg, "step": step, "loss": loss_sum / max(steps_all, 1) if interval["steps"] else None,
            "lr": interval["lr"], "grad_norm": gnorm_sum / max(steps_all, 1) if interval["steps"] else None,
            "nonfinite_grads": int(nonfinite), "nonfinite_grads_total": totals["nonfinite"],
            "img_per_s": interval["nimg"] / dt if interval["steps"] else None,
            "sec_per_kimg": dt / interval["nimg"] * 1000 if interval["nimg"] else None,
            **memory_gib(device),
        }
        if rank == 0:
            stats.write(record)
            if record["loss"] is not None:
                line = (f"nimg {cur_nimg} step {step} loss {record['loss']:.4f} lr {record['lr']:.3g} "
                        f"gnorm {record['grad_norm']:.3g} img/s {record['img_per_s']:.1f} "
                        f"nonfinite {record['nonfinite_grads']}")
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}")
                    bar.write(line, file=sys.stderr)
                else:
                    print(line, file=sys.stderr, flush=True)
        for v in acc.values():
            v.zero_()
        interval.update(steps=0, nimg=0, t0=time.time())

    def write_snapshots() -> None:
        if ema is None or rank != 0 or cur_nimg <= 0:
            return
        for (ema_net, _suffix), std in zip(ema.get(), ema.stds):
            save_snapshot(ema_net, os.path.join(outdir, snapshot_name(cur_nimg, std)),
                          {"kind": "ema", "nimg": cur_nimg, "step": step, "batch_size": batch, "std": std,
                           "exponent": float(std_to_exp(std)), "label_dropout": float(cfg.label_dropout),
                           **({"encoder": latent.record()} if latent is not None else {})})

    def write_checkpoint() -> None:
        if rank == 0:
            tensors, state = _gather_state(net, optimizer, ema)
            rng_t, rng_s = capture_rng()
            tensors.update(rng_t)
            state.update(nimg=cur_nimg, step=step, batch=batch, world_size=world, rng=rng_s,
                         sampler=sampler.state_dict(cur_nimg), totals=dict(totals), config=cfg.to_json(),
                         network=network_config(net))
            path = save_checkpoint(outdir, cur_nimg, tensors, state)
            prune_checkpoints(outdir, cfg.keep_checkpoints)
            log(f"checkpoint {path}")
        D.barrier()

    stopped = False
    with _Stop() as stop:
        while True:
            done = cur_nimg >= cfg.duration
            if world > 1 and not done and step % 10 == 0:  # a scalar all-reduce, not on every step
                flag = torch.tensor([1.0 if stop.requested else 0.0], device=device)
                D.all_reduce_sum(flag)
                stop.requested = bool(flag.item() > 0)
            if stop.requested and not done:
                stopped = done = True
                log(f"stop requested; checkpointing at {cur_nimg} images")
            first = cur_nimg == start_nimg
            if first or done or crossed(cfg.status):
                if not (first and interval["steps"] == 0 and cur_nimg > 0):
                    report()
            if cur_nimg != start_nimg and ((done and not stopped and cfg.snapshot >= 0) or crossed(cfg.snapshot)):
                write_snapshots()
            if cur_nimg != start_nimg and ((done and cfg.checkpoint >= 0) or crossed(cfg.checkpoint)):
                write_checkpoint()
            if done:
                break

            # ---- one optimizer step -------------------------------------------------------------------------
            optimizer.zero_grad(set_to_none=True)
            for r in range(rounds):
                offset = rank * per_rank + r * batch_gpu  # this micro-batch's place in the global batch
                with nvtx_range("data"):
                    images, labels = next(data_iter)
                    images = images.to(device, non_blocking=True)
                    if latent is not None:  # a fresh latent from the stored mean/std, seeded like the noise
                        latent_gen.manual_seed(_seed_of(cfg.seed, step, offset, 4))
                        images = latent.sample(images, latent_gen)
                    else:
                        images = to_model_input(images)
                    onehot = None
                    if use_labels:
                        onehot = torch.nn.functional.one_hot(labels.to(device), label_dim).to(torch.float32)
                gen.manual_seed(_seed_of(cfg.seed, step, offset, 1))
                torch.manual_seed(_seed_of(cfg.seed, step, offset, 2))
                if drop_gen is not None:
                    drop_gen.manual_seed(_seed_of(cfg.seed, step, offset, 3))
                    onehot = _drop_labels(onehot, label_dropout, drop_gen)
                sync = ddp.no_sync() if (world > 1 and r < rounds - 1) else contextlib.nullcontext()
                with sync:
                    with nvtx_range("forward"), torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16,
                                                               enabled=amp_dtype is not None):
                        loss = loss_fn(ddp, images, onehot, **gen_kw)
                    loss = loss.to(torch.float32)
                    with nvtx_range("backward"):
                        loss.sum().mul(cfg.loss_scaling / per_rank).backward()
                acc["loss"] += loss.detach().mean().to(torch.float64) / rounds

            with nvtx_range("optimizer"):
                lr = learning_rate_schedule(cur_nimg, batch, cfg.lr, cfg.lr_decay, cfg.rampup_mimg)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                grads = [p.grad for p in params if p.grad is not None]
                if grads:
                    if cfg.loss_scaling != 1:
                        torch._foreach_mul_(grads, 1.0 / cfg.loss_scaling)
                    bad = torch.stack([(~torch.isfinite(g)).sum() for g in grads]).sum()
                    acc["nonfinite"] += bad
                    for g in grads:
                        torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0, out=g)
                    acc["gnorm"] += torch.linalg.vector_norm(
                        torch.stack(torch._foreach_norm(grads)).to(torch.float64))
                optimizer.step()
            cur_nimg += batch
            step += 1
            with nvtx_range("ema"):
                if ema is not None:
                    ema.update(cur_nimg=cur_nimg, batch_size=batch)
            interval["steps"] += 1
            interval["nimg"] += batch
            interval["lr"] = lr
            if bar is not None:
                bar.update(min(batch, max(cfg.duration - bar.n, 0)))

    if bar is not None:
        bar.close()
    stats.close()
    del data_iter
    return {"nimg": cur_nimg, "step": step, "stopped": stopped, "resumed_from": resumed_from}


# ---------------------------------------------------------------------------------------------- state <-> tensors


def _gather_state(net, optimizer, ema) -> tuple[dict, dict]:
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    ema_stds = []
    if ema is not None:
        sd = ema.state_dict()
        ema_stds = sd["stds"]
        for i, e in enumerate(sd["emas"]):
            tensors.update({f"ema.{i}.{k}": v for k, v in e.items()})
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v if v.ndim else v.reshape(())
            else:
                raise TypeError(f"unexpected non-tensor optimizer state {k!r}")
    state = {"optimizer": {"param_groups": opt["param_groups"]}, "ema_stds": ema_stds}
    # Copies on the CPU (safetensors refuses tensors that share memory; no extra GPU memory at checkpoint time).
    tensors = {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}
    return tensors, state


def _describe_network(config: dict) -> str:
    kwargs = config.get("kwargs") or {}
    return f"preset {config.get('preset')!r}, class {config.get('class')}, label_dim {kwargs.get('label_dim', '?')}"


def _check_resume_compatible(path: str, state: dict, tensors: dict, net, cfg: TrainConfig) -> None:
    """A clear error when the checkpoint was written by a run with another network (class, or parameters of
    other names / shapes; options that change no parameter, such as the compute dtype, may differ) or
    another conditioning."""
    have, want = state.get("network") or {}, network_config(net)
    old_cfg = state.get("config") or {}
    hint = "; resume with the options of that run, or train into another --outdir (or start over with --restart)"
    if "cond" in old_cfg and bool(old_cfg["cond"]) != bool(cfg.cond):
        what = {True: "class-conditional", False: "unconditional (--uncond)"}
        raise ValueError(f"{path}: the checkpoint is from a {what[bool(old_cfg['cond'])]} run, this run is "
                         f"{what[bool(cfg.cond)]}{hint}")
    old_range = (old_cfg.get("extra") or {}).get("sigma_range")
    new_range = (cfg.extra or {}).get("sigma_range")
    if old_range != new_range:
        name = lambda r: "all noise levels" if r is None else f"sigma in ({r.replace(',', ', ')}]"  # noqa: E731
        raise ValueError(f"{path}: the checkpoint was trained on {name(old_range)}, this run asks for "
                         f"{name(new_range)} (--sigma-range); to make an expert from that run, fine-tune one of its "
                         f"snapshots into another --outdir with --init")
    mine = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    theirs = {k[4:]: tuple(v.shape) for k, v in tensors.items() if k.startswith("net.")}
    if mine == theirs and have.get("class", want["class"]) == want["class"]:
        return
    diffs = [f"{k}: {have.get(k)!r} vs {want.get(k)!r}" for k in ("class", "preset") if have.get(k) != want.get(k)]
    hk, wk = have.get("kwargs") or {}, want.get("kwargs") or {}
    diffs += [f"{k}: {hk.get(k)!r} vs {wk.get(k)!r}" for k in sorted(set(hk) | set(wk)) if hk.get(k) != wk.get(k)]
    if mine != theirs:
        bad = sorted(set(mine) ^ set(theirs)) or [k for k in mine if mine[k] != theirs.get(k)]
        diffs.append(f"{len(set(mine) ^ set(theirs))} parameter name(s) and "
                     f"{sum(mine[k] != theirs[k] for k in set(mine) & set(theirs))} shape(s) differ, e.g. {bad[0]}")
    if diffs:
        raise ValueError(f"{path}: the checkpoint holds another network ({_describe_network(have)}) than this run "
                         f"builds ({_describe_network(want)}); differences (checkpoint vs this run): "
                         f"{', '.join(diffs)}{hint}")


def _load_state(net, optimizer, ema, tensors: dict, state: dict, path: str = "checkpoint") -> None:
    net_sd = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
    try:
        net.load_state_dict(net_sd)
    except RuntimeError as exc:  # names / shapes differ (a network without a recorded config)
        first = str(exc).strip().splitlines()
        raise ValueError(f"{path}: the checkpoint's network does not fit this run's ({first[0] if first else exc}"
                         f" ...); resume with the options of that run, or train into another --outdir") from None
    if ema is not None:
        stds = state.get("ema_stds") or []
        if [round(s, 6) for s in stds] != [round(s, 6) for s in ema.stds]:
            raise ValueError(f"the checkpoint tracks EMA stds {stds}, this run {ema.stds}; use the same --ema")
        emas = []
        for i in range(len(stds)):
            pre = f"ema.{i}."
            emas.append({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
        ema.load_state_dict({"stds": stds, "emas": emas})
    opt_state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
