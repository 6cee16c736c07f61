"""The EDM2 U-Net (EDM2 Fig. 21) on the fused MP ops.

Module and parameter names follow the official EDM2 release, so its state dicts load with
``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdiff._runtime import is_compiling as _is_compiling
from fastdiff.nn.layers import MPConv, MPFourier, _ops, force_normalize_, resample
from fastdiff import ops as _fops

__all__ = ["Block", "UNet"]


class Block(torch.nn.Module):
    """EDM2 encoder / decoder block: resample, residual branch modulated by the embedding, optional cosine
    self-attention, clip."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample_mode: str = "keep",
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
    ):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"Block: expected flavor 'enc' or 'dec', got {flavor!r}")
        if resample_mode not in ("keep", "up", "down"):
            raise ValueError(f"Block: expected resample_mode 'keep', 'up' or 'down', got {resample_mode!r}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = float(dropout)
        self.res_balance = float(res_balance)
        self.attn_balance = float(attn_balance)
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=(3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=())
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=(3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, kernel=(1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=(1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=(1, 1)) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, x_silu: torch.Tensor | None = None,
                return_silu: bool = False):
        """The block on ``x``. GPU route (``fastdiff.ops.gpu_route``): ``x_silu``, when given, is
        ``mp_silu(x)`` made by the previous block's epilogue (only for a ``dec`` block with ``resample_mode
        'keep'``, whose residual branch starts with it), and ``return_silu=True`` returns ``(x, mp_silu(x))``
        from the one fused epilogue pass (``fastdiff.ops.mp_sum_clip``)."""
        ops = _ops()
        gpu = _fops.gpu_route(x)
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = ops.pixel_norm(x)

        # Residual branch: y = conv_res1(mp_silu(conv_res0(mp_silu(x)) * (1 + c))), x = mp_sum(x, y); each conv
        # with its elementwise chain in one fused pass where the Winograd path is taken (MPConv.fused).
        c = self.emb_linear(emb, gain=self.emb_gain)
        if x_silu is not None and gpu and self.flavor == "dec" and self.resample_mode == "keep":
            y = self.conv_res0.fused(x_silu, c=c)
        else:
            y = self.conv_res0.fused(x, silu_in=True, c=c)
        if self.training and self.dropout != 0:
            y = F.dropout(y, p=self.dropout, training=True)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        clip = float(self.clip_act or 0)  # fused into conv_res1's pass when no attention follows
        if gpu:  # one epilogue pass per residual join: mp_sum + clip (+ the next block's mp_silu)
            s = None
            if self.num_heads == 0 and return_silu:
                x, s = ops.mp_sum_clip(x, self.conv_res1(y), self.res_balance, clip, silu=True)
            else:
                x = self.conv_res1.fused(y, res=x, t=self.res_balance, clip=0.0 if self.num_heads else clip)
            if self.num_heads != 0:
                y = self.attn_proj(ops.cosine_attention(self.attn_qkv(x), self.num_heads))
                out = ops.mp_sum_clip(x, y, self.attn_balance, clip, silu=return_silu)
                x, s = out if return_silu else (out, None)
            return (x, s) if return_silu else x
        x = self.conv_res1.fused(y, res=x, t=self.res_balance, clip=0.0 if self.num_heads else clip)

        # Self-attention.
        if self.num_heads != 0:
            y = self.attn_qkv(x)
            y = ops.cosine_attention(y, self.num_heads)
            y = self.attn_proj(y)
            x = ops.mp_sum(x, y, t=self.attn_balance)

        if self.num_heads != 0 and clip:
            x = ops.clip(x, clip)
        return (x, None) if return_silu else x


class UNet(torch.nn.Module):
    """The EDM2 U-Net ``F(x, c_noise, labels)`` (the raw network, without preconditioning)."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        model_channels: int = 192,
        channel_mult=(1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions=(16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        **block_kwargs,
    ):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.img_resolution = int(img_resolution)
        self.img_channels = int(img_channels)
        self.label_dim = int(label_dim)
        self.label_balance = float(label_balance)
        self.concat_balance = float(concat_balance)
        self.num_levels = len(cblock)
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=())
        self.emb_label = MPConv(label_dim, cemb, kernel=()) if label_dim != 0 else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=(3, 3))
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down", **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="enc", attention=(res in attn_resolutions), **block_kwargs
                )

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        skips = [m.out_channels for m in self.enc.values()]
        self._dec_takes_skip = []
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
                self._dec_takes_skip += [False, False]
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **block_kwargs)
                self._dec_takes_skip.append(False)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="dec", attention=(res in attn_resolutions), **block_kwargs
                )
                self._dec_takes_skip.append(True)
        self.out_conv = MPConv(cout, img_channels, kernel=(3, 3))
        for m in self.modules():
            if isinstance(m, MPConv):
                m._normalized_by_parent = True

    # --- input checks -----------------------------------------------------------------------------

    def check_image(self, x: torch.Tensor, who: str = "UNet") -> None:
        r, c = self.img_resolution, self.img_channels
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != c or x.shape[2] != r or x.shape[3] != r:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{who}: expected images of shape [N, {c}, {r}, {r}], got {got}")
        if not x.is_floating_point():
            raise ValueError(f"{who}: expected floating-point images, got dtype {x.dtype}")

    def prepare_labels(self, class_labels, batch: int, device, who: str = "UNet"):
        """Labels as float32 one-hot-like ``[N or 1, label_dim]``; ``None`` (zeros) and class indices ``[N]``
        (integer) are accepted too. ``None`` for an unconditional network."""
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=device)
        if not isinstance(class_labels, torch.Tensor):
            class_labels = torch.as_tensor(class_labels, device=device)
        if not class_labels.is_floating_point() and class_labels.ndim == 1:
            if not _is_compiling() and class_labels.numel() and (class_labels.min() < 0 or class_labels.max() >= self.label_dim):
                raise ValueError(f"{who}: class indices must lie in [0, {self.label_dim}), got {class_labels.tolist()}")
            class_labels = F.one_hot(class_labels.long(), self.label_dim)
        if class_labels.ndim != 2 or class_labels.shape[1] != self.label_dim or class_labels.shape[0] not in (1, batch):
            raise ValueError(
                f"{who}: expected class labels of shape [N={batch}, label_dim={self.label_dim}] (or [1, "
                f"{self.label_dim}], or integer class indices [N]), got {tuple(class_labels.shape)}"
            )
        return class_labels.to(device=device, dtype=torch.float32)

    # --- forward ------------------------------------------------------------------------------------

    def embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        ops = _ops()
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            if class_labels is None:
                class_labels = torch.zeros([1, self.label_dim], device=emb.device, dtype=emb.dtype)
            lab = self.emb_label(class_labels * math.sqrt(class_labels.shape[1]))
            if lab.shape != emb.shape:
                lab = lab.expand_as(emb).contiguous()
            emb = ops.mp_sum(emb, lab, t=self.label_balance)
        return ops.mp_silu(emb)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None):
        if self.training and _is_compiling():  # forced weight normalization, eagerly (see force_normalize_)
            force_normalize_([m.weight for m in self.modules() if isinstance(m, MPConv)])
        self.check_image(x)
        noise_labels = torch.as_tensor(noise_labels, device=x.device)
        if noise_labels.numel() not in (1, x.shape[0]):
            raise ValueError(
                f"UNet: expected noise_labels of shape [N={x.shape[0]}] (or a scalar), got {tuple(noise_labels.shape)}"
            )
        class_labels = self.prepare_labels(class_labels, x.shape[0], x.device)
        noise_labels = noise_labels.reshape(-1)
        if noise_labels.shape[0] != x.shape[0]:
            noise_labels = noise_labels.expand(x.shape[0])
        emb = self.embed(noise_labels, class_labels)

        ops = _ops()
        # Encoder: a constant channel of ones is appended to the input.
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        gpu = _fops.gpu_route(x)
        if gpu and self.channels_last:  # GPU: channels-last end to end (cuDNN's layout; our kernels keep it)
            in_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            x = x.contiguous(memory_format=torch.channels_last)
        skips = []
        for block in self.enc.values():
            x = block(x) if isinstance(block, MPConv) else block(x, emb)
            skips.append(x)

        # Decoder. On the GPU route a block followed by a 'keep' dec block without a skip hands it
        # mp_silu(x) from its fused epilogue (Block.forward's x_silu / return_silu).
        blocks = list(self.dec.values())
        x_silu = None
        for i, (takes_skip, block) in enumerate(zip(self._dec_takes_skip, blocks)):
            if takes_skip:
                x = ops.mp_cat(x, skips.pop(), t=self.concat_balance)
                x_silu = None
            if gpu and i + 1 < len(blocks) and not self._dec_takes_skip[i + 1] and blocks[i + 1].resample_mode == "keep":
                x, x_silu = block(x, emb, x_silu=x_silu, return_silu=True)
            else:
                x, x_silu = block(x, emb, x_silu=x_silu), None
        out = self.out_conv(x, gain=self.out_gain)
        if gpu and self.channels_last:
            out = out.contiguous(memory_format=in_format)
        return out

    channels_last = True  # GPU route: run channels-last (set False to keep NCHW there, e.g. to compare)

