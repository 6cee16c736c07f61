"""What the ``fastdiff`` commands share: the device check, dtype names, seed / interval / std parsing, the
guidance flags and their translation into guidance objects, and PNG / grid output (torchrun start-up and
the device rules themselves are library code, in ``fastdiff._dist``).

Only command modules import this; library packages take plain Python values."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import sys
from collections.abc import Callable

import torch

from fastdiff._atomic import atomic_write_with, prepare_outdir  # noqa: F401  (the commands' --outdir check)
from fastdiff._dist import resolve_device
from fastdiff._images import make_grid, save_png  # noqa: F401  (the commands' PNG and grid output)
from fastdiff._runtime import DTYPE_NAMES
from fastdiff.sampling.generate import MAX_SEED, make_guidance
from fastdiff.training.phema import MAX_STD
from fastdiff.sampling.guidance import CADS, METHODS, Guidance, Interval, Param

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
# The flags come from the guidance classes' declarations (fastdiff.sampling.guidance: ``method``, ``params``,
# ``guide_arg``, ``needs_labels``...): a new method there is a new --guidance-method here.

GUIDANCE_METHODS = ("auto", *METHODS)  # auto: the official tool's rule (autoguidance by --gnet)
NETWORK_NAMES = {"net": "--net", "guide": "--gnet", "unconditional": "--net is unconditional (label_dim 0)"}


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


def _param_owners() -> tuple[type[Guidance], ...]:
    """The classes whose parameters are flags: every method, then CADS (--cads, around any method)."""
    return (*METHODS.values(), CADS)


def _flag(cls: type[Guidance], p: Param) -> str:
    return f"--{cls.method}-{p.cli_name}"


def _dest(cls: type[Guidance], p: Param) -> str:
    return _flag(cls, p)[2:].replace("-", "_")


def _flags(cls: type[Guidance]) -> dict[str, str]:
    return {p.name: _flag(cls, p) for p in cls.params}


def _fmt(v) -> str:
    return "none" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


@dataclasses.dataclass(frozen=True)
class GuidanceOptions:
    """The guidance flags, parsed and checked as far as no network is needed (:func:`parse_guidance`).

    ``weight``: ``--guidance`` as given (None: not given, i.e. 1); ``params``: per method (and ``"cads"``)
    the constructor keywords given on the command line, the rest keep the classes' defaults."""

    method: str = "auto"
    weight: float | None = None
    interval: tuple[float, float] | None = None
    interval_steps: tuple[int, int] | None = None
    cads: bool = False
    params: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    force: bool = False

    @property
    def w(self) -> float:
        return 1.0 if self.weight is None else float(self.weight)

    def values(self, cls: type[Guidance]) -> dict:
        """Every parameter of ``cls``: the given value, else the class's default."""
        given = self.params.get(cls.method, {})
        return {p.name: given.get(p.name, p.default) for p in cls.params}


