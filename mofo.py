"""
Modality Forcing (Duisterhof et al., arXiv 2606.13676), minimal from-scratch reference.

One diffusion transformer with three token streams -- text, RGB, depth -- trained with flow
matching where every modality has its *own* noise level. Choosing the levels picks the task:

    joint : text            -> RGB + depth   (both streams start from noise)
    i2d   : clean RGB       -> depth         (t_rgb = 0 throughout)
    d2i   : clean depth     -> RGB           (t_depth = 0 throughout)

RGB and depth are both diffused in *pixel space*: an image of H x W pixels is cut into p x p
patches, giving (H/p)(W/p) RGB tokens of p*p*3 values and the same number of depth tokens of p*p
values, on one shared grid. Both heads predict the clean sample (x-prediction) and are trained
with a velocity-space loss; because depth is predicted per pixel, the loss can be masked per
pixel, so sparse depth (LiDAR) trains the model: missing pixels are fed as pure noise and left
out of the loss.

Time convention (used everywhere in this repository):
    x_t = (1 - t) * x0 + t * eps,   t = 0 is data, t = 1 is pure noise,
    velocity u = eps - x0, and sampling integrates from t = 1 down to t = 0.

Sections: config & presets | layers | blocks | model | depth normalisation | training loss |
sampler | checkpoints. Formulas cite ../shared/docs/SPEC.md (the spec) by section.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import attention as attention_triton
from kernels import rms_norm as rms_norm_triton
from kernels.attention import SUPPORTED_HEAD_DIMS, attention_reference
from kernels.rmsnorm import rms_norm_reference

# -----------------------------------------------------------------------------
# Config and presets
# -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Architecture of one MoFo model; saved as config.json beside the weights."""

    name: str = "tiny"
    res: int = 32  # default (square) image size in pixels; any multiple of `patch` works
    patch: int = 4  # pixel patch size p: RGB token = p*p*3 values, depth token = p*p values
    width: int = 128  # hidden size H
    heads: int = 4  # head_dim = width / heads: 16, 32, 64 or 128
    n_double: int = 1  # triple-stream blocks (own weights per stream, joint attention)
    n_single: int = 1  # shared single-stream blocks over [txt, img, depth]
    n_decoder: int = 1  # depth-only single-stream blocks before the depth head
    mlp_ratio: float = 3.0  # SwiGLU hidden M = mlp_ratio * H (SPEC 1.3)
    vocab_size: int = 512  # BPE vocabulary; id 0 is <pad> and "" encodes to all pad
    text_len: int = 32  # text tokens per caption (padded, no mask, as upstream)
    rope_theta: float = 2000.0
    has_depth: bool = True  # False = the text-to-image pre-training model (no depth stream)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    def validate(self) -> "Config":
        # The attention kernel takes these head dims; all are multiples of 8 (4 RoPE axes of pairs).
        if self.width % self.heads or self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"width {self.width} / heads {self.heads} must give a head_dim in "
                             f"{SUPPORTED_HEAD_DIMS}, not {self.width / self.heads:g}")
        if self.res % self.patch:
            raise ValueError(f"res {self.res} must be a multiple of patch {self.patch}")
        return self


# The paper's scaling family uses 30 flat layers (370M / 800M / 3.3B at widths 1024 / 1536 / 3072).
# A triple-stream block carries three streams' weights, so we reach the same sizes with
# 4 triple + 10 single + 2 depth-decoder blocks. `tiny` and `small` are for CPU tests and demos.
PRESETS: dict[str, Config] = {
    "tiny": Config("tiny", res=32, patch=4, width=96, heads=3, n_double=1, n_single=1, n_decoder=1,
                   vocab_size=512, text_len=24),
    "small": Config("small", res=64, patch=8, width=384, heads=6, n_double=2, n_single=4, n_decoder=1,
                    vocab_size=1024, text_len=32),
    "base": Config("base", res=256, patch=16, width=1024, heads=16, n_double=4, n_single=10, n_decoder=2,
                   vocab_size=8192, text_len=64),
    "large": Config("large", res=256, patch=16, width=1536, heads=24, n_double=4, n_single=10, n_decoder=2,
                    vocab_size=8192, text_len=64),
    "xl": Config("xl", res=256, patch=16, width=3072, heads=24, n_double=4, n_single=10, n_decoder=2,
                 vocab_size=8192, text_len=64),
}


def get_config(name: str, **overrides) -> Config:
    """A preset by name, with field overrides (e.g. res=64, has_depth=False)."""
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides).validate()


# -----------------------------------------------------------------------------
# Layers
# -----------------------------------------------------------------------------

