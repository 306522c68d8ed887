"""
Modality Forcing (Duisterhof et al., arXiv 2606.13676), minimal from-scratch reference.

One diffusion transformer with three token streams -- text, RGB, depth -- trained with flow
matching where every modality has its *own* noise level. Choosing the levels picks the task:

    joint : text            -> RGB + depth   (both streams start from noise)
    i2d   : clean RGB       -> depth         (t_rgb = 0 throughout)
    d2i   : clean depth     -> RGB           (t_depth = 0 throughout)

RGB and depth are diffused in *pixel space*, as p x p patches on one shared token grid. Both
heads predict the clean sample (x-prediction) with a velocity-space loss; depth is predicted per
pixel, so its loss is masked per pixel and sparse depth (LiDAR) trains the model: missing pixels
are fed as pure noise and left out of the loss.

Time convention (used everywhere in this repository):
    x_t = (1 - t) * x0 + t * eps,   t = 0 is data, t = 1 is pure noise,
    velocity u = eps - x0, and sampling integrates from t = 1 down to t = 0.

Sections: config | layers | blocks | model | depth | loss | sampler. RECIPE.md states every formula
and marks the choices the paper leaves open; comments cite its sections as (RECIPE n).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import SUPPORTED_HEAD_DIMS, attention, qk_norm_rope

# -----------------------------------------------------------------------------
# Config and presets


@dataclass(frozen=True)
class Config:
    """Architecture of one MoFo model; saved as config.json beside the weights."""

    name: str = "tiny"
    res: int = 32  # default (square) image size in pixels; any multiple of `patch` works
    patch: int = 4  # pixel patch size p: RGB token = p*p*3 values, depth token = p*p values
    width: int = 128  # hidden size H
    heads: int = 4  # head_dim = width / heads: 16, 32, 64 or 128
    n_triple: int = 1  # triple-stream blocks (own weights per stream, joint attention)
    n_single: int = 1  # shared single-stream blocks over [txt, img, depth]
    n_decoder: int = 1  # depth-only single-stream blocks before the depth head
    mlp_ratio: float = 3.0  # SwiGLU hidden M = mlp_ratio * H
    vocab_size: int = 512  # BPE vocabulary; id 0 is <pad> and "" encodes to all pad
    text_len: int = 32  # text tokens per caption (padded, no mask)
    rope_theta: float = 2000.0
    has_depth: bool = True  # False = the text-to-image pre-training model (no depth stream)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    def validate(self) -> "Config":
        # Head dims the attention kernel takes; all are multiples of 8 (4 RoPE axes of pairs).
        if self.width % self.heads or self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"width {self.width} / heads {self.heads} must give a head_dim in "
                             f"{SUPPORTED_HEAD_DIMS}, not {self.width / self.heads:g}")
        if self.res % self.patch:
            raise ValueError(f"res {self.res} must be a multiple of patch {self.patch}")
        return self


# The paper's scaling family uses 30 flat layers (370M / 800M / 3.3B at widths 1024 / 1536 / 3072).
# A triple-stream block carries three streams' weights, so we reach the same sizes with
# 4 triple + 10 single + 2 depth-decoder blocks. `tiny` and `small` are for CPU tests and demos;
# `tiny` has three shared blocks: with one, about half the CPU demo's seeds never learn a head in
# which the depth queries read the image; each further block gives them another chance and the
# demo's depth improves on average (results/demo.md, "Two shared blocks", "Three shared blocks").
PRESETS: dict[str, Config] = {
    "tiny": Config("tiny", res=32, patch=4, width=96, heads=3, n_triple=1, n_single=3, n_decoder=1,
                   vocab_size=512, text_len=24),
    "small": Config("small", res=64, patch=8, width=384, heads=6, n_triple=2, n_single=4, n_decoder=1,
                    vocab_size=1024, text_len=32),
    "base": Config("base", res=256, patch=16, width=1024, heads=16, n_triple=4, n_single=10, n_decoder=2,
                   vocab_size=8192, text_len=64),
    "large": Config("large", res=256, patch=16, width=1536, heads=24, n_triple=4, n_single=10, n_decoder=2,
                    vocab_size=8192, text_len=64),
    "xl": Config("xl", res=256, patch=16, width=3072, heads=24, n_triple=4, n_single=10, n_decoder=2,
                 vocab_size=8192, text_len=64),
}


def get_config(name: str, **overrides) -> Config:
    """A preset by name, with field overrides (e.g. res=64, has_depth=False)."""
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides).validate()


def keeps_fp32(param_name: str) -> bool:
    """Weights that stay fp32 when the model is cast to bf16: the depth head, whose x-prediction
    bands visibly in bf16 (RECIPE 1.6)."""
    return param_name.startswith("depth_final_layer.")


# -----------------------------------------------------------------------------
# Layers


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 1e4) -> torch.Tensor:
    """Sinusoidal embedding of 1000*t, cos first then sin (RECIPE 1.2). t: (B,) -> (B, dim) fp32."""
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
    Zero-initialised (adaLN-Zero), so every gate starts at 0 and every block starts as identity."""

    def __init__(self, width: int, k: int):
        super().__init__()
        self.k = k
        self.lin = nn.Linear(width, k * width, bias=False)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.k, dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(1 + scale) * LayerNorm(x) + shift, no affine weights, eps 1e-6; computed in fp32 and
    returned in x's dtype, so a bf16 residual stream stays bf16 (autocast would give fp32)."""
    return ((1 + scale) * F.layer_norm(x.float(), x.shape[-1:], eps=1e-6) + shift).to(x.dtype)


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
    """cos, sin of the 4-axis RoPE angles (RECIPE 1.4). ids: (S, 4) -> two (S, head_dim/2) fp32:
    each axis gets head_dim/4 channels, i.e. head_dim/8 pairs rotated at frequencies theta^(-2k/d)."""
    d = head_dim // 4
    omega = theta ** (-torch.arange(0, d, 2, device=ids.device, dtype=torch.float32) / d)  # (d/2,)
    angles = torch.cat([ids[:, a:a + 1].float() * omega[None] for a in range(4)], dim=-1)
    return angles.cos(), angles.sin()


