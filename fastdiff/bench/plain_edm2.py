"""A straightforward plain-PyTorch EDM2 network written from the EDM2 paper's formulas: the baseline of
``fastdiff bench`` and of benchmarks/, and an independent oracle in the tests. It imports nothing from
fastdiff: it is a functional model over a flat state dict (the official parameter names), so the same
weights can be fed to it and to ``fastdiff.nn.Precond``.

Like the official implementation it normalizes every weight on every forward (no caching), in training
mode first writes ``N(W)`` back into the parameter (forced weight normalization), and with a reduced
``compute_dtype`` runs the U-Net in that dtype (weights cast per call) while the preconditioning stays in
the input's dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-4


def normalize(x, dim=None, eps=EPS):
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32 if x.dtype != torch.float64 else None)
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())
    return x / norm.to(x.dtype)


def mp_silu(x):
    return F.silu(x) / 0.596


def mp_sum(a, b, t):
    return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a, b, t):
    na, nb = a.shape[1], b.shape[1]
    k = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([k * (1 - t) / math.sqrt(na) * a, k * t / math.sqrt(nb) * b], dim=1)


def fourier(c, freqs, phases):
    return (torch.outer(c.float(), freqs.float()) + phases.float()).cos() * math.sqrt(2)


def box_filter(x, mode):
    """Resampling by the filter definition: [1,1]/2 outer product, depthwise, stride 2."""
    if mode == "keep":
        return x
    c = x.shape[1]
    f = torch.tensor([1.0, 1.0], dtype=x.dtype, device=x.device)
    f = f / f.sum()
    f = torch.outer(f, f)[None, None].repeat(c, 1, 1, 1)
    if mode == "down":
        return F.conv2d(x, f, groups=c, stride=2)
    return F.conv_transpose2d(x, f * 4, groups=c, stride=2)


def attention(qkv, num_heads):
    n, c3, h, w = qkv.shape
    y = qkv.reshape(n, num_heads, -1, 3, h * w)
    q, k, v = normalize(y, dim=2).unbind(3)
    a = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
    return torch.einsum("nhqk,nhck->nhcq", a, v).reshape(n, c3 // 3, h, w)


def structure(cfg):
    """The UNet's layer list from the constructor arguments: (encoder, decoder) lists of
    (name, kind, in_channels, out_channels, dict(flavor, resample, attention, skip))."""
    mc = cfg.get("model_channels", 192)
    cblock = [mc * m for m in cfg.get("channel_mult", [1, 2, 3, 4])]
    nb = cfg.get("num_blocks", 3)
    attn_res = cfg.get("attn_resolutions", [16, 8])
    r0 = cfg["img_resolution"]
    enc, dec = [], []
    cout = cfg["img_channels"] + 1
    for lvl, ch in enumerate(cblock):
        r = r0 >> lvl
        if lvl == 0:
            enc.append((f"{r}x{r}_conv", "conv", cout, ch, {}))
            cout = ch
        else:
            enc.append((f"{r}x{r}_down", "block", cout, cout, dict(flavor="enc", resample="down", attention=False)))
        for i in range(nb):
            enc.append((f"{r}x{r}_block{i}", "block", cout, ch, dict(flavor="enc", resample="keep", attention=r in attn_res)))
            cout = ch
    skip_ch = [e[3] for e in enc]
    for lvl in reversed(range(len(cblock))):
        ch, r = cblock[lvl], r0 >> lvl
        if lvl == len(cblock) - 1:
            dec.append((f"{r}x{r}_in0", "block", cout, cout, dict(flavor="dec", resample="keep", attention=True, skip=False)))
            dec.append((f"{r}x{r}_in1", "block", cout, cout, dict(flavor="dec", resample="keep", attention=False, skip=False)))
        else:
            dec.append((f"{r}x{r}_up", "block", cout, cout, dict(flavor="dec", resample="up", attention=False, skip=False)))
        for i in range(nb + 1):
            cin = cout + skip_ch.pop()
            dec.append((f"{r}x{r}_block{i}", "block", cin, ch, dict(flavor="dec", resample="keep", attention=r in attn_res, skip=True)))
            cout = ch
    return enc, dec


class PlainEDM2:
    """Functional EDM2 Precond over a dict of tensors ``params`` (official names)."""

    def __init__(self, cfg, params, training=False, compute_dtype=None):
        self.cfg = dict(cfg)
        self.compute_dtype = compute_dtype
        self.p = params
        self.training = training
        self.enc, self.dec = structure(self.cfg)
        self.sd = self.cfg.get("sigma_data", 0.5)
        self.label_dim = self.cfg["label_dim"]
        self.cph = self.cfg.get("channels_per_head", 64)
        self.dropout = self.cfg.get("dropout", 0.0)

    @classmethod
    def from_module(cls, cfg, module, training=False, requires_grad=False, dtype=torch.float32, compute_dtype=None):
        params = {}
        for k, v in module.state_dict().items():
            t = v.detach().clone().to(dtype)
            if requires_grad and not k.endswith(("freqs", "phases")):
                t.requires_grad_(True)
            params[k] = t
        return cls(cfg, params, training, compute_dtype)

    def parameters(self):
        return [v for v in self.p.values() if v.requires_grad]

    def conv(self, name, x, gain=1.0):
        w_param = self.p[name + ".weight"]
        w = w_param.float() if w_param.dtype != torch.float64 else w_param
        if self.training:
            with torch.no_grad():
                w_param.copy_(normalize(w))
        w = normalize(w)
        w = w * (gain / np.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)

    def block(self, pre, cin, cout, opt, x, emb):
        x = box_filter(x, opt["resample"])
        has_skip = cin != cout
        if opt["flavor"] == "enc":
            if has_skip:
                x = self.conv(pre + "conv_skip", x)
            x = normalize(x, dim=1)
        y = self.conv(pre + "conv_res0", mp_silu(x))
        c = self.conv(pre + "emb_linear", emb, gain=self.p[pre + "emb_gain"]) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv(pre + "conv_res1", y)
        if opt["flavor"] == "dec" and has_skip:
            x = self.conv(pre + "conv_skip", x)
        x = mp_sum(x, y, 0.3)
        heads = cout // self.cph if opt["attention"] else 0
        if heads:
            y = self.conv(pre + "attn_qkv", x)
            y = attention(y, heads)
            y = self.conv(pre + "attn_proj", y)
            x = mp_sum(x, y, 0.3)
        return x.clamp(-256, 256)

    def unet(self, x, c_noise, labels):
        p = self.p
        emb = self.conv("unet.emb_noise", fourier(c_noise, p["unet.emb_fourier.freqs"], p["unet.emb_fourier.phases"]).to(x.dtype))
        if self.label_dim:
            emb = mp_sum(emb, self.conv("unet.emb_label", labels * math.sqrt(labels.shape[1])), 0.5)
        emb = mp_silu(emb)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, kind, cin, cout, opt in self.enc:
            if kind == "conv":
                x = self.conv("unet.enc." + name, x)
            else:
                x = self.block(f"unet.enc.{name}.", cin, cout, opt, x, emb)
            skips.append(x)
        for name, kind, cin, cout, opt in self.dec:
            if opt["skip"]:
                x = mp_cat(x, skips.pop(), 0.5)
            x = self.block(f"unet.dec.{name}.", cin, cout, opt, x, emb)
        return self.conv("unet.out_conv", x, gain=p["unet.out_gain"])

    def __call__(self, x, sigma, labels=None, return_logvar=False):
        dtype = x.dtype
        sigma = torch.as_tensor(sigma, dtype=dtype).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        unet_dtype = self.compute_dtype or dtype
        if self.label_dim:
            labels = (torch.zeros([1, self.label_dim], device=x.device) if labels is None else labels).to(unet_dtype)
        sd = self.sd
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        f = self.unet((c_in * x).to(unet_dtype), c_noise.flatten(), labels).to(dtype)
        d = c_skip * x + c_out * f
        if return_logvar:
            u = self.conv("logvar_linear", fourier(c_noise.flatten(), self.p["logvar_fourier.freqs"], self.p["logvar_fourier.phases"]).to(dtype))
            return d, u.reshape(-1, 1, 1, 1)
        return d