# Which attention / RMSNorm implementation the model calls: "auto" = Triton kernels on CUDA
# tensors and the PyTorch reference elsewhere; "triton" forces the kernels (on CPU that needs
# TRITON_INTERPRET=1); "torch" forces the reference, so both paths can be compared end to end.
KERNELS = "auto"
NO_TRITON_HERE = "the Triton kernels need a CUDA device or TRITON_INTERPRET=1 (Triton's CPU interpreter)"


def set_kernels(mode: str, device: torch.device | None = None) -> None:
    """Pick the implementation; with `device`, refuse "triton" where it could not run."""
    global KERNELS
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels must be auto, triton or torch, not {mode!r}")
    if mode == "triton" and device is not None and not _triton_runs_on(device):
        raise ValueError(NO_TRITON_HERE)
    KERNELS = mode


def _triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _use_triton(x: torch.Tensor) -> bool:
    if KERNELS == "triton" and not _triton_runs_on(x.device):
        # kernels.* would quietly run the reference, and a comparison of the two paths would
        # compare the reference with itself.
        raise RuntimeError(NO_TRITON_HERE)
    return KERNELS == "triton" or (KERNELS == "auto" and x.is_cuda)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal attention, (B, heads, S, D) -> (B, heads, S, D), scale 1/sqrt(D)."""
    return attention_triton(q, k, v) if _use_triton(q) else attention_reference(q, k, v)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim with fp32 math (SPEC 1.7); returns fp32."""
    x = x.float()
    return rms_norm_triton(x, weight, eps) if _use_triton(x) else rms_norm_reference(x, weight, eps)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 1e4) -> torch.Tensor:
    """Sinusoidal embedding of 1000*t, cos first then sin (SPEC 1.2). t: (B,) -> (B, dim) fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear, no biases: the timestep (and cross-stream mixing) embedders."""

    def __init__(self, in_dim: int, width: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, width, bias=False)
        self.fc2 = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class Modulation(nn.Module):
    """adaLN head: vec (B, H) -> k tensors of shape (B, 1, H), ordered (shift, scale, gate, ...).

    Zero-initialised (adaLN-Zero), so every gate starts at 0 and every block starts as identity.
    """

    def __init__(self, width: int, k: int):
        super().__init__()
        self.k = k
        self.lin = nn.Linear(width, k * width, bias=False)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.k, dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(1 + scale) * LayerNorm(x) + shift, LayerNorm without affine parameters, eps 1e-6."""
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift


class SwiGLU(nn.Module):
    """Linear(H -> 2M), silu(a) * b, Linear(M -> H); no biases."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w_in = nn.Linear(width, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(a) * b)


