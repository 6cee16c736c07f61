"""What the ``fastdiff`` commands share: the device check, dtype names, seed / interval / std parsing, the
guidance flags and their translation into guidance objects, and PNG / grid output (torchrun start-up and
the device rules themselves are library code, in ``fastdiff._dist``).

Only command modules import this; library packages take plain Python values."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable

import torch

from fastdiff._atomic import atomic_write_with
from fastdiff._dist import resolve_device
from fastdiff._runtime import DTYPE_NAMES
from fastdiff.sampling.generate import MAX_SEED, make_guidance
from fastdiff.training.phema import MAX_STD
from fastdiff.sampling.guidance import (
    APG, CADS, CFG, ICG, TSG, Autoguidance, Guidance, Interval, noise_embedding_layer,
)

DTYPES = DTYPE_NAMES  # what --dtype accepts


def check_device(device) -> str | None:
    """What is wrong with ``--device`` on this machine (None: usable, or not given), the check every command
    runs before it starts: e.g. ``--device cuda`` where no CUDA GPU is available."""
    if device is None:
        return None
    try:
        resolve_device(device)
    except ValueError as exc:
        return f"--device {device}: {exc}"
    return None


def parse_seeds(text: str) -> list[int]:
    """'0-63', '1,5,9', '0-3,10-12' -> list of ints (ranges inclusive)."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise ValueError(f"bad seed range {part!r}: end before start")
            seeds.extend(range(a, b + 1))
        elif re.fullmatch(r"\d+", part):
            seeds.append(int(part))
        else:
            raise ValueError(f"malformed seeds {text!r}: expected integers and ranges like '0-63' or '1,5,10-12'")
    for s in seeds:
        if s > MAX_SEED:
            raise ValueError(f"seed {s} out of range: seeds must lie in [0, {MAX_SEED}]")
    return seeds


def parse_interval(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    parts = str(text).split(",")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"malformed interval {text!r}: expected 'lo,hi', e.g. 0.28,2.9") from None
    if not 0 <= lo < hi:
        raise ValueError(f"bad interval {text!r}: expected 0 <= lo < hi")
    return lo, hi


def parse_interval_steps(text: str | None) -> tuple[int, int] | None:
    """'17,22' -> (17, 22): the first and last sampler step (0-based, both inclusive) that are guided."""
    if text is None:
        return None
    parts = str(text).split(",")
    try:
        first, last = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"malformed --interval-steps {text!r}: expected 'first,last' step indices, "
                         "e.g. 17,22") from None
    if not 0 <= first <= last:
        raise ValueError(f"bad --interval-steps {text!r}: expected 0 <= first <= last")
    return first, last


# --- guidance -----------------------------------------------------------------------------------------

GUIDANCE_METHODS = ("auto", "cfg", "autoguidance", "apg", "icg", "tsg")
# Methods that compare the class condition with something else, so --net must be class-conditional
# (apg only without --gnet: with one, its unconditional branch is that network).
_NEEDS_LABELS = {"cfg", "icg"}


def _guidance_method(text: str) -> str:
    text = str(text).strip().lower()
    if text == "cads":
        raise argparse.ArgumentTypeError(
            "CADS anneals the condition and is not a guidance method of its own: add --cads to any method "
            "(e.g. --guidance-method cfg --guidance 2 --cads), or use it alone with --cads"
        )
    if text not in GUIDANCE_METHODS:
        raise argparse.ArgumentTypeError(
            f"unknown guidance method {text!r}; expected one of {', '.join(GUIDANCE_METHODS)}"
        )
    return text


def _finite(v: float) -> str | None:
    return None if math.isfinite(v) else "must be a finite number"


def _nonneg(v: float) -> str | None:
    return None if math.isfinite(v) and v >= 0 else "must be a finite number >= 0"


def _positive(v: float) -> str | None:
    return None if math.isfinite(v) and v > 0 else "must be a finite number > 0"


def _nonpositive(v: float) -> str | None:
    return None if math.isfinite(v) and v <= 0 else "must be a finite number <= 0 (a momentum beta < 0; 0 = none)"


def _unit(v: float) -> str | None:
    return None if 0 <= v <= 1 else "must lie in [0, 1]"


