"""Model, loss and sampler wiring and math (mofo.py), CPU."""
import math

import pytest
import torch

import kernels
import mofo


def tiny(**kw) -> mofo.MoFo:
    torch.manual_seed(0)
    return mofo.MoFo(mofo.get_config("tiny", **kw))


def randomize(model: mofo.MoFo, std: float = 0.05) -> mofo.MoFo:
    """Perturb every parameter: at init the zero-init heads hide most of the wiring."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model


def batch(B=3, res=32, L=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(B, 3, res, res, generator=g) * 2 - 1
    text = torch.randint(1, 500, (B, L), generator=g)
    depth = torch.rand(B, res, res, generator=g) * 4 + 0.5
    valid = torch.rand(B, res, res, generator=g) < 0.3
    return rgb, text, mofo.normalize_depth(depth, valid), valid


# ----------------------------------------------------------------------------- shapes


def test_presets_sizes():
    """Parameter counts of the presets are in the ranges the README promises."""
    want = {"tiny": (0.3e6, 2e6), "small": (20e6, 40e6), "base": (330e6, 420e6),
            "large": (750e6, 900e6), "xl": (3.0e9, 3.6e9)}
    for name, (lo, hi) in want.items():
        with torch.device("meta"):
            n = mofo.MoFo(mofo.get_config(name)).num_params()
        assert lo <= n <= hi, (name, n)


@pytest.mark.parametrize("res", [32, 24])
def test_stream_shapes(res):
    m = randomize(tiny())
    rgb, text, z, _ = batch(res=res)
    t = torch.rand(3)
    r, d = m(rgb, t, text, z, t)
    assert r.shape == rgb.shape and d.shape == z.shape
    assert r.dtype == torch.float32 and d.dtype == torch.float32
    # token streams: text L, RGB and depth (res/p)^2 each, on one grid
    ids = mofo.position_ids(text.shape[1], res // 4, res // 4, True, "cpu")
    assert ids.shape == (text.shape[1] + 2 * (res // 4) ** 2, 4)
    n = (res // 4) ** 2
    assert torch.equal(ids[-n:, 1:], ids[-2 * n:-n, 1:]) and (ids[-n:, 0] == 1).all()
    assert mofo.patchify(rgb, 4).shape == (3, n, 48)
    assert torch.equal(mofo.unpatchify(mofo.patchify(rgb, 4), 4, 3, res, res), rgb)


def test_t2i_model_has_no_depth():
    m = randomize(tiny(has_depth=False))
    rgb, text, _, _ = batch()
    r, d = m(rgb, torch.rand(3), text)
    assert r.shape == rgb.shape and d is None
    assert not any("depth" in k for k in m.state_dict())


def test_bad_image_size():
    m = tiny()
    with pytest.raises(ValueError, match="multiple of the patch"):
        m(torch.zeros(1, 3, 30, 30), torch.zeros(1), torch.zeros(1, 24, dtype=torch.long),
          torch.zeros(1, 30, 30), torch.zeros(1))


def test_depth_head_fp32_under_bf16():
    m = randomize(tiny()).to(torch.bfloat16)
    rgb, text, z, _ = batch()
    _, d = m(rgb, torch.rand(3), text, z, torch.rand(3))
    assert d.dtype == torch.float32


# ----------------------------------------------------------------------------- init


def test_zero_init_gates_and_heads():
    """adaLN-Zero: every modulation head, output head and cross-stream gate starts at 0, so the
    untrained model predicts x0 = 0 whatever the input."""
    m = tiny()
    mods = [mm for mm in m.modules() if isinstance(mm, mofo.Modulation)]
    assert len(mods) == 3 + 2 + 1 + 2  # triple (txt,img,depth), single (img,depth), decoder, 2 finals
    assert all((mm.lin.weight == 0).all() for mm in mods)
    assert (m.final_layer.out.weight == 0).all() and (m.depth_final_layer.out.weight == 0).all()
    assert m.alpha_img.item() == 0 and m.alpha_depth.item() == 0
    rgb, text, z, _ = batch()
    r, d = m(rgb, torch.rand(3), text, z, torch.rand(3))
    assert (r == 0).all() and (d == 0).all()


def test_add_depth_stream_clones_image_stream():
    t2i = randomize(tiny(has_depth=False))
    mf = mofo.add_depth_stream(t2i)
    sd_t2i, sd = t2i.state_dict(), mf.state_dict()
    for k, v in sd_t2i.items():
        assert torch.equal(sd[k], v), k
    for blk in mf.triple_blocks:
        for k, v in blk.streams["img"].state_dict().items():
            assert torch.equal(blk.streams["depth"].state_dict()[k], v)
    assert torch.equal(mf.triple_mod["depth"].lin.weight, mf.triple_mod["img"].lin.weight)
    # the new gates are 0, so RGB prediction is unchanged by the depth stream's mixing
    assert mf.alpha_img.item() == 0
    with pytest.raises(ValueError):
        mofo.add_depth_stream(mf)


# ----------------------------------------------------------------------------- depth normalisation


def test_normalize_roundtrip_and_invalid():
    g = torch.Generator().manual_seed(0)
    depth = torch.rand(2, 16, 16, generator=g) * 20 + 0.1
    valid = torch.rand(2, 16, 16, generator=g) < 0.7
    depth[0, 0, 0] = float("nan")
    z = mofo.normalize_depth(depth, valid)
    ok = valid & torch.isfinite(depth)
    assert (z[~ok] == 0).all() and (z[ok] >= 0).all() and (z[ok] < 2).all()
    back = mofo.denormalize_depth(z)
    # unit mean over valid pixels, recovered exactly (up to the clamp) by the inverse
    rel = torch.stack([depth[b][ok[b]] / depth[b][ok[b]].mean() for b in range(2)])
    assert torch.allclose(torch.stack([back[b][ok[b]] for b in range(2)]), rel, rtol=1e-5)
    assert math.isclose(float(torch.where(z <= 1, z, torch.zeros_like(z)).max()), 1.0, abs_tol=0.3)


def test_contraction_values_and_clamp():
    # mean 2 -> [.5, .5, .5, 2.5]; contraction keeps <= 1 and maps 2.5 to 2 - 1/2.5 = 1.6
    z = mofo.normalize_depth(torch.tensor([[1.0, 1.0, 1.0, 5.0]]))
    assert torch.allclose(z, torch.tensor([[0.5, 0.5, 0.5, 1.6]]))
    assert torch.allclose(mofo.denormalize_depth(z), torch.tensor([[0.5, 0.5, 0.5, 2.5]]))
    wild = torch.tensor([[-5.0, 0.0, 1.999, 2.0, 7.0, float("inf")]])
    out = mofo.denormalize_depth(wild.nan_to_num(posinf=9.0))
    assert torch.isfinite(out).all() and (out > 0).all()
    assert mofo.normalize_depth(torch.zeros(4, 4)).abs().sum() == 0  # no valid pixel at all


# ----------------------------------------------------------------------------- schedules


def test_rollout_table():
    """The schedule at N = 50, mu = 1.1, log2 alpha = 5 (values of RECIPE 4.2, checked by hand)."""
    t_rgb, t_dep = mofo.rollout_timesteps(50, "joint", 1.1, 5)
    table = {0: (1, 1), 1: (.9933, .9998), 25: (.7503, .9897), 45: (.2503, .9144),
             48: (.1112, .8002), 49: (.0578, .6624), 50: (0, 0)}
    for i, (r, d) in table.items():
        assert round(float(t_rgb[i]), 4) == r and round(float(t_dep[i]), 4) == d, i
    assert t_rgb.shape == t_dep.shape == (51,)
    r, d = mofo.rollout_timesteps(10, "i2d")
    assert (r == 0).all() and d[0] == 1 and d[-1] == 0 and (d[1:] <= d[:-1]).all()
    r, d = mofo.rollout_timesteps(10, "d2i")
    assert (d == 0).all() and r[0] == 1
    r, d = mofo.rollout_timesteps(10, "joint")
    assert torch.equal(r, d)
    with pytest.raises(ValueError):
        mofo.rollout_timesteps(10, "both")


def test_timestep_samplers():
    g = torch.Generator().manual_seed(0)
    t = mofo.sample_t_logit_normal(200_000, 1.1, g)
    assert abs(float(torch.logit(t).mean()) - 1.1) < 0.02
    tp = mofo.sample_t_plateau(200_000, 1.1, g)
    t_m = 1 / (1 + math.exp(-1.1))
    assert (tp > 0).all() and (tp <= 1).all()
    # beyond the mode the density is flat: equal mass in equal-width bins
    hi = tp[tp > t_m]
    counts = torch.histc(hi, bins=4, min=t_m, max=1.0)
    assert (counts / counts.mean() - 1).abs().max() < 0.05
    assert abs(float((tp > t_m).float().mean()) - 0.5317 / 1.0317) < 0.01


# ----------------------------------------------------------------------------- loss


def test_masked_loss_ignores_invalid_ground_truth():
    """Changing the depth target at invalid pixels does not change the loss (nor its grads)."""
    m = randomize(tiny())
    rgb, text, z, valid = batch()
    losses = []
    for trial in range(2):
        z2 = torch.where(valid, z, torch.full_like(z, 1.7 * trial - 0.3))
        loss, stats = mofo.flow_loss(m, rgb, text, z2, valid, generator=torch.Generator().manual_seed(5))
        losses.append((loss.item(), stats["loss_depth"]))
    assert losses[0] == losses[1]
    # ... while changing it at a valid pixel does
    z3 = z.clone()
    z3[valid] += 0.5
    loss3, _ = mofo.flow_loss(m, rgb, text, z3, valid, generator=torch.Generator().manual_seed(5))
    assert loss3.item() != losses[0][0]


def test_loss_modes_and_noise_at_invalid(monkeypatch):
    """i2d feeds clean RGB and d2i clean depth; invalid depth pixels are pure noise at any t."""
    m = randomize(tiny())
    rgb, text, z, valid = batch(B=64)
    seen = {}

    def spy(x_rgb, t_rgb, text, x_dep, t_dep):
        seen.update(x_rgb=x_rgb, t_rgb=t_rgb, x_dep=x_dep, t_dep=t_dep)
        return m.__class__.forward(m, x_rgb, t_rgb, text, x_dep, t_dep)

    monkeypatch.setattr(m, "forward", spy)
    _, stats = mofo.flow_loss(m, rgb, text, z, valid, generator=torch.Generator().manual_seed(0))
    i2d, d2i = seen["t_rgb"] == 0, seen["t_dep"] == 0
    assert i2d.any() and d2i.any() and not (i2d & d2i).any()
    assert torch.equal(seen["x_rgb"][i2d], rgb[i2d])
    assert torch.equal(seen["x_dep"][d2i][valid[d2i]], z[d2i][valid[d2i]])
    # invalid pixels of clean-depth samples still carry noise, not the (zero) target
    assert seen["x_dep"][d2i][~valid[d2i]].abs().mean() > 0.5
    assert abs(stats["frac_i2d"] - 0.2) < 0.15 and abs(stats["frac_d2i"] - 0.2) < 0.15


def test_no_valid_depth_means_unknown_depth(monkeypatch):
    m = randomize(tiny())
    rgb, text, z, _ = batch(B=8)
    valid = torch.zeros_like(z, dtype=torch.bool)
    seen = {}
    monkeypatch.setattr(m, "forward", lambda *a: (seen.setdefault("t_dep", a[4]),
                                                  m.__class__.forward(m, *a))[1])
    _, stats = mofo.flow_loss(m, rgb, text, torch.zeros_like(z), valid, generator=torch.Generator().manual_seed(0))
    assert (seen["t_dep"] == 1).all() and stats["loss_depth"] == 0


def test_one_batch_overfit():
    """200 AdamW steps on one fixed batch (fixed noise too) cut the loss by at least 5x."""
    m = randomize(tiny(), std=0.0)
    rgb, text, z, valid = batch(B=4)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    first = None
    for _ in range(200):
        loss, _ = mofo.flow_loss(m, rgb, text, z, valid, generator=torch.Generator().manual_seed(0))
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 5, (first, loss.item())


def test_distillation_term():
    m, teacher = randomize(tiny()), randomize(tiny(has_depth=False), std=0.1)
    rgb, text, z, valid = batch()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    base, s0 = mofo.flow_loss(m, rgb, text, z, valid, generator=g())
    full, s1 = mofo.flow_loss(m, rgb, text, z, valid, generator=g(), teacher=teacher)
    assert s1["loss_distill"] > 0 and math.isclose(full.item(), base.item() + s1["loss_distill"], rel_tol=1e-5)


# ----------------------------------------------------------------------------- sampler


def test_sampler_modes_freeze_the_condition():
    m = randomize(tiny())
    rgb, text, z, valid = batch(B=2)
    r, d = mofo.sample(m, text, mode="i2d", rgb=rgb, steps=3)
    assert torch.equal(r, rgb) and d.shape == z.shape and torch.isfinite(d).all()
    r, d = mofo.sample(m, text, mode="d2i", depth=z, depth_valid=valid, steps=3, cfg_scale=2.0)
    assert torch.equal(d[valid], z[valid]) and r.shape == rgb.shape
    r, d = mofo.sample(m, text, mode="joint", steps=3, cfg_scale=4.0, log2_alpha=5)
    assert r.shape == rgb.shape and d.shape == z.shape
    r2, _ = mofo.sample(m, text, mode="joint", steps=3, cfg_scale=4.0, log2_alpha=5)
    assert torch.equal(r, r2)  # seeded
    with pytest.raises(ValueError, match="i2d needs"):
        mofo.sample(m, text, mode="i2d", steps=2)


def test_sampler_last_step_lands_on_prediction():
    """With one step from t = 1 the Euler update returns exactly the x0 prediction."""
    m = randomize(tiny())
    rgb, text, _, _ = batch(B=1)
    _, d = mofo.sample(m, text, mode="i2d", rgb=rgb, steps=1)
    g = torch.Generator().manual_seed(0)
    torch.randn(1, 3, 32, 32, generator=g)
    noise = torch.randn(1, 32, 32, generator=g)
    _, d_hat = m(rgb, torch.zeros(1), text, noise, torch.ones(1))
    assert torch.allclose(d, d_hat, atol=1e-5)


def test_kernel_path_matches_reference_end_to_end():
    """The Triton path (interpreter on CPU) and the PyTorch path agree on the whole model."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    m = randomize(tiny())
    rgb, text, z, valid = batch(B=1, res=16, L=8)
    outs, grads = [], []
    try:
        for mode in ("torch", "triton"):
            kernels.set_backend(mode)
            m.zero_grad()
            r, d = m(rgb, torch.full((1,), 0.7), text, z, torch.full((1,), 0.4))
            (r.square().mean() + d.square().mean()).backward()
            outs.append(torch.cat([r.flatten(), d.flatten()]))
            grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    finally:
        kernels.set_backend("auto")
    assert torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    assert (grads[0] - grads[1]).norm() / grads[0].norm() < 1e-4