def qkv_heads(qkv: torch.Tensor, heads: int, q_scale: torch.Tensor, k_scale: torch.Tensor,
              rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, S, 3H) -> q, k, v each (B, heads, S, D): q and k RMS-normalised over D in fp32
    (QK-norm) and rotated by RoPE, in one fused kernel on the GPU."""
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
    return qk_norm_rope(q, q_scale, *rope), qk_norm_rope(k, k_scale, *rope), v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention over the whole sequence, no mask; (B, heads, S, D) -> (B, S, heads*D)."""
    return attention(q, k, v).transpose(1, 2).flatten(2)


# -----------------------------------------------------------------------------
# Blocks

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (S, head_dim/2) fp32


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
    Without depth this is FLUX's double-stream block (txt, img); add_depth_stream() adds the third
    stream by cloning the img weights (RECIPE 3.4)."""

    def __init__(self, cfg: Config, streams: tuple[str, ...]):
        super().__init__()
        self.heads = cfg.heads
        self.streams = nn.ModuleDict({s: StreamLayer(cfg) for s in streams})

    def forward(self, xs: dict[str, torch.Tensor], mods: dict[str, tuple[torch.Tensor, ...]],
                rope: dict[str, Rope]) -> dict[str, torch.Tensor]:
        """xs[s]: (B, N_s, H) per stream, in the order [txt, img, depth] of the sequence."""
        qs, ks, vs = [], [], []
        for s, layer in self.streams.items():
            shift, scale = mods[s][:2]
            q, k, v = qkv_heads(layer.qkv(modulate(xs[s], shift, scale)), self.heads,
                                layer.q_scale, layer.k_scale, rope[s])
            qs.append(q), ks.append(k), vs.append(v)
        out = attend(torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2))
        out = out.split([xs[s].shape[1] for s in self.streams], dim=1)
        new = {}
        for (s, layer), o in zip(self.streams.items(), out):
            _, _, gate1, shift2, scale2, gate2 = mods[s]
            x = xs[s] + gate1 * layer.proj(o)
            new[s] = x + gate2 * layer.mlp(modulate(x, shift2, scale2))
        return new


class SingleStreamBlock(nn.Module):
    """Parallel attention + SwiGLU over one sequence, with per-token modulation (RECIPE 1.3)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.heads, self.width, self.hidden = cfg.heads, cfg.width, cfg.mlp_hidden
        self.lin1 = nn.Linear(cfg.width, 3 * cfg.width + 2 * cfg.mlp_hidden, bias=False)
        self.lin2 = nn.Linear(cfg.width + cfg.mlp_hidden, cfg.width, bias=False)
        self.q_scale = nn.Parameter(torch.ones(cfg.head_dim))
        self.k_scale = nn.Parameter(torch.ones(cfg.head_dim))

    def forward(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...], rope: Rope) -> torch.Tensor:
        """x: (B, S, H); mod: (shift, scale, gate), each (B, S or 1, H)."""
        shift, scale, gate = mod
        qkv, mlp_in = self.lin1(modulate(x, shift, scale)).split([3 * self.width, 2 * self.hidden], -1)
        attn = attend(*qkv_heads(qkv, self.heads, self.q_scale, self.k_scale, rope))
        a, b = mlp_in.chunk(2, dim=-1)
        return x + gate * self.lin2(torch.cat([attn, F.silu(a) * b], dim=-1))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then Linear(H -> p*p*C): tokens back to pixel patches."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.mod = Modulation(width, 2)
        self.out = nn.Linear(width, out_dim, bias=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, fp32: bool = False) -> torch.Tensor:
        """x: (B, N, H), vec: (B, H) -> (B, N, out_dim). fp32=True computes in fp32 whatever the
        weights' and inputs' dtype (the depth head, RECIPE 1.6)."""
        if not fp32:
            shift, scale = self.mod(vec)
            return self.out(modulate(x, shift, scale))
        with torch.autocast(device_type=x.device.type, enabled=False):
            shift, scale = F.linear(F.silu(vec.float()), self.mod.lin.weight.float())[:, None].chunk(2, dim=-1)
            return F.linear(modulate(x.float(), shift, scale), self.out.weight.float())