@dataclasses.dataclass(frozen=True)
class GuidanceParam:
    """A command-line parameter of a guidance class: ``--flag`` sets keyword ``kwarg`` of ``cls``, for
    ``owner`` (a method of ``--guidance-method``, or ``cads`` for ``--cads``). The default is the
    constructor's, read from its signature: it is defined once, in the class."""

    flag: str
    owner: str
    cls: type
    kwarg: str
    help: str
    check: Callable[[float], str | None]

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    @property
    def name(self) -> str:
        """The flag without its method prefix (``--apg-momentum`` -> ``momentum``), for the summary line."""
        return self.flag[len(self.owner) + 3:]

    @property
    def default(self):
        return inspect.signature(self.cls).parameters[self.kwarg].default


GUIDANCE_PARAMS = (
    GuidanceParam("--apg-eta", "apg", APG, "eta", "APG: weight eta of the update's part parallel to D_c", _finite),
    GuidanceParam("--apg-momentum", "apg", APG, "beta", "APG: momentum beta (< 0; 0 = no momentum)", _nonpositive),
    GuidanceParam("--apg-rescale", "apg", APG, "r", "APG: rescale radius r, ||D_c - D_u|| clipped to r per sample "
                  "(none = no rescale)", _positive),
    GuidanceParam("--tsg-scale", "tsg", TSG, "scale", "TSG: s in e~ = e + s std(e) n, for networks with a noise "
                  "embedding layer (fastdiff's, and official pickles loaded by fastdiff)", _nonneg),
    GuidanceParam("--tsg-c-noise-scale", "tsg", TSG, "c_noise_scale", "TSG on networks without that layer (other "
                  "callables): std of the perturbation of c_noise = ln(sigma)/4", _nonneg),
    GuidanceParam("--cads-tau1", "cads", CADS, "tau1", "CADS: full condition below t = tau1 (t in [0, 1], 1 = noise)",
                  _unit),
    GuidanceParam("--cads-tau2", "cads", CADS, "tau2", "CADS: pure noise condition above t = tau2", _unit),
    GuidanceParam("--cads-s", "cads", CADS, "s", "CADS: noise scale s of the annealed condition", _nonneg),
    GuidanceParam("--cads-psi", "cads", CADS, "psi", "CADS: mix psi of the condition rescaled to the original "
                  "mean/std (0 = no rescale)", _unit),
)


def _given(args, p: GuidanceParam) -> bool:
    return getattr(args, p.dest, None) is not None


def _method(args) -> str:
    return getattr(args, "guidance_method", None) or "auto"


def _weight(args) -> float:
    return 1.0 if args.guidance is None else float(args.guidance)


def _owner_active(args, owner: str) -> bool:
    return bool(getattr(args, "cads", False)) if owner == "cads" else _method(args) == owner


def _param_values(args, owner: str) -> dict:
    """The constructor keywords given on the command line for ``owner`` (the rest keep their defaults)."""
    return {p.kwarg: getattr(args, p.dest) for p in GUIDANCE_PARAMS if p.owner == owner and _given(args, p)}


def _effective(args, p: GuidanceParam):
    return getattr(args, p.dest) if _given(args, p) else p.default


