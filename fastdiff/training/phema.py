"""Power-function EMA and post-hoc EMA reconstruction (EDM2 Sec. 3 and Appendix C).

:class:`PowerFunctionEMA` tracks EMAs parameterized by their relative standard deviation ``sigma_rel``
("std"); :func:`solve_posthoc_coefficients` and :func:`reconstruct_phema` approximate an EMA that was never
tracked as the least-squares combination of stored snapshots. The profiles and the discrete update are
described at :class:`PowerFunctionEMA`.
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "reconstruct_phema",
    "exp_to_std",
    "std_to_exp",
    "power_function_beta",
    "power_function_correlation",
    "power_function_profile",
    "solve_posthoc_coefficients",
    "PowerFunctionEMA",
    "combine_snapshots",
]

MAX_STD = float(np.sqrt(1.0 / 12.0))  # sigma_rel at g = 0 (a plain running mean): 0.288675...


# ------------------------------------------------------------------------------------------------------
# exponent <-> std


def exp_to_std(exp):
    """``sigma_rel`` of the power-function profile with exponent ``exp`` (scalar or array; float64)."""
    g = np.asarray(exp, dtype=np.float64)
    if np.any(g < 0):
        raise ValueError(f"exp_to_std: the exponent must be >= 0, got {exp}")
    std = np.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))
    return float(std) if std.ndim == 0 else std


def _largest_real_root(coeffs: Sequence[float]) -> float:
    # Roots of a monic cubic as eigenvalues of its companion matrix.
    a2, a1, a0 = coeffs
    companion = np.array([[-a2, -a1, -a0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float64)
    roots = np.linalg.eigvals(companion)
    real = roots[np.abs(roots.imag) <= 1e-9 * max(1.0, np.abs(roots).max())].real
    g = real.max() if real.size else roots.real.max()
    # One Newton step on the cubic to polish the eigenvalue solver's answer.
    f = ((g + a2) * g + a1) * g + a0
    df = (3.0 * g + 2.0 * a2) * g + a1
    if df != 0:
        g = g - f / df
    return float(g)


def std_to_exp(std):
    """Exponent ``g`` of the power-function EMA with relative std ``std``: the largest real root of
    ``g^3 + 7 g^2 + (16 - std^-2) g + (12 - std^-2) = 0`` (0.05 -> 16.97, 0.10 -> 6.94).

    ``std`` must lie in ``(0, 0.2887]`` (the upper end is ``g = 0``, a running mean)."""
    s = np.asarray(std, dtype=np.float64)
    if np.any(~np.isfinite(s)) or np.any(s <= 0) or np.any(s > MAX_STD * (1 + 1e-12)):
        raise ValueError(f"std_to_exp: the relative std must lie in (0, {MAX_STD:.4f}], got {std}")
    flat = s.reshape(-1)
    out = np.empty_like(flat)
    for i, v in enumerate(flat):
        r = v ** -2.0
        out[i] = max(_largest_real_root((7.0, 16.0 - r, 12.0 - r)), 0.0)
    out = out.reshape(s.shape)
    return float(out) if out.ndim == 0 else out


def power_function_beta(std, t_next, t_delta):
    """EMA decay for one step of length ``t_delta`` ending at time ``t_next``: ``(1 - t_delta/t_next)^(g+1)``."""
    g = std_to_exp(std)
    t_next = float(t_next)
    if t_next <= 0:
        raise ValueError(f"power_function_beta: t_next must be > 0, got {t_next}")
    ratio = min(max(float(t_delta) / t_next, 0.0), 1.0)
    return (1.0 - ratio) ** (g + 1.0)


# ------------------------------------------------------------------------------------------------------
# profiles and their inner products


def power_function_profile(tau, ofs, std):
    """The profile ``p(tau) = (g+1) tau^g / t^(g+1)`` on ``[0, t]`` (0 outside), ``t = ofs``, ``g`` from ``std``."""
    tau = np.asarray(tau, dtype=np.float64)
    g = std_to_exp(std)
    t = float(ofs)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = (g + 1.0) * np.power(tau / t, g) / t
    return np.where((tau >= 0) & (tau <= t), p, 0.0)


def power_function_correlation(a_ofs, a_std, b_ofs, b_std):
    """Inner products ``int p_a p_b`` of power-function profiles (broadcasting over the arguments).

    ``(ga+1)(gb+1) / ((ga+gb+1) max(ta,tb))`` times ``(ta/tb)^gb`` if ``ta < tb``, else ``(tb/ta)^ga``."""
    ta = np.asarray(a_ofs, dtype=np.float64)
    tb = np.asarray(b_ofs, dtype=np.float64)
    ga = np.asarray(std_to_exp(a_std), dtype=np.float64)
    gb = np.asarray(std_to_exp(b_std), dtype=np.float64)
    if np.any(ta <= 0) or np.any(tb <= 0):
        raise ValueError("power_function_correlation: offsets must be > 0")
    lo = np.minimum(ta, tb)
    hi = np.maximum(ta, tb)
    # The shorter profile's time divided by the longer's, raised to the longer profile's exponent.
    g_long = np.where(ta < tb, gb, ga)
    val = (ga + 1.0) * (gb + 1.0) / ((ga + gb + 1.0) * hi) * np.power(lo / hi, g_long)
    return float(val) if val.ndim == 0 else val


def solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std, rcond: float | None = None):
    """Least-squares coefficients ``X`` (``[num_in, num_out]``) expressing each output profile
    ``(out_ofs[j], out_std[j])`` by the stored snapshot profiles ``(in_ofs[i], in_std[i])``.

    ``A[i, k] = <p_i, p_k>`` (Gram matrix), ``B[i, j] = <p_i, q_j>``; ``X = A^-1 B`` by a least-squares
    solve (stable when snapshots are nearly collinear), then each column is normalized to sum to 1 so the
    reconstruction is a proper weighted average. The reconstructed weights of output ``j`` are
    ``sum_i X[i, j] theta_i``. Offsets may be in images or in steps, as long as both use the same unit."""
    in_ofs, in_std = np.broadcast_arrays(np.asarray(in_ofs, np.float64), np.asarray(in_std, np.float64))
    out_ofs, out_std = np.broadcast_arrays(np.asarray(out_ofs, np.float64), np.asarray(out_std, np.float64))
    in_ofs, in_std = in_ofs.reshape(-1), in_std.reshape(-1)
    out_ofs, out_std = out_ofs.reshape(-1), out_std.reshape(-1)
    if in_ofs.size == 0:
        raise ValueError("solve_posthoc_coefficients: no input snapshots")
    # Work in units of the latest time: the Gram matrix's scale is then O(1) whatever the unit of time.
    scale = max(in_ofs.max(), out_ofs.max())
    a = power_function_correlation(in_ofs[:, None] / scale, in_std[:, None], in_ofs[None, :] / scale, in_std[None, :])
    b = power_function_correlation(in_ofs[:, None] / scale, in_std[:, None], out_ofs[None, :] / scale,
                                   out_std[None, :])
    a = np.atleast_2d(a)
    b = np.atleast_2d(b).reshape(in_ofs.size, out_ofs.size)
    # Equilibrate (diagonal scaling) before the solve: the Gram matrix spans orders of magnitude.
    d = 1.0 / np.sqrt(np.diag(a))
    x, *_ = np.linalg.lstsq(a * d[:, None] * d[None, :], b * d[:, None], rcond=rcond)
    x = x * d[:, None]
    sums = x.sum(axis=0, keepdims=True)
    if np.any(np.abs(sums) < 1e-12):
        raise ValueError("solve_posthoc_coefficients: degenerate solution (coefficients sum to 0)")
    return x / sums


# ------------------------------------------------------------------------------------------------------
# tracking EMAs during training


class PowerFunctionEMA:
    """Track power-function EMAs of ``net``'s parameters for several relative stds at once.

    Same meaning as the official module: ``update(cur_nimg, batch_size)`` after each optimizer step, with
    ``cur_nimg`` the number of training images seen *after* the step; ``get()`` returns
    ``[(ema_net, suffix), ...]`` with suffixes like ``'-0.050'``; ``state_dict()`` / ``load_state_dict()``
    hold ``{'stds': [...], 'emas': [state_dict, ...]}``. The EMA networks are deep copies of ``net`` kept in
    eval mode without gradients; buffers are copied from ``net`` when ``get()`` is called.

    A power-function EMA with exponent ``g`` averages the training trajectory ``theta(tau)`` over ``[0, t]``
    with the weight profile ``p(tau) = (g + 1) tau^g / t^(g + 1)``. Its relative standard deviation
    (width of the profile relative to ``t``) is ``sigma_rel = sqrt((g + 1) / ((g + 2)^2 (g + 3)))``; the
    EMA is parameterized by ``sigma_rel`` ("std") rather than by ``g``.

    Discretely, after each optimizer step ``ema <- lerp(ema, theta, 1 - beta)`` with
    ``beta = (1 - delta / t)^(g + 1)``, ``t`` the training time counted *after* the step and ``delta`` the
    length of the step. Time may be counted in images (``delta`` = batch size) or in steps (``delta`` = 1): the
    profiles only depend on ratios of times, so any consistent unit gives the same result.

    Post-hoc EMA: snapshots of the EMAs taken at times ``t_i`` with exponents ``g_i`` span a space of profiles;
    a profile ``(t_out, g_out)`` that was never tracked is approximated by the least-squares combination
    ``sum_i X_i p_i`` (inner products of profiles in closed form), whose weights ``sum_i X_i theta_i`` are then
    an estimate of that EMA's weights.
    """

    def __init__(self, net: torch.nn.Module, stds: Sequence[float] = (0.050, 0.100)):
        self.net = net
        self.stds = [float(s) for s in stds]
        self.exps = [std_to_exp(s) for s in self.stds]  # validates the stds
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in self.stds]

    def _net_params(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.net.parameters()]

    @torch.no_grad()
    def reset(self) -> None:
        """Set every EMA to the network's current weights."""
        for ema in self.emas:
            for p_net, p_ema in zip(self.net.parameters(), ema.parameters()):
                p_ema.copy_(p_net.detach())
            for b_net, b_ema in zip(self.net.buffers(), ema.buffers()):
                b_ema.copy_(b_net)

    @torch.no_grad()
    def update(self, cur_nimg: int, batch_size: int) -> None:
        net_params = self._net_params()
        for std, ema in zip(self.stds, self.emas):
            beta = power_function_beta(std, t_next=cur_nimg, t_delta=batch_size)
            ema_params = [p for p in ema.parameters()]
            if len(ema_params) != len(net_params):
                raise RuntimeError("PowerFunctionEMA: the network's parameters changed since the EMA was made")
            # ema <- ema + (1 - beta) (theta - ema), fused over all tensors.
            torch._foreach_lerp_(ema_params, [p.to(q.dtype) for p, q in zip(net_params, ema_params)], 1.0 - beta)

    @torch.no_grad()
    def get(self) -> list[tuple[torch.nn.Module, str]]:
        for ema in self.emas:
            for b_net, b_ema in zip(self.net.buffers(), ema.buffers()):
                b_ema.copy_(b_net)
        return [(ema, f"-{std:.3f}") for std, ema in zip(self.stds, self.emas)]

    def state_dict(self) -> dict:
        return dict(stds=list(self.stds), emas=[ema.state_dict() for ema in self.emas])

    def load_state_dict(self, state: dict) -> None:
        stds = [float(s) for s in state["stds"]]
        if len(stds) != len(state["emas"]):
            raise ValueError("PowerFunctionEMA.load_state_dict: 'stds' and 'emas' differ in length")
        if len(stds) != len(self.emas):
            self.emas = [copy.deepcopy(self.net).eval().requires_grad_(False) for _ in stds]
        self.stds = stds
        self.exps = [std_to_exp(s) for s in stds]
        for ema, sd in zip(self.emas, state["emas"]):
            ema.load_state_dict(sd)