# -----------------------------------------------------------------------------
# Model


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p), token channels ordered (c, pi, pj) (RECIPE 2.1)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x: torch.Tensor, p: int, C: int, H: int, W: int) -> torch.Tensor:
    """Inverse of patchify: (B, N, C*p*p) -> (B, C, H, W)."""
    B = x.shape[0]
    x = x.reshape(B, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C, H, W)


def position_ids(text_len: int, gh: int, gw: int, with_depth: bool, device) -> torch.Tensor:
    """4-D RoPE ids (modality, row, col, text position) for [txt, img, (depth)] -> (S, 4) fp32.
    Depth tokens sit on the RGB grid and differ only in the first axis (RECIPE 1.4)."""
    txt = F.pad(torch.arange(text_len, device=device)[:, None], (3, 0))
    r, c = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    img = F.pad(torch.stack([r, c], -1).reshape(-1, 2), (1, 1))
    dep = F.pad(img[:, 1:], (1, 0), value=1)
    return torch.cat([txt, img, dep] if with_depth else [txt, img]).float()


class MoFo(nn.Module):
    """The three-stream diffusion transformer (RECIPE 1.1): forward(rgb_t, t_rgb, text, depth_t,
    t_depth) predicts the clean image and the clean normalised depth, each modality at its own t."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg.validate()
        H, p = cfg.width, cfg.patch
        self.txt_in = nn.Embedding(cfg.vocab_size, H)
        self.img_in = nn.Linear(3 * p * p, H, bias=False)
        self.time_in = MLPEmbedder(256, H)
        streams = ("txt", "img", "depth") if cfg.has_depth else ("txt", "img")
        self.triple_mod = nn.ModuleDict({s: Modulation(H, 6) for s in streams})
        self.triple_blocks = nn.ModuleList(TripleStreamBlock(cfg, streams) for _ in range(cfg.n_triple))
        self.single_mod = nn.ModuleDict({s: Modulation(H, 3) for s in streams if s != "txt"})
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.n_single))
        self.final_layer = FinalLayer(H, 3 * p * p)
        if cfg.has_depth:
            self.depth_in = nn.Linear(p * p, H, bias=False)
            self.time_in_depth = MLPEmbedder(256, H)
            # Cross-stream timestep mixing: each stream's vector also sees the other's t, through
            # a gate that starts at exactly 0 so the t2i behaviour is untouched at init.
            self.mix_depth_to_img = MLPEmbedder(256, H)
            self.mix_img_to_depth = MLPEmbedder(256, H)
            self.alpha_img = nn.Parameter(torch.zeros(1))
            self.alpha_depth = nn.Parameter(torch.zeros(1))
            self.decoder_mod = Modulation(H, 3)
            self.decoder_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.n_decoder))
            self.depth_final_layer = FinalLayer(H, p * p)
        self._rope_cache: dict[tuple, dict[str, Rope]] = {}
        if not any(w.is_meta for w in self.parameters()):
            self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears, N(0, 0.02) embeddings and timestep MLPs, and adaLN-Zero: modulation
        heads and output projections at zero, so the untrained network is the identity on every
        residual stream and predicts x0 = 0."""
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

    def rope(self, n_txt: int, gh: int, gw: int, device: torch.device) -> dict[str, Rope]:
        """RoPE tables per stream and for the whole sequence ("all"), computed once per layout."""
        key = (n_txt, gh, gw, str(device))
        if key not in self._rope_cache:
            cfg, n_img = self.cfg, gh * gw
            ids = position_ids(n_txt, gh, gw, cfg.has_depth, device)
            cos, sin = rope_angles(ids, cfg.head_dim, cfg.rope_theta)
            spans = {"txt": (0, n_txt), "img": (n_txt, n_txt + n_img), "depth": (n_txt + n_img, len(ids))}
            tables = {s: (cos[a:b], sin[a:b]) for s, (a, b) in spans.items()}
            self._rope_cache[key] = {"all": (cos, sin), **tables}
        return self._rope_cache[key]

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
        dev = rgb.device.type  # the body runs in autocast's dtype when it is on, else the weights'
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.img_in.weight.dtype
        n_txt, n_img = text.shape[1], (Hpx // p) * (Wpx // p)
        rope = self.rope(n_txt, Hpx // p, Wpx // p, rgb.device)

        e_rgb = timestep_embedding(t_rgb).to(dtype)
        vec = {"img": self.time_in(e_rgb)}
        xs = {"txt": self.txt_in(text).to(dtype), "img": self.img_in(patchify(rgb.to(dtype), p))}
        if cfg.has_depth:
            e_dep = timestep_embedding(t_depth).to(dtype)
            vec["depth"] = self.time_in_depth(e_dep) + self.alpha_depth * self.mix_img_to_depth(e_rgb)
            vec["img"] = vec["img"] + self.alpha_img * self.mix_depth_to_img(e_dep)
            xs["depth"] = self.depth_in(patchify(depth[:, None].to(dtype), p))
        vec["txt"] = vec["img"]  # the text stream has no timestep of its own (RECIPE 1.2)

        # Stage A: triple-stream blocks; modulation is computed once and shared by all blocks.
        mods = {s: self.triple_mod[s](vec[s]) for s in xs}
        for blk in self.triple_blocks:
            xs = blk(xs, mods, rope)

        # Stage B: one sequence; txt+img tokens take the RGB modulation, depth tokens the depth one.
        x = torch.cat(list(xs.values()), dim=1)
        mod = self.single_mod["img"](vec["img"])
        if cfg.has_depth:
            mod_dep = self.single_mod["depth"](vec["depth"])
            mod = tuple(torch.cat([a.expand(-1, n_txt + n_img, -1), b.expand(-1, n_img, -1)], 1)
                        for a, b in zip(mod, mod_dep))
        for blk in self.single_blocks:
            x = blk(x, mod, rope["all"])

        rgb_tok = x[:, n_txt:n_txt + n_img]
        rgb_out = unpatchify(self.final_layer(rgb_tok, vec["img"]).float(), p, 3, Hpx, Wpx)
        if not cfg.has_depth:
            return rgb_out, None

        # Stage C: depth-only decoder blocks (no text, no RGB), then the fp32 depth head:
        # x-prediction of depth in bf16 bands visibly (RECIPE 1.6).
        d = x[:, n_txt + n_img:]
        mod_dec = self.decoder_mod(vec["depth"])
        for blk in self.decoder_blocks:
            d = blk(d, mod_dec, rope["depth"])
        dep = self.depth_final_layer(d, vec["depth"], fp32=True)
        return rgb_out, unpatchify(dep, p, 1, Hpx, Wpx)[:, 0]


def add_depth_stream(t2i: MoFo) -> MoFo:
    """Turn a text-to-image model (has_depth=False) into a Modality Forcing model (RECIPE 3.4).

    All t2i weights are kept. In every triple-stream block the new depth stream is a copy of the
    image stream, and so are the depth modulation heads (an inferred choice: depth tokens start
    out processed the way image tokens are). Trained from scratch, as in the paper: the depth
    patch embedding, the depth timestep embedder, the depth decoder blocks, the depth head and
    the cross-stream mixers (gates at zero).
    """
    if t2i.cfg.has_depth:
        raise ValueError("model already has a depth stream")
    model = MoFo(replace(t2i.cfg, has_depth=True)).to(t2i.img_in.weight.device)
    model.load_state_dict(t2i.state_dict(), strict=False)
    for blk in model.triple_blocks:
        blk.streams["depth"].load_state_dict(blk.streams["img"].state_dict())
    model.triple_mod["depth"].load_state_dict(model.triple_mod["img"].state_dict())
    model.single_mod["depth"].load_state_dict(model.single_mod["img"].state_dict())
    return model


# -----------------------------------------------------------------------------
# Depth normalisation (RECIPE 2)

# Inverse contraction is 1/(2 - z) for z > 1, which blows up at z = 2; clamping keeps decoded depth
# finite (at most 1/eps times the mean) and > 0.
Z_MIN, Z_MAX = 1e-3, 2.0 - 1e-3


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
    z = z.float().clamp(Z_MIN, Z_MAX)
    return torch.where(z <= 1, z, 1 / (2 - z))


# -----------------------------------------------------------------------------
# Training loss: flow matching with one noise level per modality (RECIPE 3)

MODES = ("joint", "i2d", "d2i")
P_MODES = (0.6, 0.2, 0.2)  # training probability of joint, i2d, d2i per sample
SHIFT_MU = 1.1  # timestep shift: logit mean of the t samplers and shift of the sampling schedule
T_MIN = 0.05  # x-prediction -> velocity divides by t; clamped, in training and sampling alike


def sample_t_logit_normal(n: int, mu: float, g: torch.Generator, device=None) -> torch.Tensor:
    """t = sigmoid(N(mu, 1)): logit-normal, with the timestep shift mu added to the logit."""
    return torch.sigmoid(mu + torch.randn(n, generator=g, device=device))


def sample_t_plateau(n: int, mu: float, g: torch.Generator, device=None) -> torch.Tensor:
    """Plateau logit-normal (RECIPE 3.2): the logit-normal density up to its mode t_m = sigmoid(mu),
    then flat at that height up to t = 1. Puts much mass at high noise, which suits the default
    RGB-first sampling trajectory where depth stays noisy until late."""
    t_m = 1 / (1 + math.exp(-mu))
    mass_low = 0.5  # the logit-normal below its median sigmoid(mu) holds exactly half its mass
    mass_flat = 1 / (math.sqrt(2 * math.pi) * t_m)  # p(t_m) * (1 - t_m), p = logit-normal density
    low = torch.rand(n, generator=g, device=device) < mass_low / (mass_low + mass_flat)
    t_low = torch.sigmoid(mu - torch.randn(n, generator=g, device=device).abs())
    t_flat = t_m + (1 - t_m) * torch.rand(n, generator=g, device=device)
    return torch.where(low, t_low, t_flat)


def sample_noise_levels(has_gt: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_rgb, t_depth) per sample (RECIPE 3.2). has_gt: (B,) bool, the samples with any depth
    ground truth; the others are joint with t_depth = 1 ("depth entirely unknown").

    A mode is drawn per sample: joint (both t random), i2d (t_rgb = 0) or d2i (t_depth = 0).
    t_rgb is logit-normal, t_depth plateau logit-normal, both with shift SHIFT_MU.
    """
    n, dev = has_gt.shape[0], has_gt.device
    u = torch.rand(n, generator=g, device=dev)
    t_rgb = sample_t_logit_normal(n, SHIFT_MU, g, dev)
    t_dep = sample_t_plateau(n, SHIFT_MU, g, dev)
    i2d = (u >= P_MODES[0]) & (u < P_MODES[0] + P_MODES[1]) & has_gt
    d2i = (u >= P_MODES[0] + P_MODES[1]) & has_gt
    return t_rgb.masked_fill(i2d, 0.0), t_dep.masked_fill(d2i, 0.0).masked_fill(~has_gt, 1.0)


def _bc(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample t (B,) shaped to broadcast against x (B, ...)."""
    return t.view(-1, *([1] * (x.dim() - 1)))


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, with t per sample."""
    return (1 - _bc(t, x0)) * x0 + _bc(t, x0) * eps


def velocity(x_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x-prediction -> velocity u = (x_t - x0_hat) / t, t clamped at T_MIN."""
    return (x_t - x0_hat) / _bc(t.clamp(min=T_MIN), x_t)


def masked_mean(err: torch.Tensor, active: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of err (B, ...) over each sample's (valid) pixels, then over the active samples."""
    if pixels is None:
        per = err.flatten(1).mean(1)
    else:
        per = (err * pixels).flatten(1).sum(1) / pixels.flatten(1).sum(1).clamp(min=1)
    return (per * active).sum() / active.sum().clamp(min=1)


def flow_loss(model: nn.Module, rgb: torch.Tensor, text: torch.Tensor, depth: torch.Tensor | None = None,
              valid: torch.Tensor | None = None, *, generator: torch.Generator, caption_dropout: float = 0.1,
              teacher: nn.Module | None = None, distill_weights: tuple[float, float] = (1.0, 0.1),
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch of the Modality Forcing objective (RECIPE 3).

    rgb: (B, 3, H, W) clean image in [-1, 1]; text: (B, L) ids (an all-zero row is the "" caption);
    depth: (B, H, W) normalised depth z (normalize_depth) and valid: (B, H, W) bool, the supervised
    pixels -- both None for a text-to-image model. Every random number (noise levels, caption
    dropout, noise) comes from `generator`, which lives on rgb's device: no host round trip, and a
    run is reproducible from its step number alone.

    Missing depth pixels are pure noise in x_t at any t and are left out of the loss. A modality's
    loss is dropped where its own t = 0: x_t = x0 there, so it carries no signal, only variance.
    Both heads are x-prediction with the velocity loss ||u_hat - (eps - x0)||^2.
    Returns (loss, stats); stats are 0-d tensors for logging.
    """
    g, B = generator, rgb.shape[0]
    has_depth = valid.flatten(1).any(1) if depth is not None else torch.zeros(B, dtype=torch.bool, device=rgb.device)
    t_rgb, t_dep = sample_noise_levels(has_depth, g)
    drop = torch.rand(B, generator=g, device=rgb.device) < caption_dropout
    text = text.masked_fill(drop[:, None], 0)
    eps_rgb = torch.randn(rgb.shape, generator=g, device=rgb.device)
    x_rgb = interpolate(rgb, eps_rgb, t_rgb)
    if depth is None:
        rgb_hat, _ = model(x_rgb, t_rgb, text)
    else:
        eps_dep = torch.randn(depth.shape, generator=g, device=depth.device)
        x_dep = torch.where(valid, interpolate(depth, eps_dep, t_dep), eps_dep)
        rgb_hat, dep_hat = model(x_rgb, t_rgb, text, x_dep, t_dep)

    u_rgb = velocity(x_rgb, rgb_hat, t_rgb)
    loss = loss_rgb = masked_mean((u_rgb - (eps_rgb - rgb)).pow(2), (t_rgb > 0).float())
    stats = {"loss_rgb": loss_rgb.detach()}
    if depth is not None:
        err = (velocity(x_dep, dep_hat, t_dep) - (eps_dep - depth)).pow(2)
        loss_dep = masked_mean(err, ((t_dep > 0) & has_depth).float(), valid)
        loss = loss + loss_dep
        stats.update(loss_depth=loss_dep.detach(), frac_i2d=(t_rgb == 0).float().mean(),
                     frac_d2i=(t_dep == 0).float().mean())
    if teacher is not None:
        loss_dist = distill_loss(teacher, x_rgb, t_rgb, text, u_rgb, t_dep if depth is not None else None,
                                 distill_weights)
        loss = loss + loss_dist
        stats["loss_distill"] = loss_dist.detach()
    stats["loss"] = loss.detach()
    return loss, stats


def distill_loss(teacher: nn.Module, x_rgb: torch.Tensor, t_rgb: torch.Tensor, text: torch.Tensor,
                 u_rgb: torch.Tensor, t_dep: torch.Tensor | None, weights: tuple[float, float]) -> torch.Tensor:
    """Self-distillation of the RGB head (RECIPE 3.3): a frozen text-to-image model sees the same
    noisy RGB; (w_hi * t_depth + w_lo * (1 - t_depth)) * ||u_t2i - u_rgb||^2, strongest where depth
    is pure noise and tells the RGB head nothing."""
    with torch.no_grad():
        u_t2i = velocity(x_rgb, teacher(x_rgb, t_rgb, text)[0], t_rgb)
    w_hi, w_lo = weights
    lam = torch.full_like(t_rgb, w_hi) if t_dep is None else w_hi * t_dep + w_lo * (1 - t_dep)
    return masked_mean(_bc(lam, u_rgb) * (u_t2i - u_rgb).pow(2), (t_rgb > 0).float())


# -----------------------------------------------------------------------------
# Sampler: Euler over both streams with per-modality schedules (RECIPE 4)

# Per-mode defaults, measured on held-out scenes (results/sampling.md and RECIPE 4.3).
DEFAULT_STEPS = {"joint": 30, "i2d": 1, "d2i": 30}
DEFAULT_CFG = {"joint": 3.0, "i2d": 1.0, "d2i": 7.0}


def shift_schedule(u: torch.Tensor, mu: float) -> torch.Tensor:
    """t = e^mu / (e^mu + (1/u - 1)) (sigma = 1), i.e. s*u / (1 + (s-1)*u) with s = e^mu."""
    s = math.exp(mu)
    return s * u / (1 + (s - 1) * u)


def rollout_timesteps(num_steps: int, mode: str = "joint", shift_mu: float = SHIFT_MU,
                      log2_alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-modality time grids -> (t_rgb, t_depth), each (num_steps + 1,) float64 from 1 (noise) to
    0 (data); a frozen modality is 0 throughout. joint with log2_alpha: t_depth = a*t / (1 + (a-1)*t)
    of t = t_rgb, a = 2^log2_alpha, fixing 0 and 1: a > 1 denoises RGB first (RECIPE 4.2)."""
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


def _initial_state(model: MoFo, B: int, mode: str, rgb, depth, depth_valid, seed: int | list[int],
                   res: int | None):
    """The sampler's starting point: (x_rgb, x_depth, depth noise, known-depth mask, known depth)."""
    dev, has_depth = model.img_in.weight.device, model.cfg.has_depth
    if mode != "joint" and not has_depth:
        raise ValueError(f"mode {mode} needs a model with a depth stream")
    if (mode, rgb) == ("i2d", None) or (mode, depth) == ("d2i", None):
        raise ValueError("i2d needs an input image (rgb)" if mode == "i2d" else "d2i needs an input depth map")
    ref = rgb if rgb is not None else depth[:, None] if depth is not None else None
    Hpx, Wpx = (ref.shape[-2], ref.shape[-1]) if ref is not None else (res or model.cfg.res,) * 2
    seeds = [seed] if isinstance(seed, int) else list(seed)  # one for the batch, or one per item
    if len(seeds) not in (1, B):
        raise ValueError(f"{len(seeds)} seeds for a batch of {B}")
    gens, n = [torch.Generator(dev).manual_seed(s) for s in seeds], B // len(seeds)
    x_rgb = torch.cat([torch.randn(n, 3, Hpx, Wpx, generator=g, device=dev) for g in gens])
    eps_dep = torch.cat([torch.randn(n, Hpx, Wpx, generator=g, device=dev) for g in gens]) if has_depth else None
    x_rgb = x_rgb if rgb is None else rgb.to(dev, torch.float32)
    if depth is None:
        return x_rgb, eps_dep, eps_dep, None, None
    known = torch.ones_like(depth, dtype=torch.bool) if depth_valid is None else depth_valid.to(dev).bool()
    return x_rgb, eps_dep, eps_dep, known, depth.to(dev, torch.float32)


def guide(pred: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    """Classifier-free guidance on a (conditional, unconditional) pair of x-predictions."""
    if pred is None:
        return None
    cond, uncond = pred.chunk(2)
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def sample(model: MoFo, text_ids: torch.Tensor, *, mode: str = "joint", rgb: torch.Tensor | None = None,
           depth: torch.Tensor | None = None, depth_valid: torch.Tensor | None = None, steps: int = 50,
           cfg_scale: float = 1.0, log2_alpha: float | None = None, seed: int | list[int] = 0,
           res: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Generate with Euler steps over both streams (RECIPE 4).

    text_ids: (B, L). i2d needs rgb (B, 3, H, W) in [-1, 1], d2i depth (B, H, W) normalised.
    depth_valid marks the known depth pixels: in d2i the others are noise, as in training; in
    joint / i2d the known ones are re-imposed at every step's noise level and the model completes
    the rest (RECIPE 4.4). cfg_scale > 1 adds an unconditional pass on the "" caption. `seed`
    seeds the batch's noise, or each item's (a list: item i is then a batch of one with seed[i]).
    Runs in the model's dtype or the caller's autocast. Returns (rgb (B, 3, H, W), z (B, H, W) or None).
    """
    B = text_ids.shape[0]
    x_rgb, x_dep, eps_dep, known, depth = _initial_state(model, B, mode, rgb, depth, depth_valid, seed, res)
    t_rgb, t_dep = rollout_timesteps(steps, mode, SHIFT_MU, log2_alpha)
    guided, dev = cfg_scale != 1.0, x_rgb.device
    ids = (torch.cat([text_ids, torch.zeros_like(text_ids)]) if guided else text_ids).to(dev)
    pair = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)
    model.eval()
    for i in range(steps):
        tr, td = (torch.full((B,), float(t[i]), device=dev) for t in (t_rgb, t_dep))
        if known is not None:  # known depth at this step's noise level (clean in d2i)
            x_dep = torch.where(known, interpolate(depth, eps_dep, td), x_dep)
        streams = (pair(x_dep), pair(td)) if x_dep is not None else ()
        r_hat, d_hat = model(pair(x_rgb), pair(tr), ids, *streams)
        if guided:
            r_hat, d_hat = guide(r_hat, cfg_scale), guide(d_hat, cfg_scale)
        # A frozen modality (dt = 0) is skipped outright, so it stays bit-identical.
        if t_rgb[i + 1] != t_rgb[i]:
            x_rgb = x_rgb + float(t_rgb[i + 1] - t_rgb[i]) * velocity(x_rgb, r_hat, tr)
        if d_hat is not None and t_dep[i + 1] != t_dep[i]:
            x_dep = x_dep + float(t_dep[i + 1] - t_dep[i]) * velocity(x_dep, d_hat, td)
    if known is not None and mode != "d2i":
        x_dep = torch.where(known, depth, x_dep)
    return x_rgb, x_dep