def validate_guidance(args, has_gnet: bool | None = None) -> None:
    """Checks of the guidance flags that need no network (ValueError naming the flag). ``has_gnet``:
    whether a guiding network is given (default: whether ``args.gnet`` is)."""
    method, w = _method(args), _weight(args)
    if method not in GUIDANCE_METHODS:
        raise ValueError(f"unknown --guidance-method {method!r}; expected one of {', '.join(GUIDANCE_METHODS)}")
    if not math.isfinite(w):
        raise ValueError(f"--guidance must be a finite number, got {args.guidance}")
    if w < 0:
        raise ValueError(f"--guidance must be >= 0 (1: no guidance, 0: the unguided branch alone), got {args.guidance}")
    if has_gnet is None:
        has_gnet = getattr(args, "gnet", None) is not None
    steps = parse_interval_steps(getattr(args, "interval_steps", None))
    if steps is not None and getattr(args, "interval", None) is not None:
        raise ValueError("give --interval (noise levels) or --interval-steps (step indices), not both")
    num_steps = getattr(args, "steps", None)
    if steps is not None and isinstance(num_steps, int) and steps[0] >= num_steps:
        raise ValueError(f"--interval-steps {steps[0]},{steps[1]} starts after the last step ({num_steps - 1} of "
                         f"--steps {num_steps}): no step would be guided")
    if method == "auto":
        if w != 1 and not has_gnet:
            raise ValueError(
                f"--guidance={args.guidance} needs a guiding network (--gnet), or a --guidance-method: e.g. "
                "--guidance-method cfg for classifier-free guidance with the null label of a network trained with "
                "--label-dropout; --guidance=1 means no guidance"
            )
    else:
        if args.guidance is None:
            raise ValueError(f"--guidance-method {method} needs a weight: give --guidance W (W = 1 is no guidance)")
        if method == "autoguidance" and not has_gnet:
            raise ValueError("--guidance-method autoguidance needs a guiding network (--gnet)")
        if method in ("icg", "tsg") and has_gnet:
            raise ValueError(f"--guidance-method {method} guides with --net itself; --gnet is not used by it")
    for p in GUIDANCE_PARAMS:
        if not _given(args, p):
            continue
        if not _owner_active(args, p.owner):
            where = "--cads" if p.owner == "cads" else f"--guidance-method {p.owner}"
            raise ValueError(f"{p.flag} is only used with {where}" +
                             ("" if p.owner == "cads" else f", not with --guidance-method {method}"))
        problem = p.check(float(getattr(args, p.dest)))
        if problem:
            raise ValueError(f"{p.flag} {problem}, got {getattr(args, p.dest)}")
    if getattr(args, "cads", False):
        tau1, tau2 = (_effective(args, p) for p in GUIDANCE_PARAMS if p.kwarg in ("tau1", "tau2"))
        if not tau1 <= tau2:
            raise ValueError(f"--cads-tau1 ({tau1}) must not exceed --cads-tau2 ({tau2})")


def _check_gnet(net, gnet, method: str) -> None:
    for attr in ("img_channels", "img_resolution"):
        a, b = getattr(net, attr, None), getattr(gnet, attr, None)
        if a is not None and b is not None and int(a) != int(b):
            raise ValueError(f"--gnet does not match --net: {attr} {int(b)} vs {int(a)}")
    net_dim, g_dim = int(getattr(net, "label_dim", 0) or 0), int(getattr(gnet, "label_dim", 0) or 0)
    if method == "cfg" and g_dim:
        raise ValueError(
            f"--guidance-method cfg with --gnet needs an unconditional --gnet (label_dim 0), this one has "
            f"label_dim {g_dim}: use --guidance-method autoguidance for a conditional guide, or leave out --gnet "
            "for CFG with the null label of --net"
        )
    if method in ("autoguidance", "apg") and g_dim and g_dim != net_dim:
        raise ValueError(f"--gnet has label_dim {g_dim} but --net has {net_dim}: the guide must take the same "
                         "classes, or none (an unconditional guide)")


def _check_null_label(args, net, gnet, method: str) -> None:
    """CFG / APG without ``--gnet`` take their unconditional branch from ``--net``'s null label, which only a
    network trained with label dropout has learned. A network file that records ``label_dropout`` 0 is refused
    (a warning with ``--force``); files that record nothing (official pickles, older files) are trusted."""
    if gnet is not None or method not in ("cfg", "apg") or _weight(args) == 1:
        return
    recorded = (getattr(net, "checkpoint_extra", None) or {}).get("label_dropout")
    if recorded is None or float(recorded) > 0:
        return
    problem = (f"--guidance-method {method} without --gnet guides with the null label of --net, but --net was "
               "trained without label dropout (label_dropout 0 in its file), so its null label was never trained: "
               "train it with --label-dropout (e.g. 0.1), or give an unconditional --gnet")
    if not getattr(args, "force", False):
        raise ValueError(problem + "; --force guides anyway")
    print(f"warning: {problem}", file=sys.stderr)


def check_network_files(args, *flags: str) -> None:
    """A clear error (ValueError) for a network flag (``"net"``, ``"gnet"``) that names no existing file."""
    for flag in flags:
        path = getattr(args, flag, None)
        if path is not None and not os.path.isfile(path):
            what = "is a folder, not a network file" if os.path.isdir(path) else "not found"
            raise ValueError(f"--{flag} {path}: {what}")