# ------------------------------------------------------------------------------------------------------
# post-hoc reconstruction: one pass over the snapshots, all targets at once


@torch.no_grad()
def combine_snapshots(snapshots: Iterable[dict[str, torch.Tensor]], coefs) -> list[dict[str, torch.Tensor]]:
    """Weighted sums ``out_j = sum_i coefs[i, j] * snapshot_i`` for all ``j`` in one pass over the snapshots.

    ``snapshots`` yields state dicts (e.g. loaded lazily from files, one at a time); ``coefs`` is the
    ``[num_in, num_out]`` matrix from :func:`solve_posthoc_coefficients`. Floating-point tensors are
    accumulated in float64 (``float32`` for tensors of more than 16M elements to bound memory) and returned
    in their stored dtype; other tensors (integer buffers) are taken from the first snapshot."""
    coefs = np.asarray(coefs, dtype=np.float64)
    if coefs.ndim != 2:
        raise ValueError(f"combine_snapshots: expected a [num_in, num_out] matrix, got shape {coefs.shape}")
    num_in, num_out = coefs.shape
    acc: list[dict[str, torch.Tensor]] | None = None
    dtypes: dict[str, torch.dtype] = {}
    count = 0
    for i, sd in enumerate(snapshots):
        if i >= num_in:
            raise ValueError(f"combine_snapshots: more snapshots than coefficient rows ({num_in})")
        if acc is None:
            acc = [{} for _ in range(num_out)]
            for k, v in sd.items():
                dtypes[k] = v.dtype
                for j in range(num_out):
                    if v.is_floating_point():
                        wide = torch.float64 if v.numel() <= (1 << 24) else torch.float32
                        acc[j][k] = torch.zeros(v.shape, dtype=wide, device=v.device)
                    else:
                        acc[j][k] = v.clone()
        elif set(sd) != set(dtypes):
            missing = sorted(set(dtypes) ^ set(sd))[:5]
            raise ValueError(f"combine_snapshots: snapshot {i} has different tensors than the first ({missing} ...)")
        for k, v in sd.items():
            if not v.is_floating_point():
                continue
            for j in range(num_out):
                a = acc[j][k]
                if a.shape != v.shape:
                    raise ValueError(f"combine_snapshots: {k!r} has shape {tuple(v.shape)} in snapshot {i}, "
                                     f"{tuple(a.shape)} in the first")
                a.add_(v.to(a.dtype), alpha=float(coefs[i, j]))
        count += 1
    if count != num_in:
        raise ValueError(f"combine_snapshots: got {count} snapshots for {num_in} coefficient rows")
    assert acc is not None
    return [{k: (v.to(dtypes[k]) if dtypes[k].is_floating_point else v) for k, v in out.items()} for out in acc]