def rope_angles(ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the 4-axis RoPE angles (SPEC 1.4). ids: (S, 4) -> two (S, head_dim/2) fp32.

    The axes are (modality, row, col, text position), each given head_dim/4 channels, i.e.
    head_dim/8 rotated pairs with frequencies theta^(-2k/d).
    """
    d = head_dim // 4
    omega = theta ** (-torch.arange(0, d, 2, device=ids.device, dtype=torch.float32) / d)  # (d/2,)
    angles = torch.cat([ids[:, a:a + 1].float() * omega[None] for a in range(4)], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate consecutive pairs (x_2k, x_2k+1) of x: (B, heads, S, D) fp32, rope from rope_angles."""
    cos, sin = rope
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def qkv_heads(qkv: torch.Tensor, heads: int, q_scale: torch.Tensor, k_scale: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, S, 3H) -> q, k, v each (B, heads, S, D); q and k RMS-normalised (QK-norm) in fp32."""
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
    return rms_norm(q, q_scale), rms_norm(k, k_scale), v


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RoPE then attention over the whole sequence; (B, heads, S, D) -> (B, S, heads*D)."""
    q, k = apply_rope(q, rope).to(v.dtype), apply_rope(k, rope).to(v.dtype)
    return attention(q, k, v).transpose(1, 2).flatten(2)


# -----------------------------------------------------------------------------
# Blocks
# -----------------------------------------------------------------------------


class StreamLayer(nn.Module):
    """One stream's weights inside a triple-stream block (QKV, QK-norm scales, output, MLP)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.q_scale = nn.Parameter(torch.ones(cfg.head_dim))
        self.k_scale = nn.Parameter(torch.ones(cfg.head_dim))
        self.proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.mlp = SwiGLU(cfg.width, cfg.mlp_hidden)


class TripleStreamBlock(nn.Module):
    """Per-stream weights and modulation, one joint attention over the concatenated streams.

    With has_depth=False this is FLUX's double-stream block (txt, img); add_depth_stream() adds
    the third stream by cloning the img weights (SPEC 3.4).
    """

    def __init__(self, cfg: Config, streams: tuple[str, ...]):
        super().__init__()
        self.heads = cfg.heads
        self.streams = nn.ModuleDict({s: StreamLayer(cfg) for s in streams})

    def forward(self, xs: dict[str, torch.Tensor], mods: dict[str, tuple[torch.Tensor, ...]],
                rope: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = list(self.streams)  # order [txt, img, depth] = order of the RoPE ids
        qs, ks, vs = [], [], []
        for s in names:
            shift, scale = mods[s][0], mods[s][1]
            q, k, v = qkv_heads(self.streams[s].qkv(modulate(xs[s], shift, scale)), self.heads,
                                self.streams[s].q_scale, self.streams[s].k_scale)
            qs.append(q), ks.append(k), vs.append(v)
        out = joint_attention(torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2), rope)
        out = out.split([xs[s].shape[1] for s in names], dim=1)
        new = {}
        for s, o in zip(names, out):
            layer, (_, _, gate1, shift2, scale2, gate2) = self.streams[s], mods[s]
            x = xs[s] + gate1 * layer.proj(o)
            new[s] = x + gate2 * layer.mlp(modulate(x, shift2, scale2))
        return new


class SingleStreamBlock(nn.Module):
    """Parallel attention + SwiGLU over one sequence, with per-token modulation (SPEC 1.3)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.heads, self.width, self.hidden = cfg.heads, cfg.width, cfg.mlp_hidden
        self.lin1 = nn.Linear(cfg.width, 3 * cfg.width + 2 * cfg.mlp_hidden, bias=False)
        self.lin2 = nn.Linear(cfg.width + cfg.mlp_hidden, cfg.width, bias=False)
        self.q_scale = nn.Parameter(torch.ones(cfg.head_dim))
        self.k_scale = nn.Parameter(torch.ones(cfg.head_dim))

    def forward(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...],
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: (B, S, H); mod: (shift, scale, gate), each (B, S or 1, H)."""
        shift, scale, gate = mod
        qkv, mlp_in = self.lin1(modulate(x, shift, scale)).split([3 * self.width, 2 * self.hidden], -1)
        attn = joint_attention(*qkv_heads(qkv, self.heads, self.q_scale, self.k_scale), rope)
        a, b = mlp_in.chunk(2, dim=-1)
        return x + gate * self.lin2(torch.cat([attn, F.silu(a) * b], dim=-1))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then Linear(H -> p*p*C): tokens back to pixel patches."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.mod = Modulation(width, 2)
        self.out = nn.Linear(width, out_dim, bias=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, fp32: bool = False) -> torch.Tensor:
        """x: (B, N, H), vec: (B, H) -> (B, N, out_dim). fp32=True computes with fp32 weights
        even when the model is stored in bf16 (the depth head, SPEC 1.7)."""
        w_mod, w_out = self.mod.lin.weight, self.out.weight
        if fp32:
            w_mod, w_out = w_mod.float(), w_out.float()
        shift, scale = F.linear(F.silu(vec), w_mod)[:, None].chunk(2, dim=-1)
        return F.linear(modulate(x, shift, scale), w_out)


# -----------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p), token channels ordered (c, pi, pj) (SPEC 2.1)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x: torch.Tensor, p: int, C: int, H: int, W: int) -> torch.Tensor:
    """Inverse of patchify: (B, N, C*p*p) -> (B, C, H, W)."""
    B = x.shape[0]
    x = x.reshape(B, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C, H, W)


def position_ids(text_len: int, gh: int, gw: int, with_depth: bool, device) -> torch.Tensor:
    """4-D RoPE ids (modality, row, col, text position) for [txt, img, (depth)] -> (S, 4).

    Depth tokens sit on the RGB grid and differ only in the first axis (SPEC 1.4).
    """
    txt = torch.zeros(text_len, 4, device=device)
    txt[:, 3] = torch.arange(text_len, device=device)
    r, c = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    img = torch.stack([torch.zeros_like(r), r, c, torch.zeros_like(r)], -1).reshape(-1, 4).float()
    parts = [txt, img]
    if with_depth:
        dep = img.clone()
        dep[:, 0] = 1
        parts.append(dep)
    return torch.cat(parts)


class MoFo(nn.Module):
    """The three-stream diffusion transformer (SPEC 1.1).

    forward(rgb_t, t_rgb, text, depth_t, t_depth) predicts the clean RGB image and the clean
    (normalised) depth map from their noisy versions; each modality has its own t.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg.validate()
        H, p = cfg.width, cfg.patch
        self.txt_in = nn.Embedding(cfg.vocab_size, H)
        self.img_in = nn.Linear(3 * p * p, H, bias=False)
        self.time_in = MLPEmbedder(256, H)
        streams = ("txt", "img", "depth") if cfg.has_depth else ("txt", "img")
        self.double_mod = nn.ModuleDict({s: Modulation(H, 6) for s in streams})
        self.double_blocks = nn.ModuleList(TripleStreamBlock(cfg, streams) for _ in range(cfg.n_double))
        self.single_mod = nn.ModuleDict({s: Modulation(H, 3) for s in streams if s != "txt"})
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.n_single))
        self.final_layer = FinalLayer(H, 3 * p * p)
        if cfg.has_depth:
            self.depth_in = nn.Linear(p * p, H, bias=False)
            self.time_in_depth = MLPEmbedder(256, H)
            # Cross-stream timestep mixing (v2): each stream's vector also sees the other's t,
            # through a gate that starts at exactly 0 so the t2i behaviour is untouched at init.
            self.mix_depth_to_img = MLPEmbedder(256, H)
            self.mix_img_to_depth = MLPEmbedder(256, H)
            self.alpha_img = nn.Parameter(torch.zeros(1))
            self.alpha_depth = nn.Parameter(torch.zeros(1))
            self.decoder_mod = Modulation(H, 3)
            self.decoder_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.n_decoder))
            self.depth_final_layer = FinalLayer(H, p * p)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears, N(0, 0.02) embeddings, and adaLN-Zero: modulation heads and output
        projections at zero, so the untrained network is the identity on every residual stream
        and predicts x0 = 0 (the mean of the normalised data is near 0 for RGB)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, MLPEmbedder):
                nn.init.normal_(m.fc1.weight, std=0.02)
                nn.init.normal_(m.fc2.weight, std=0.02)
            elif isinstance(m, Modulation):
                nn.init.zeros_(m.lin.weight)
            elif isinstance(m, FinalLayer):
                nn.init.zeros_(m.out.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, rgb: torch.Tensor, t_rgb: torch.Tensor, text: torch.Tensor,
                depth: torch.Tensor | None = None, t_depth: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """rgb: (B, 3, H, W) noisy image x_t; t_rgb: (B,); text: (B, L) token ids;
        depth: (B, H, W) noisy normalised depth; t_depth: (B,).
        Returns the x0 predictions: rgb (B, 3, H, W) fp32 and depth (B, H, W) fp32 (or None
        for a model without a depth stream). H, W: any multiple of the patch size."""
        cfg, p = self.cfg, self.cfg.patch
        B, _, Hpx, Wpx = rgb.shape
        if Hpx % p or Wpx % p:
            raise ValueError(f"image size {Hpx}x{Wpx} is not a multiple of the patch size {p}")
        gh, gw = Hpx // p, Wpx // p
        wdtype = self.img_in.weight.dtype

        e_rgb = timestep_embedding(t_rgb).to(wdtype)
        vec = {"img": self.time_in(e_rgb)}
        xs = {"txt": self.txt_in(text), "img": self.img_in(patchify(rgb.to(wdtype), p))}
        if cfg.has_depth:
            e_dep = timestep_embedding(t_depth).to(wdtype)
            vec["depth"] = self.time_in_depth(e_dep) + self.alpha_depth * self.mix_img_to_depth(e_rgb)
            vec["img"] = vec["img"] + self.alpha_img * self.mix_depth_to_img(e_dep)
            xs["depth"] = self.depth_in(patchify(depth[:, None].to(wdtype), p))
        vec["txt"] = vec["img"]  # the text stream has no timestep of its own (SPEC 1.2)

        ids = position_ids(text.shape[1], gh, gw, cfg.has_depth, rgb.device)
        rope = rope_angles(ids, cfg.head_dim, cfg.rope_theta)

        # Stage A: triple-stream blocks; modulation is computed once and shared by all blocks.
        mods = {s: self.double_mod[s](vec[s]) for s in xs}
        for blk in self.double_blocks:
            xs = blk(xs, mods, rope)

        # Stage B: one sequence; txt+img tokens take the RGB modulation, depth tokens the depth one.
        lens = [xs[s].shape[1] for s in xs]
        x = torch.cat(list(xs.values()), dim=1)
        m_img = self.single_mod["img"](vec["img"])
        if cfg.has_depth:
            m_dep = self.single_mod["depth"](vec["depth"])
            n_rgb, n_dep = lens[0] + lens[1], lens[2]
            mod = tuple(torch.cat([a.expand(-1, n_rgb, -1), b.expand(-1, n_dep, -1)], 1)
                        for a, b in zip(m_img, m_dep))
        else:
            mod = m_img
        for blk in self.single_blocks:
            x = blk(x, mod, rope)

        rgb_tok = x[:, lens[0]:lens[0] + lens[1]]
        rgb_out = unpatchify(self.final_layer(rgb_tok, vec["img"]).float(), p, 3, Hpx, Wpx)
        if not cfg.has_depth:
            return rgb_out, None

        # Stage C: depth-only decoder blocks (no text, no RGB), then the fp32 depth head:
        # x-prediction of depth in bf16 bands visibly (SPEC 1.7).
        d = x[:, lens[0] + lens[1]:]
        d_rope = tuple(r[lens[0] + lens[1]:] for r in rope)
        m_dec = self.decoder_mod(vec["depth"])
        for blk in self.decoder_blocks:
            d = blk(d, m_dec, d_rope)
        with torch.autocast(device_type=d.device.type, enabled=False):
            dep = self.depth_final_layer(d.float(), vec["depth"].float(), fp32=True)
        return rgb_out, unpatchify(dep, p, 1, Hpx, Wpx)[:, 0]


def add_depth_stream(t2i: MoFo) -> MoFo:
    """Turn a text-to-image model (has_depth=False) into a Modality Forcing model (SPEC 3.4).

    All t2i weights are kept. In every triple-stream block the new depth stream is a copy of the
    image stream, and the depth modulation heads are copies of the image ones (the spec marks
    cloning the modulation heads as inferred: we do it so depth tokens start out processed the
    way image tokens are). Trained from scratch, as in the paper: the depth patch embedding, the
    depth timestep embedder, the depth decoder blocks, the depth head and the cross-stream mixers
    (gates at zero).
    """
    if t2i.cfg.has_depth:
        raise ValueError("model already has a depth stream")
    model = MoFo(replace(t2i.cfg, has_depth=True)).to(t2i.img_in.weight.device)
    missing, unexpected = model.load_state_dict(t2i.state_dict(), strict=False)
    assert not unexpected, unexpected
    for blk in model.double_blocks:
        blk.streams["depth"].load_state_dict(blk.streams["img"].state_dict())
    model.double_mod["depth"].load_state_dict(model.double_mod["img"].state_dict())
    model.single_mod["depth"].load_state_dict(model.single_mod["img"].state_dict())
    return model


# -----------------------------------------------------------------------------
# Depth normalisation (SPEC 2.2 / 2.3)
# -----------------------------------------------------------------------------

# Inverse contraction is 1/(2 - z) for z > 1, which blows up at z = 2; clamping keeps decoded depth
# finite (at most 1/eps times the mean) and > 0 (upstream leaves this unclamped, SPEC 2.3).
_Z_MIN, _Z_MAX = 1e-3, 2.0 - 1e-3


def normalize_depth(depth: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Metric or relative depth (..., H, W) -> network target z in [0, 2), 0 at invalid pixels.

    d / mean(d) over the valid pixels (unit mean, so scale is factored out), then the mip-NeRF 360
    contraction c(d) = d for d <= 1, 2 - 1/d beyond. Pixels that are not valid, not finite or <= 0
    are invalid; a map without any valid pixel comes back all zeros.
    """
    ok = torch.isfinite(depth) & (depth > 0)
    if valid is not None:
        ok = ok & valid.bool()
    d = torch.where(ok, depth, torch.zeros_like(depth)).float()
    mean = d.sum((-2, -1), keepdim=True) / ok.sum((-2, -1), keepdim=True).clamp(min=1)
    d = d / mean.clamp(min=1e-12)
    z = torch.where(d <= 1, d, 2 - 1 / d.clamp(min=1))
    return torch.where(ok, z, torch.zeros_like(z))


def denormalize_depth(z: torch.Tensor) -> torch.Tensor:
    """Network output z (..., H, W) -> relative depth with mean about 1; always finite and > 0."""
    z = z.float().clamp(_Z_MIN, _Z_MAX)
    return torch.where(z <= 1, z, 1 / (2 - z))


# -----------------------------------------------------------------------------
# Training loss: flow matching with one noise level per modality (SPEC 3)
# -----------------------------------------------------------------------------

T_MIN = 0.05  # x-prediction -> velocity divides by t; clamp as the sampler does (SPEC 3.1)
MODES = ("joint", "i2d", "d2i")


def sample_t_logit_normal(n: int, mu: float, g: torch.Generator, s: float = 1.0) -> torch.Tensor:
    """t = sigmoid(N(mu, s^2)): logit-normal, with the timestep shift mu added to the logit."""
    return torch.sigmoid(mu + s * torch.randn(n, generator=g))


def sample_t_plateau(n: int, mu: float, g: torch.Generator, s: float = 1.0) -> torch.Tensor:
    """Plateau logit-normal (SPEC 3.2): the logit-normal density up to its mode t_m = sigmoid(mu),
    then flat at that height up to t = 1. Puts much mass at high noise, which suits the default
    RGB-first sampling trajectory where depth stays noisy until late."""
    t_m = 1 / (1 + math.exp(-mu))
    mass_low = 0.5  # the logit-normal below its median sigmoid(mu) holds exactly half its mass
    mass_flat = 1 / (math.sqrt(2 * math.pi) * s * t_m)  # p(t_m) * (1 - t_m), p = logit-normal density
    low = torch.rand(n, generator=g) < mass_low / (mass_low + mass_flat)
    t_low = torch.sigmoid(mu - s * torch.randn(n, generator=g).abs())
    t_flat = t_m + (1 - t_m) * torch.rand(n, generator=g)
    return torch.where(low, t_low, t_flat)


def _velocity(x_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x-prediction -> velocity u = (x_t - x0_hat) / t, t clamped at T_MIN; t broadcast from (B,)."""
    return (x_t - x0_hat) / t.clamp(min=T_MIN).view(-1, *([1] * (x_t.dim() - 1)))


def _mix(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (1 - t.view(-1, *([1] * (x0.dim() - 1)))) * x0 + t.view(-1, *([1] * (x0.dim() - 1))) * eps


def flow_loss(model: nn.Module, rgb: torch.Tensor, text: torch.Tensor, depth: torch.Tensor | None = None,
              valid: torch.Tensor | None = None, *, generator: torch.Generator,
              p_modes: tuple[float, float, float] = (0.6, 0.2, 0.2), shift_mu: float = 1.1,
              caption_dropout: float = 0.1, depth_weight: float = 1.0,
              teacher: nn.Module | None = None, distill_weights: tuple[float, float] = (1.0, 0.1),
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """One batch of the Modality Forcing objective.

    rgb: (B, 3, H, W) clean image in [-1, 1]; text: (B, L) ids (0 = pad, so an all-zero row is the
    "" caption); depth: (B, H, W) normalised depth z (see normalize_depth) and valid: (B, H, W) bool
    the supervised pixels -- both None for a text-to-image model. All randomness (mode, t, noise,
    caption dropout) comes from `generator` (a CPU generator), which makes a run resumable
    bit-exactly from a step number alone.

    Per sample a mode is drawn: joint (p 0.6, both t random), i2d (t_rgb = 0) or d2i (t_depth = 0).
    t_rgb is logit-normal with shift mu, t_depth plateau logit-normal. Missing depth pixels are pure
    noise in x_t at any t (the network must treat them as unknown) and are left out of the loss. A
    modality's loss is dropped where its own t = 0: x_t = x0 there, so it carries no signal, only
    variance (SPEC 3.3, inferred). A sample with no valid depth pixel at all is trained as joint
    with t_depth = 1, the same as "depth entirely unknown".

    Both heads are x-prediction with the velocity loss ||u_hat - (eps - x0)||^2 (SPEC 3.1).
    With `teacher` (a frozen text-to-image MoFo), adds self-distillation (SPEC 3.3):
    (l_hi * t_depth + l_lo * (1 - t_depth)) * ||u_t2i - u_rgb||^2 with (l_hi, l_lo) = distill_weights.
    Returns (loss, stats): stats holds 0-d tensors (per-modality losses, mode fractions) for logging.
    """
    B, dev = rgb.shape[0], rgb.device
    g = generator
    has_depth = depth is not None
    # Draw every random number on the CPU in a fixed order, then move: identical on any device.
    u_mode = torch.rand(B, generator=g).to(dev)
    t_rgb = sample_t_logit_normal(B, shift_mu, g).to(dev)
    t_dep = sample_t_plateau(B, shift_mu, g).to(dev)
    drop = (torch.rand(B, generator=g) < caption_dropout).to(dev)
    eps_rgb = torch.randn(rgb.shape, generator=g).to(dev)
    eps_dep = torch.randn(depth.shape, generator=g).to(dev) if has_depth else None

    text = torch.where(drop[:, None], torch.zeros_like(text), text)
    # Stats stay 0-d tensors: converting them here would stall the GPU several times a step.
    stats: dict[str, torch.Tensor] = {}
    if has_depth:
        has_valid = valid.flatten(1).any(1)
        i2d = (u_mode >= p_modes[0]) & (u_mode < p_modes[0] + p_modes[1]) & has_valid
        d2i = (u_mode >= p_modes[0] + p_modes[1]) & has_valid
        t_rgb = torch.where(i2d, torch.zeros_like(t_rgb), t_rgb)
        t_dep = torch.where(d2i, torch.zeros_like(t_dep), t_dep)
        t_dep = torch.where(has_valid, t_dep, torch.ones_like(t_dep))
        stats["frac_i2d"], stats["frac_d2i"] = i2d.float().mean(), d2i.float().mean()
        x_dep = torch.where(valid, _mix(depth, eps_dep, t_dep), eps_dep)
    x_rgb = _mix(rgb, eps_rgb, t_rgb)

    if has_depth:
        rgb_hat, dep_hat = model(x_rgb, t_rgb, text, x_dep, t_dep)
    else:
        rgb_hat, _ = model(x_rgb, t_rgb, text)

    # Mean over each sample's pixels, then over the samples whose term is active.
    u_rgb = _velocity(x_rgb, rgb_hat, t_rgb)
    per_rgb = (u_rgb - (eps_rgb - rgb)).pow(2).mean((1, 2, 3))
    on_rgb = (t_rgb > 0).float()
    loss_rgb = (per_rgb * on_rgb).sum() / on_rgb.sum().clamp(min=1)
    loss = loss_rgb
    stats["loss_rgb"] = loss_rgb.detach()
    if has_depth:
        err = (_velocity(x_dep, dep_hat, t_dep) - (eps_dep - depth)).pow(2) * valid
        per_dep = err.sum((1, 2)) / valid.sum((1, 2)).clamp(min=1)
        on_dep = ((t_dep > 0) & valid.flatten(1).any(1)).float()
        loss_dep = (per_dep * on_dep).sum() / on_dep.sum().clamp(min=1)
        loss = loss + depth_weight * loss_dep
        stats["loss_depth"] = loss_dep.detach()
    if teacher is not None:
        with torch.no_grad():
            u_t2i = _velocity(x_rgb, teacher(x_rgb, t_rgb, text)[0], t_rgb)
        lam = distill_weights[0] * t_dep + distill_weights[1] * (1 - t_dep) if has_depth else distill_weights[0]
        per = lam * (u_t2i - u_rgb).pow(2).mean((1, 2, 3))
        loss_dist = (per * on_rgb).sum() / on_rgb.sum().clamp(min=1)
        loss = loss + loss_dist
        stats["loss_distill"] = loss_dist.detach()
    stats["loss"] = loss.detach()
    return loss, stats


# -----------------------------------------------------------------------------
# Sampler: Euler over both streams with per-modality schedules (SPEC 4)
# -----------------------------------------------------------------------------


def shift_schedule(u: torch.Tensor, mu: float) -> torch.Tensor:
    """t = e^mu / (e^mu + (1/u - 1)) (sigma = 1), i.e. s*u / (1 + (s-1)*u) with s = e^mu."""
    s = math.exp(mu)
    return s * u / (1 + (s - 1) * u)


def rollout_timesteps(num_steps: int, mode: str = "joint", shift_mu: float = 1.1,
                      log2_alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-modality time grids for the sampler -> (t_rgb, t_depth), each (num_steps + 1,) float64,
    from 1 (noise) to 0 (data); a frozen modality is 0 throughout.

    joint with log2_alpha: t_depth = f(t_rgb), f(t) = a*t / (1 + (a-1)*t), a = 2^log2_alpha, a Moebius
    warp fixing 0 and 1: a > 1 denoises RGB first, a < 1 depth first (SPEC 4.2).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    u = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    t = shift_schedule(u, shift_mu)
    zero = torch.zeros_like(t)
    if mode == "i2d":
        return zero, t
    if mode == "d2i":
        return t, zero
    if log2_alpha is None:
        return t, t.clone()
    a = 2.0 ** log2_alpha
    return t, a * t / (1 + (a - 1) * t)


def autocast(device: torch.device, dtype: str = "auto"):
    """bf16 autocast on CUDA by default ("auto"); fp32 on CPU unless dtype="bf16"."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


@torch.no_grad()
def sample(model: MoFo, text_ids: torch.Tensor, *, mode: str = "joint", rgb: torch.Tensor | None = None,
           depth: torch.Tensor | None = None, depth_valid: torch.Tensor | None = None, steps: int = 50,
           cfg: float = 1.0, log2_alpha: float | None = None, shift_mu: float = 1.1, seed: int = 0,
           res: int | None = None, dtype: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Generate with Euler steps over both streams.

    text_ids: (B, L). i2d needs rgb (B, 3, H, W) in [-1, 1]; d2i needs depth (B, H, W) normalised
    (normalize_depth) and optionally depth_valid (B, H, W): invalid pixels are noise, as in training.
    cfg > 1 runs a second, unconditional pass on the "" caption (all pad) and extrapolates both
    heads in x-space. Noise comes from a generator seeded with `seed` on the model's device: RGB
    first, then depth. Returns (rgb (B, 3, H, W) in about [-1, 1], depth z (B, H, W) or None).
    """
    dev = next(model.parameters()).device
    B = text_ids.shape[0]
    if mode != "joint" and not model.cfg.has_depth:
        raise ValueError(f"mode {mode} needs a model with a depth stream")
    if mode == "i2d" and rgb is None:
        raise ValueError("i2d needs an input image (rgb)")
    if mode == "d2i" and depth is None:
        raise ValueError("d2i needs an input depth map")
    ref = rgb if rgb is not None else depth[:, None] if depth is not None else None
    Hpx, Wpx = (ref.shape[-2], ref.shape[-1]) if ref is not None else (res or model.cfg.res,) * 2

    g = torch.Generator(dev).manual_seed(seed)
    x_rgb = torch.randn(B, 3, Hpx, Wpx, generator=g, device=dev)
    x_dep = torch.randn(B, Hpx, Wpx, generator=g, device=dev) if model.cfg.has_depth else None
    if mode == "i2d":
        x_rgb = rgb.to(dev, torch.float32)
    if mode == "d2i":
        ok = torch.ones_like(depth, dtype=torch.bool) if depth_valid is None else depth_valid.to(dev).bool()
        x_dep = torch.where(ok, depth.to(dev, torch.float32), x_dep)

    t_rgb, t_dep = rollout_timesteps(steps, mode, shift_mu, log2_alpha)
    text_ids = text_ids.to(dev)
    if cfg != 1.0:
        text_ids = torch.cat([text_ids, torch.zeros_like(text_ids)])
    double = (lambda x: torch.cat([x, x])) if cfg != 1.0 else (lambda x: x)
    model.eval()
    for i in range(steps):
        tr = torch.full((B,), float(t_rgb[i]), device=dev)
        td = torch.full((B,), float(t_dep[i]), device=dev)
        with autocast(dev, dtype):
            if model.cfg.has_depth:
                r_hat, d_hat = model(double(x_rgb), double(tr), text_ids, double(x_dep), double(td))
            else:
                r_hat, d_hat = model(double(x_rgb), double(tr), text_ids)
        if cfg != 1.0:
            r_c, r_u = r_hat.float().chunk(2)
            r_hat = r_u + cfg * (r_c - r_u)
            if d_hat is not None:
                d_c, d_u = d_hat.float().chunk(2)
                d_hat = d_u + cfg * (d_c - d_u)
        # The frozen modality (dt = 0) is skipped outright, so it stays bit-identical.
        if t_rgb[i + 1] != t_rgb[i]:
            x_rgb = x_rgb + float(t_rgb[i + 1] - t_rgb[i]) * _velocity(x_rgb, r_hat.float(), tr)
        if d_hat is not None and t_dep[i + 1] != t_dep[i]:
            x_dep = x_dep + float(t_dep[i + 1] - t_dep[i]) * _velocity(x_dep, d_hat.float(), td)
    return x_rgb, x_dep


# -----------------------------------------------------------------------------
# Checkpoints (a directory: model.safetensors, config.json, tokenizer.json, ...)
# -----------------------------------------------------------------------------


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


LATEST = "latest"  # a run directory's pointer file naming its newest complete checkpoint


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a run directory (train.py --out) whose `latest` file names one."""
    from data import UserError

    if not os.path.isdir(path):
        raise UserError(f"checkpoint directory not found: {path}")
    pointer = os.path.join(path, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as fh:
            path = os.path.join(path, fh.read().strip())
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        if not os.path.isfile(os.path.join(path, f)):
            raise UserError(f"{path} is not a checkpoint: {f} is missing")
    return path


def load_checkpoint(path: str, device: str | torch.device = "cpu", ema: bool = True):
    """Load (model, tokenizer) from a checkpoint (or run) directory written by train.py.

    model.safetensors holds both the EMA weights (prefix "ema.") and the raw weights ("raw.");
    `ema` picks which. Raises data.UserError for a missing or malformed checkpoint.
    """
    from safetensors.torch import load_file
    from data import UserError, load_tokenizer

    path = resolve_checkpoint(path)
    try:
        with open(os.path.join(path, "config.json")) as fh:
            raw = json.load(fh)
        cfg = Config(**{f.name: raw[f.name] for f in fields(Config) if f.name in raw}).validate()
        tensors = load_file(os.path.join(path, "model.safetensors"))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"cannot read checkpoint {path}: {e}") from None
    prefix = "ema." if ema else "raw."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    model = MoFo(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {path} does not match its config.json "
                        f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    device = pick_device(device) if isinstance(device, str) else device
    return model.to(device).eval(), load_tokenizer(os.path.join(path, "tokenizer.json"))


def config_to_json(cfg: Config) -> str:
    return json.dumps(asdict(cfg), indent=2)