def _fmt(v) -> str:
    return "none" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def build_guidance(args, net, gnet=None) -> tuple[Guidance | None, str]:
    """The guidance object of the command line and a one-line description of it.

    ``--guidance-method auto`` builds exactly what the official tool (and ``generate_images(gnet=,
    guidance=, interval=)``) builds. Otherwise ``--interval`` wraps the method in :class:`Interval`, and
    ``--cads`` wraps the result in :class:`CADS` (the condition is annealed everywhere on CADS's own
    schedule; the interval limits only the guidance). Errors (ValueError) name the flag."""
    validate_guidance(args, has_gnet=gnet is not None)
    method, w = _method(args), _weight(args)
    interval = parse_interval(getattr(args, "interval", None))
    steps = parse_interval_steps(getattr(args, "interval_steps", None))
    label_dim = int(getattr(net, "label_dim", 0) or 0)
    cads = bool(getattr(args, "cads", False))
    unconditional = "--net is unconditional (label_dim 0)"
    if method in _NEEDS_LABELS and not label_dim:
        raise ValueError(f"--guidance-method {method} needs a class-conditional --net; {unconditional}")
    if method == "apg" and gnet is None and not label_dim:
        raise ValueError(f"--guidance-method apg without --gnet uses the null label of --net, so it needs a "
                         f"class-conditional --net; {unconditional} (or give a guiding network with --gnet)")
    if cads and not label_dim:
        raise ValueError(f"--cads anneals the class condition, so it needs a class-conditional --net; {unconditional}")
    if gnet is not None and (method != "auto" or w != 1):
        _check_gnet(net, gnet, method)
    _check_null_label(args, net, gnet, method)

    g: Guidance | None
    # A guide without classes next to a conditional --net makes autoguidance CFG.
    as_cfg = gnet is not None and label_dim > 0 and not int(getattr(gnet, "label_dim", 0) or 0)
    if method == "auto":
        g = make_guidance(gnet, w, interval)  # the official semantics, unchanged
        if g is not None and steps is not None:
            g = Interval(g, steps=steps)
        if g is None:
            desc = "none (--guidance 1)"
        else:
            desc = f"auto = {'cfg (unconditional --gnet)' if as_cfg else 'autoguidance'}, w={_fmt(w)}"
    else:
        params = _param_values(args, method)
        shown = {p.name: _effective(args, p) for p in GUIDANCE_PARAMS if p.owner == method}
        if method == "cfg":
            g = CFG(w, uncond=gnet)
            branch = "unconditional --gnet" if gnet is not None else "null label of --net"
        elif method == "autoguidance":
            g = Autoguidance(gnet, w)
            branch = "guide --gnet" + (" (unconditional: CFG)" if as_cfg else "")
        elif method == "apg":
            g = APG(w, guide=gnet, **params)
            branch = "guide --gnet" if gnet is not None else "null label of --net"
        elif method == "icg":
            g = ICG(w)
            branch = "random class"
        else:  # tsg
            hook = noise_embedding_layer(net) is not None
            if not hook and "scale" in params:
                raise ValueError(
                    "--tsg-scale has no effect on this network: it has no noise embedding layer, so TSG perturbs its "
                    "noise conditioning c_noise instead (set that with --tsg-c-noise-scale)"
                )
            if hook and "c_noise_scale" in params:
                raise ValueError(
                    "--tsg-c-noise-scale has no effect on this network: it has a noise embedding layer, so TSG "
                    "perturbs its noise embedding (set that with --tsg-scale)"
                )
            g = TSG(w, **params)
            branch = "perturbed noise embedding" if hook else "perturbed c_noise"
            shown.pop("c-noise-scale" if hook else "scale")
        details = "".join(f", {k}={_fmt(v)}" for k, v in shown.items())
        desc = f"{method}, w={_fmt(w)}{' (w = 1: no guidance)' if w == 1 else ''}, {branch}{details}"
        if interval is not None:
            g = Interval(g, sigma=interval)
        elif steps is not None:
            g = Interval(g, steps=steps)
    if interval is not None and g is not None:
        desc += f", interval sigma in ({_fmt(interval[0])}, {_fmt(interval[1])}]"
    if steps is not None and g is not None:
        desc += f", interval steps {steps[0]}..{steps[1]} (both inclusive, a Heun correction with its step)"
    if cads:
        kw = _param_values(args, "cads")
        g = CADS(g, **kw)
        desc += ", cads (" + ", ".join(f"{p.name}={_fmt(_effective(args, p))}" for p in GUIDANCE_PARAMS
                                       if p.owner == "cads") + ")"
    return g, desc