def test_whole_model_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) captures forward + backward with the kernel path on, so
    `train.py --compile` gets one graph (the kernels are opaque custom ops inside it)."""
    import os
    import torch._dynamo
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    m = randomize(tiny())
    rgb, text, z, valid = batch(B=1, res=16, L=8)
    results = []
    try:
        kernels.set_backend("triton")
        torch._dynamo.reset()
        for net in (m, torch.compile(m, backend="aot_eager", fullgraph=True)):
            m.zero_grad()
            r, d = net(rgb, torch.full((1,), 0.7), text, z, torch.full((1,), 0.4))
            (r.square().mean() + d.square().mean()).backward()
            results.append((torch.cat([r.flatten(), d.flatten()]),
                            torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])))
    finally:
        kernels.set_backend("auto")
    (o_eager, g_eager), (o_comp, g_comp) = results
    assert torch.allclose(o_eager, o_comp, rtol=1e-5, atol=1e-6)
    assert (g_eager - g_comp).norm() / g_eager.norm() < 1e-5


def test_forced_triton_path_refuses_to_fall_back(monkeypatch):
    """Without CUDA or the interpreter, kernels.* would quietly run the reference: "triton" must
    say so instead of comparing the reference with itself."""
    monkeypatch.setattr(kernels, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.set_backend("triton", torch.device("cpu"))
    m = tiny()
    rgb, text, z, valid = batch(B=1, res=16, L=8)
    try:
        kernels.set_backend("triton")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            m(rgb, torch.full((1,), 0.7), text, z, torch.full((1,), 0.4))
    finally:
        kernels.set_backend("auto")


def test_config_head_dim_must_suit_the_attention_kernel():
    with pytest.raises(ValueError, match="head_dim"):
        mofo.get_config("small", heads=8)  # 384 / 8 = 48: not a kernel head dim
    with pytest.raises(ValueError, match="head_dim"):
        mofo.get_config("tiny", heads=5)  # 96 / 5 is not an integer
    for name in mofo.PRESETS:
        assert mofo.get_config(name).head_dim in (16, 32, 64, 128)