def reconstruct_phema(indir, out_stds, outdir, out_nimg=None, in_stds=None, device="cpu", progress=True,
                      verbose=True) -> list[str]:
    """Reconstruct the EMAs ``out_stds`` at training time ``out_nimg`` (default: the latest snapshot) from the
    snapshots in ``indir``; write them to ``outdir``; return the written paths.

    ``indir`` holds either fastdiff's EMA snapshots (``network-snapshot-*.safetensors``, times and stds from
    their metadata) or the official EDM2 training loop's raw snapshots (``<prefix>-<kimg>-<std>.pkl``, times
    and stds from their names, networks read by the safe importer ``fastdiff.io``, which runs no code from
    them; their float16 weights are combined in float64); a folder with both is refused. The outputs are
    fastdiff network files either way."""
    import os
    import sys

    from fastdiff._atomic import remove_orphan_temps
    from fastdiff.training.snapshots import (list_official_snapshots, list_snapshots, load_snapshot_tensors,
                                             save_tensors, snapshot_name)

    snaps = list_snapshots(indir)
    official = list_official_snapshots(indir)
    if snaps and official:
        raise ValueError(f"{indir} holds both fastdiff EMA snapshots (network-snapshot-*.safetensors, e.g. "
                         f"{os.path.basename(snaps[0].path)}) and official EDM2 snapshot pickles (e.g. "
                         f"{os.path.basename(official[0].path)}); reconstruct from one kind at a time (move the "
                         "other into its own folder)")
    snaps = snaps or official
    if in_stds is not None:
        keep = {round(float(s), 6) for s in in_stds}
        snaps = [s for s in snaps if round(s.std, 6) in keep]
    if not snaps:
        raise FileNotFoundError(f"{indir}: no EMA snapshots (network-snapshot-*.safetensors written by training, "
                                "or the official EDM2 raw snapshots <prefix>-<kimg>-<std>.pkl)")
    if out_nimg is None:
        out_nimg = max(s.nimg for s in snaps)
    out_nimg = int(out_nimg)
    snaps = [s for s in snaps if 0 < s.nimg <= out_nimg]
    if not snaps:
        raise ValueError(f"{indir}: no snapshots at or before {out_nimg} images")
    out_stds = [float(s) for s in out_stds]
    coefs = solve_posthoc_coefficients([s.nimg for s in snaps], [s.std for s in snaps], out_nimg, out_stds)
    if verbose:
        kind = "official EDM2 snapshot pickles" if snaps[0].official else "snapshots"
        print(f"phema: {len(snaps)} {kind} from {indir}, {len(out_stds)} targets at {out_nimg} images",
              file=sys.stderr)

    last = {}  # the config (and the official file's other entries) of the latest snapshot read

    def load(s):
        if not s.official:
            return load_snapshot_tensors(s.path, device=device)
        from fastdiff.io.network_file import network_config
        from fastdiff.io.any_network import load_network_and_info

        net, info = load_network_and_info(s.path, device=device, key="ema")
        last["config"], last["info"] = network_config(net), info
        return {k: v.detach() for k, v in net.state_dict().items()}

    def stream():
        it = snaps
        if progress:
            from tqdm import tqdm

            it = tqdm(snaps, desc="phema", unit="snapshot", file=sys.stderr)
        for s in it:
            yield load(s)

    outs = combine_snapshots(stream(), coefs)
    if snaps[-1].official:
        from fastdiff.io.edm2_pickle import jsonable

        base = dict(last["config"])
        others = jsonable(last["info"])
        base["extra"] = {"source_entries": others} if others else {}
    else:
        base = dict(snaps[-1].config)
    os.makedirs(outdir, exist_ok=True)
    paths = []
    for j, (std, tensors) in enumerate(zip(out_stds, outs)):
        config = dict(base)
        config["extra"] = {
            "kind": "phema", "nimg": out_nimg, "std": std, "exponent": float(std_to_exp(std)),
            "num_inputs": len(snaps), "max_abs_coef": float(np.abs(coefs[:, j]).max()),
            # how the inputs were trained (the label dropout tells whether CFG's null label was trained; the
            # encoder record, a latent network's scaling; an official pickle's other entries)
            **{k: v for k, v in (base.get("extra") or {}).items()
               if k in ("label_dropout", "encoder", "source_entries")},
        }
        if snaps[0].official:
            config["extra"]["official_inputs"] = True
        path = os.path.join(outdir, snapshot_name(out_nimg, std, prefix="phema"))
        remove_orphan_temps(outdir, of=os.path.basename(path))  # this file's, left by a killed reconstruction
        save_tensors(tensors, path, config)
        paths.append(path)
        if verbose:
            print(f"phema: wrote {path}", file=sys.stderr)
    return paths