def add_guidance_arguments(parser: argparse.ArgumentParser) -> None:
    """--gnet, --guidance, --interval, --guidance-method, --cads and the methods' parameters."""
    group = parser.add_argument_group(
        "guidance", "--guidance W and --interval apply to every method; a method's parameters are an error with "
        "another method. The defaults are those of the classes in fastdiff.sampling.guidance.")
    group.add_argument("--gnet", default=None, help="guiding network: autoguidance, or CFG with an unconditional net")
    group.add_argument("--guidance", type=float, default=None, metavar="W",
                       help="guidance weight (1 = none) [default: 1]")
    group.add_argument("--interval", default=None, metavar="LO,HI", help="apply guidance only for sigma in (LO, HI], "
                       "decided per network evaluation")
    group.add_argument("--interval-steps", dest="interval_steps", default=None, metavar="FIRST,LAST",
                       help="apply guidance only at sampler steps FIRST..LAST (0-based, both inclusive; a Heun step's "
                            "correction follows its step), the form of the official configurations (e.g. 17,22 of 32)")
    group.add_argument(
        "--guidance-method", dest="guidance_method", type=_guidance_method, default="auto",
        metavar="{" + ",".join(GUIDANCE_METHODS) + "}",
        help="auto: autoguidance by --gnet (CFG if --gnet is unconditional), as the official tool; cfg: classifier-"
             "free guidance, with the null label of --net (trained with --label-dropout) or an unconditional --gnet; "
             "autoguidance: by --gnet; apg: adaptive projected guidance (null label, or --gnet); icg: independent "
             "condition guidance; tsg: time-step guidance [default: auto]")
    group.add_argument("--cads", action="store_true",
                       help="condition-annealed sampling (CADS) around the guidance, or alone; needs a class-"
                            "conditional --net")
    group.add_argument("--force", action="store_true",
                       help="guide even with --net's null label when its file says it was trained without label "
                            "dropout (CFG / APG without --gnet; refused otherwise)")
    for p in GUIDANCE_PARAMS:
        group.add_argument(p.flag, dest=p.dest, type=float, default=None, metavar="X",
                           help=f"{p.help} [default: {_fmt(p.default)}]")


def image_path(outdir: str, seed: int, subdirs: bool) -> str:
    folder = os.path.join(outdir, f"{seed - seed % 1000:06d}") if subdirs else outdir
    return os.path.join(folder, f"{seed:06d}.png")


def save_png(image, path: str) -> None:
    """A uint8 image as a PNG, written atomically (fastdiff._atomic): a tensor ``[C, H, W]`` (C = 1 or 3), or
    an array ``[H, W]`` / ``[H, W, 3]``."""
    import numpy as np
    from PIL import Image

    arr = image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    pil = Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB")
    atomic_write_with(path, lambda f: pil.save(f, format="PNG"))