def parse_guidance(args, has_gnet: bool | None = None) -> GuidanceOptions:
    """The guidance flags of ``args`` as :class:`GuidanceOptions`, with every check that needs no network
    (ValueError naming the flag). ``has_gnet``: whether a guiding network is given (default: ``args.gnet``)."""
    method = getattr(args, "guidance_method", None) or "auto"
    weight = getattr(args, "guidance", None)
    w = 1.0 if weight is None else float(weight)
    if method not in GUIDANCE_METHODS:
        raise ValueError(f"unknown --guidance-method {method!r}; expected one of {', '.join(GUIDANCE_METHODS)}")
    if not math.isfinite(w):
        raise ValueError(f"--guidance must be a finite number, got {weight}")
    if w < 0:
        raise ValueError(f"--guidance must be >= 0 (1: no guidance, 0: the unguided branch alone), got {weight}")
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
                f"--guidance={weight} needs a guiding network (--gnet), or a --guidance-method: e.g. "
                "--guidance-method cfg for classifier-free guidance with the null label of a network trained with "
                "--label-dropout; --guidance=1 means no guidance"
            )
    else:
        cls = METHODS[method]
        if weight is None:
            raise ValueError(f"--guidance-method {method} needs a weight: give --guidance W (W = 1 is no guidance)")
        if cls.guide_required and not has_gnet:
            raise ValueError(f"--guidance-method {method} needs a guiding network (--gnet)")
        if cls.guide_arg is None and has_gnet:
            raise ValueError(f"--guidance-method {method} guides with --net itself; --gnet is not used by it")
    cads = bool(getattr(args, "cads", False))
    params: dict[str, dict[str, float]] = {}
    for cls in _param_owners():
        active = cads if cls is CADS else method == cls.method
        for p in cls.params:
            value = getattr(args, _dest(cls, p), None)
            if value is None:
                continue
            if not active:
                where = "--cads" if cls is CADS else f"--guidance-method {cls.method}"
                raise ValueError(f"{_flag(cls, p)} is only used with {where}" +
                                 ("" if cls is CADS else f", not with --guidance-method {method}"))
            problem = p.check(p.type(value))
            if problem:
                raise ValueError(f"{_flag(cls, p)} {problem}, got {value}")
            params.setdefault(cls.method, {})[p.name] = value
    options = GuidanceOptions(method=method, weight=weight, interval=parse_interval(getattr(args, "interval", None)),
                              interval_steps=steps, cads=cads, params=params, force=bool(getattr(args, "force", False)))
    for cls in _param_owners():
        if (cads if cls is CADS else method == cls.method):
            problem = cls.check_params(options.values(cls))
            if problem:
                raise ValueError(problem.format(**_flags(cls)))
    return options


def _label_dim(net) -> int:
    return int(getattr(net, "label_dim", 0) or 0)


def _check_gnet(net, gnet, cls: type[Guidance] | None) -> None:
    """--gnet against --net: the same images, and the classes the method's guide takes."""
    for attr in ("img_channels", "img_resolution"):
        a, b = getattr(net, attr, None), getattr(gnet, attr, None)
        if a is not None and b is not None and int(a) != int(b):
            raise ValueError(f"--gnet does not match --net: {attr} {int(b)} vs {int(a)}")
    net_dim, g_dim = _label_dim(net), _label_dim(gnet)
    if cls is None:
        return
    if cls.guide_arg == "uncond" and g_dim:
        raise ValueError(
            f"--guidance-method {cls.method} with --gnet needs an unconditional --gnet (label_dim 0), this one has "
            f"label_dim {g_dim}: use --guidance-method autoguidance for a conditional guide, or leave out --gnet "
            f"for CFG with the null label of --net"
        )
    if cls.guide_arg == "guide" and g_dim and g_dim != net_dim:
        raise ValueError(f"--gnet has label_dim {g_dim} but --net has {net_dim}: the guide must take the same "
                         "classes, or none (an unconditional guide)")


def _check_null_label(options: GuidanceOptions, net, method: str) -> None:
    """A method guiding with ``--net``'s null label, which only a network trained with label dropout has
    learned: a network file that records ``label_dropout`` 0 is refused (a warning with ``--force``); files
    that record nothing (official pickles, older files) are trusted."""
    recorded = (getattr(net, "checkpoint_extra", None) or {}).get("label_dropout")
    if recorded is None or float(recorded) > 0:
        return
    problem = (f"--guidance-method {method} without --gnet guides with the null label of --net, but --net was "
               "trained without label dropout (label_dropout 0 in its file), so its null label was never trained: "
               "train it with --label-dropout (e.g. 0.1), or give an unconditional --gnet")
    if not options.force:
        raise ValueError(problem + "; --force guides anyway")
    print(f"warning: {problem}", file=sys.stderr)


def check_network_files(args, *flags: str) -> None:
    """A clear error (ValueError) for a network flag (``"net"``, ``"gnet"``) that names no existing file."""
    for flag in flags:
        path = getattr(args, flag, None)
        if path is not None and not os.path.isfile(path):
            what = "is a folder, not a network file" if os.path.isdir(path) else "not found"
            raise ValueError(f"--{flag} {path}: {what}")