def make_grid(images: list[torch.Tensor]) -> torch.Tensor:
    """A near-square grid [C, rows*H, cols*W] of uint8 [C, H, W] images (row-major, zero padding)."""
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    c, h, w = images[0].shape
    grid = torch.zeros((c, rows * h, cols * w), dtype=torch.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, cols)
        grid[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return grid


def parse_stds(text: str) -> list[float]:
    try:
        stds = [float(s) for s in str(text).replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.05,0.10, got {text!r}")
    if not stds:
        raise argparse.ArgumentTypeError("expected at least one std")
    for s in stds:
        if not 0 < s <= MAX_STD:
            raise argparse.ArgumentTypeError(f"each std must lie in (0, {MAX_STD:.4f}], got {s}")
    return stds


# ---- latent networks: the VAE decoder (generate, metrics gen) ---------------------------------------------


def add_vae_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("latent networks (EDM2 img512)")
    group.add_argument("--vae", default=None, metavar="PATH",
                       help="decode latents to pixels with this local VAE: a diffusers folder or a .safetensors "
                            "file, e.g. stabilityai/sd-vae-ft-mse fetched by hand (never downloaded; needs "
                            "pip install \"fastdiff[latent]\")")
    group.add_argument("--vae-device", default=None, help="device of the VAE [default: the network's]")
    group.add_argument("--vae-batch", type=int, default=8, metavar="N", help="latents per VAE call [default: 8]")


def make_vae_decoder(args, net, device) -> tuple[Callable | None, bool]:
    """``(decoder, latent)``: whether ``net`` makes latents (its encoder record says so, or ``--vae`` is given
    for a 4-channel network without a record: EDM2's scaling is assumed) and, with ``--vae``, the VAE that
    decodes them (a ``decoder`` for :func:`fastdiff.sampling.generate_images`)."""
    from fastdiff.data.latent import OFFICIAL_SCALING, encoder_record_of, scaling_of

    scaling = scaling_of(net)
    if args.vae is None:
        return None, scaling is not None
    if args.vae_batch < 1:
        raise ValueError(f"--vae-batch must be >= 1, got {args.vae_batch}")
    if scaling is None:
        if encoder_record_of(net) is not None:
            raise ValueError("--vae given, but the network makes pixels (its encoder record is the pixel encoder)")
        if int(net.img_channels) != 4:
            raise ValueError(f"--vae given, but the network has {net.img_channels} channels, not the 4 latent "
                             f"channels of the Stable Diffusion VAE")
        scaling = OFFICIAL_SCALING
    from fastdiff.vae import load_vae

    from fastdiff._dist import resolve_device

    vae_device = resolve_device(args.vae_device) if args.vae_device else device
    try:
        vae = load_vae(args.vae, device=vae_device, batch_size=args.vae_batch, scaling=scaling)
    except (FileNotFoundError, ImportError) as exc:  # the commands report ValueErrors as usage errors
        raise ValueError(f"--vae: {exc}") from None
    if vae.latent_channels != int(net.img_channels):
        raise ValueError(f"the VAE has {vae.latent_channels} latent channels, the network {net.img_channels}")
    return vae.decode, True


def save_npy(array: torch.Tensor, path: str) -> None:
    """A float tensor (e.g. latents) -> ``.npy`` float32, written to a temporary file and renamed."""
    import numpy as np

    atomic_write_with(path, lambda f: np.save(f, array.detach().cpu().to(torch.float32).numpy(), allow_pickle=False))


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Within this block torch uses ``threads`` CPU threads (``None`` or ``<= 0``: unchanged); restored after."""
    old = torch.get_num_threads()
    if threads and threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---- checks of output folders and sizes, made before any work ----------------------------------------------


def prepare_outdir(path, flag: str = "--outdir", create: bool = True) -> str:
    """Check that the output folder ``path`` can be made and written: ``ValueError`` naming ``flag`` otherwise
    (a file in the way, a folder that cannot be created or written). ``create``: leave the folder (and its
    parents) made; else remove again what the check made, so that a command refused later leaves nothing
    behind. Returns ``path``."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a file, not a folder")
    made = []  # the folders this check creates, outermost first
    head = os.path.abspath(path)
    while not os.path.exists(head) and os.path.dirname(head) != head:
        made.insert(0, head)
        head = os.path.dirname(head)
    try:
        for attempt in range(5):  # under torchrun another rank's check may remove the folder in between
            try:
                os.makedirs(path, exist_ok=True)
                with tempfile.TemporaryFile(dir=path):
                    pass
                break
            except FileNotFoundError:
                if attempt == 4:
                    raise
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot create or write the folder ({exc.strerror or exc})") from None
    finally:
        if not create:
            for folder in reversed(made):
                try:
                    os.rmdir(folder)
                except OSError:
                    break
    return path


def positive_count(value, flag: str, allow_none: bool = True):
    """``value`` if it is ``None`` (with ``allow_none``: the default applies) or a number > 0; else a
    ``ValueError`` naming ``flag`` (``--batch 0`` must not silently mean the default)."""
    if value is None and allow_none:
        return value
    if value is None or not value > 0:
        raise ValueError(f"{flag} must be > 0, got {value}")
    return value