def build_guidance(options: GuidanceOptions, net, gnet=None) -> tuple[Guidance | None, str]:
    """The guidance object of the command line and a one-line description of it, with the checks that
    need the networks (ValueError naming the flag).

    ``--guidance-method auto`` builds exactly what the official tool (and :func:`make_guidance`) builds.
    Otherwise the method's class is built from its declaration (the weight, ``--gnet`` as its
    ``guide_arg``, its parameters); ``--interval`` wraps it in :class:`Interval`, and ``--cads`` wraps the
    result in :class:`CADS` (the condition is annealed everywhere on CADS's own schedule; the interval
    limits only the guidance)."""
    method, w = options.method, options.w
    interval, steps = options.interval, options.interval_steps
    cls = METHODS.get(method)
    g: Guidance | None = None
    if cls is not None:
        kwargs = dict(options.params.get(method, {}))
        if cls.guide_arg is not None and gnet is not None:
            kwargs[cls.guide_arg] = gnet
        g = cls(w, **kwargs)
        if g.needs_labels and not _label_dim(net):
            raise ValueError(f"--guidance-method {method} " + cls.labels_reason.format(**NETWORK_NAMES))
    if options.cads and not _label_dim(net):
        raise ValueError("--cads " + CADS.labels_reason.format(**NETWORK_NAMES))
    if gnet is not None and (cls is not None or w != 1):
        _check_gnet(net, gnet, cls)
    if g is not None and g.uses_null_label and w != 1:
        _check_null_label(options, net, method)

    if cls is None:  # auto
        g = make_guidance(gnet, w, interval)  # the official semantics, unchanged
        if g is not None and steps is not None:
            g = Interval(g, steps=steps)
        if g is None:
            desc = "none (--guidance 1)"
        else:
            as_cfg = _label_dim(net) > 0 and not _label_dim(gnet)
            desc = f"auto = {'cfg (unconditional --gnet)' if as_cfg else 'autoguidance'}, w={_fmt(w)}"
    else:
        given, flags = options.params.get(method, {}), _flags(cls)
        for p in cls.params:
            if p.name in given and p.applies is not None and not p.applies(net):
                raise ValueError(f"{flags[p.name]} has no effect on this network: {p.no_effect.format(**flags)}")
        values = options.values(cls)
        details = "".join(f", {p.cli_name}={_fmt(values[p.name])}" for p in cls.params
                          if p.applies is None or p.applies(net))
        branch = g.branch(net).format(**NETWORK_NAMES)
        desc = f"{method}, w={_fmt(w)}{' (w = 1: no guidance)' if w == 1 else ''}, {branch}{details}"
        if interval is not None:
            g = Interval(g, sigma=interval)
        elif steps is not None:
            g = Interval(g, steps=steps)
    if interval is not None and g is not None:
        desc += f", interval sigma in ({_fmt(interval[0])}, {_fmt(interval[1])}]"
    if steps is not None and g is not None:
        desc += f", interval steps {steps[0]}..{steps[1]} (both inclusive, a Heun correction with its step)"
    if options.cads:
        g = CADS(g, **options.params.get("cads", {}))
        values = options.values(CADS)
        desc += ", cads (" + ", ".join(f"{p.cli_name}={_fmt(values[p.name])}" for p in CADS.params) + ")"
    return g, desc


def add_guidance_arguments(parser: argparse.ArgumentParser) -> None:
    """--gnet, --guidance, --interval, --guidance-method, --cads and, from the classes' declarations, every
    method's parameters (``--<method>-<param>``)."""
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
    for cls in _param_owners():
        for p in cls.params:
            group.add_argument(_flag(cls, p), dest=_dest(cls, p), type=p.type, default=None, metavar="X",
                               help=f"{cls.__name__}: {p.help} [default: {_fmt(p.default)}]")


def image_path(outdir: str, seed: int, subdirs: bool) -> str:
    folder = os.path.join(outdir, f"{seed - seed % 1000:06d}") if subdirs else outdir
    return os.path.join(folder, f"{seed:06d}.png")


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


def positive_count(value, flag: str, allow_none: bool = True):
    """``value`` if it is ``None`` (with ``allow_none``: the default applies) or a number > 0; else a
    ``ValueError`` naming ``flag`` (``--batch 0`` must not silently mean the default)."""
    if value is None and allow_none:
        return value
    if value is None or not value > 0:
        raise ValueError(f"{flag} must be > 0, got {value}")
    return value
