"""Tier 1: the training core on a tiny diffusers UNet.

- SuDe equals its closed form (the posterior means' differences worked out by hand, independently of the
  posterior-mean code path), per sample, with truncation, and is 0 at t = 0; it equals the reference code's
  formulas (float64 schedule buffers stored as float32) at every t in 1..999 to 1e-5;
- PALP's surrogate has the gradient of Eq. 6 (autograd through x0-hat), and the rescale multiplies it by
  sqrt(abar)/sqrt(1 - abar) per sample;
- LoRA switch / export keys; 20 steps lower the reconstruction loss; resume equals an uninterrupted run.
"""
import math

import pytest
import torch

from comfyui_personalize.training import export, losses
from comfyui_personalize.training.diffusers_host import DiffusersDenoiser, unet_lora
from comfyui_personalize.training.lora import select_targets
from comfyui_personalize.training.schedule import NoiseSchedule, scaled_linear_alphas_cumprod
from comfyui_personalize.training.trainer import TrainConfig, Trainer

CROSS = 16  # cross-attention width of the tiny UNet (the ``tiny_unet`` fixture, tests/tier1/conftest.py)


SCHEDULE = NoiseSchedule(scaled_linear_alphas_cumprod(), "eps")


class FakeText:
    """A frozen 'text encoder': a fixed random context per prompt; the token (if any) is added where the
    placeholder occurs (differentiable)."""

    def __init__(self, placeholder="sks"):
        self.placeholder, self.cache = placeholder, {}

    def __call__(self, prompts, token):
        out = []
        for p in prompts:
            if p not in self.cache:
                g = torch.Generator().manual_seed(sum(map(ord, p)) + 7 * len(p))
                self.cache[p] = torch.randn(1, 5, CROSS, generator=g)
            c = self.cache[p]
            if token is not None and self.placeholder in p:
                c = c + token.sum(0) * torch.linspace(0, 1, 5)[None, :, None]
            out.append(c)
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------
# SuDe


def sude_closed_form(eps_s, eps_c, eps_u, t, w_s):
    """w_s sqrt(abar_{t-1})(1 - abar_t) / (2 abar_t (1 - abar_{t-1})) [mse(s,c) - mse(s,u)],
    active iff mse(s,c) - mse(s,u) > -mse(c,u) (no variance epsilon)."""
    ac = scaled_linear_alphas_cumprod()
    out = []
    for i in range(eps_s.shape[0]):
        ti = int(t[i])
        if ti == 0:
            out.append(0.0)
            continue
        a, ap = float(ac[ti]), float(ac[ti - 1])
        msc = float(((eps_s[i] - eps_c[i]) ** 2).double().mean())
        msu = float(((eps_s[i] - eps_u[i]) ** 2).double().mean())
        mcu = float(((eps_c[i] - eps_u[i]) ** 2).double().mean())
        active = msc - msu > -mcu
        out.append(w_s * math.sqrt(ap) * (1 - a) / (2 * a * (1 - ap)) * (msc - msu) if active else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def test_sude_equals_closed_form_per_sample_with_truncation():
    g = torch.Generator().manual_seed(0)
    B = 8
    eps_c = torch.randn(B, 4, 8, 8, generator=g)
    eps_u = torch.randn(B, 4, 8, 8, generator=g)
    # half the samples near the class prediction (truncated away? no: active), half near uncond (inactive)
    near = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.bool)[:, None, None, None]
    eps_s = torch.where(near, eps_u + 0.3 * torch.randn(B, 4, 8, 8, generator=g),
                        eps_c + 0.3 * torch.randn(B, 4, 8, 8, generator=g))
    t = torch.tensor([1, 10, 250, 500, 999, 37, 0, 700])
    got = losses.sude_loss(eps_s, eps_c, eps_u, t, SCHEDULE, weight=0.4, variance_eps=0.0).double()
    ref = sude_closed_form(eps_s, eps_c, eps_u, t, 0.4)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-7), (got, ref)
    active = ref != 0
    assert 2 <= int(active.sum()) <= 6, "the test needs active and truncated samples"
    assert got[6] == 0  # t = 0: no term (deliberate fix of the reference's / 1e-6)
    # per sample: each sample's value does not depend on the others (the reference mixes the batch)
    single = torch.stack([losses.sude_loss(eps_s[i:i + 1], eps_c[i:i + 1], eps_u[i:i + 1], t[i:i + 1], SCHEDULE,
                                           weight=0.4, variance_eps=0.0)[0] for i in range(B)])
    assert torch.allclose(single, got.float(), rtol=1e-6, atol=0)
    # the reference's variance epsilon changes the value by < 0.3 % at t >= 1
    with_eps = losses.sude_loss(eps_s, eps_c, eps_u, t, SCHEDULE, weight=0.4)
    assert torch.allclose(with_eps.double(), ref, rtol=3e-3, atol=1e-7)


def reference_sude(x_t, eps_s, eps_c, eps_u, t, w_s, dtype=torch.float32):
    """The SuDe term as the reference code computes it (modelscope/facechain more_apps/Facechain-SuDe
    ``ldm/models/diffusion/ddpm.py``: ``register_schedule`` buffers computed in float64 numpy and stored as float32,
    posterior means from ``predict_start_from_noise``, ``prob_loss_func_class``, then ``p_losses``'
    ``prob_loss * prob_weight / posterior_mean_coef1[t] * sude_weight``), batch 1, re-stated here."""
    import numpy as np

    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    buf = {"sqrt_recip": np.sqrt(1.0 / ac), "sqrt_recipm1": np.sqrt(1.0 / ac - 1), "coef1": betas * np.sqrt(ac_prev) / (1 - ac),
           "coef2": (1 - ac_prev) * np.sqrt(alphas) / (1 - ac), "var": betas * (1 - ac_prev) / (1 - ac)}
    b = {k: torch.tensor(v, dtype=torch.float32)[t].to(dtype) for k, v in buf.items()}  # to_torch = float32

    def mean(eps):
        return b["coef1"] * (b["sqrt_recip"] * x_t - b["sqrt_recipm1"] * eps) + b["coef2"] * x_t

    mu_s, mu_c, mu_u = mean(eps_s), mean(eps_c), mean(eps_u)
    loss = (((mu_s - mu_c) ** 2).mean() - ((mu_s - mu_u) ** 2).mean()) / (2 * b["var"] + 1e-6)
    refer = ((mu_c - mu_c) ** 2 - (mu_c - mu_u) ** 2).mean() / (2 * b["var"] + 1e-6)
    return loss * float(loss - refer > 0) / b["coef1"] * w_s


def test_sude_equals_the_reference_code_at_every_t():
    """Each t in 1..999 to 1e-5 relative (the per-t schedule scalars are float64, cast once; computed in float32 from
    ``1/abar - 1`` the term was 2.5e-5 off at t = 1)."""
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for t in range(1, SCHEDULE.timesteps):
        x_t = torch.randn(1, 4, 8, 8, generator=g)
        eps_c, eps_u = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
        eps_s = eps_u + 0.3 * torch.randn(1, 4, 8, 8, generator=g)  # unlike its class: the term is active
        ref = reference_sude(x_t, eps_s, eps_c, eps_u, t, 0.4).double()
        ours = losses.sude_loss(eps_s, eps_c, eps_u, torch.tensor([t]), SCHEDULE, weight=0.4)[0].double()
        assert ref != 0
        worst = max(worst, float((ours - ref).abs() / ref.abs()))
    assert worst <= 1e-5, worst


def test_sude_gradient_only_through_subject_branch():
    g = torch.Generator().manual_seed(1)
    eps_c, eps_u = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    eps_s = (eps_u + 0.1 * torch.randn(2, 4, 4, 4, generator=g)).requires_grad_(True)
    c, u = eps_c.clone().requires_grad_(True), eps_u.clone().requires_grad_(True)
    loss = losses.sude_loss(eps_s, c, u, torch.tensor([100, 600]), SCHEDULE).sum()
    loss.backward()
    assert eps_s.grad.abs().sum() > 0 and c.grad is None and u.grad is None
    # a subject prediction near the unconditional one is unlike its class: penalized (positive), and truncated to 0
    # once it is as class-like as the class prediction itself
    assert loss.item() > 0
    assert losses.sude_loss(eps_c, eps_c, eps_u, torch.tensor([100, 600]), SCHEDULE).abs().sum() == 0


def test_sude_t0_is_rejected_by_the_posterior():
    with pytest.raises(ValueError, match="t >= 1"):
        SCHEDULE.posterior(torch.tensor([0]), torch.zeros(1))


# ---------------------------------------------------------------------------------------------------------------
# PALP


@pytest.fixture(scope="module")
def unet_lora_pair(tiny_unet):
    unet = tiny_unet()
    lora = unet_lora(unet, ("attn1.to_q", "attn2.to_k", "attn2.to_v", "attn1.to_out.0"), rank=4, alpha=4, seed=0)
    with torch.no_grad():  # non-zero up so that the LoRA matters
        for _, d in lora.items():
            d.up.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    return unet, lora


def test_palp_gradient_equals_autograd_through_x0_hat(unet_lora_pair):
    unet, lora = unet_lora_pair
    den = DiffusersDenoiser(unet, SCHEDULE)
    g = torch.Generator().manual_seed(2)
    B = 2
    x0, eps = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g)
    t = torch.tensor([120, 800])
    ctx = torch.randn(B, 5, CROSS, generator=g)
    x_t = SCHEDULE.q_sample(x0, eps, t)
    residual = torch.randn(B, 4, 8, 8, generator=g)  # G^alpha - G^beta, any no-grad tensor
    params = list(lora.parameters())

    def grads(loss):
        return torch.autograd.grad(loss, params)

    eps_theta = den(x_t, t, ctx)
    # Eq. 6 literally: w (G^a - G^b) . d x0-hat / d theta, x0-hat = (x_t - sqrt(1-abar) eps_theta) / sqrt(abar),
    # with the mean over elements per sample (the surrogate's reduction) and the batch mean.
    x0_hat = SCHEDULE.x0_from_eps(x_t, eps_theta, t)
    literal = grads((residual * x0_hat).reshape(B, -1).mean(1).mean())
    ours = grads(losses.palp_loss(den(x_t, t, ctx), residual, t, SCHEDULE, rescale=False).mean())
    for a, b in zip(literal, ours):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-9)
    assert sum(a.abs().sum() for a in literal) > 0

    # rescale: per sample, the gradient is multiplied by sqrt(abar) / sqrt(1 - abar)
    for i in range(B):
        sl = slice(i, i + 1)
        un = grads(losses.palp_loss(den(x_t[sl], t[sl], ctx[sl]), residual[sl], t[sl], SCHEDULE, rescale=False).sum())
        re = grads(losses.palp_loss(den(x_t[sl], t[sl], ctx[sl]), residual[sl], t[sl], SCHEDULE, rescale=True).sum())
        a = float(SCHEDULE.alphas_cumprod[t[i]])
        factor = math.sqrt(a) / math.sqrt(1 - a)
        for u, r in zip(un, re):
            assert torch.allclose(r, u * factor, rtol=1e-4, atol=1e-9)


def test_palp_residual_is_imbalanced_cfg():
    g = torch.Generator().manual_seed(4)
    fc, fu, pc, pu = (torch.randn(1, 4, 2, 2, generator=g) for _ in range(4))
    r = losses.palp_residual(fc, fu, pc, pu)
    assert torch.allclose(r, (fu + 15.0 * (fc - fu)) - (pu + 7.5 * (pc - pu)))


# ---------------------------------------------------------------------------------------------------------------
# LoRA and export


def test_lora_switch_and_targets(unet_lora_pair, tiny_unet):
    unet, lora = unet_lora_pair
    names = [n for n, _ in unet.named_modules()]
    sel = select_targets(names)
    assert sel and all(n.split(".")[-2] in ("attn1", "attn2", "to_out") for n in sel)
    assert len(sel) == 8 * sum(1 for n in names if n.endswith("transformer_blocks.0"))
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, CROSS, generator=g)
    with torch.no_grad():
        on = unet(x, 10, encoder_hidden_states=ctx).sample
        with lora.disabled():
            off = unet(x, 10, encoder_hidden_states=ctx).sample
        fresh = tiny_unet()(x, 10, encoder_hidden_states=ctx).sample
    assert torch.equal(off, fresh) and (on - off).abs().max() > 1e-4


def test_diffusers_to_ldm_paths():
    assert export.diffusers_to_ldm_path("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q") == \
        "input_blocks.2.1.transformer_blocks.0.attn1.to_q"
    assert export.diffusers_to_ldm_path("down_blocks.2.attentions.0.proj_in") == "input_blocks.7.1.proj_in"
    assert export.diffusers_to_ldm_path("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0") == \
        "middle_block.1.transformer_blocks.0.attn2.to_out.0"
    assert export.diffusers_to_ldm_path("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k") == \
        "output_blocks.11.1.transformer_blocks.0.attn2.to_k"
    with pytest.raises(ValueError):
        export.diffusers_to_ldm_path("conv_in")


def test_lora_file_round_trip(unet_lora_pair, tmp_path):
    _, lora = unet_lora_pair
    path = export.save_lora(lora, str(tmp_path / "l.safetensors"))
    from safetensors.torch import load_file
    sd = load_file(path)
    assert all(k.startswith("diffusion_model.") for k in sd)
    assert len(sd) == 3 * len(lora.names)
    name = lora.names[0]
    d = lora[name]
    up, down, alpha = (sd[f"diffusion_model.{name}{s}"] for s in (".lora_up.weight", ".lora_down.weight", ".alpha"))
    assert torch.allclose(alpha / up.shape[1] * up @ down, d.delta())


# ---------------------------------------------------------------------------------------------------------------
# training


def make_trainer(tiny_unet, seed=0, **overrides):
    unet = tiny_unet()
    cfg = dict(steps=20, learning_rate=3e-3, rank=4, seed=seed, class_word="dog")
    cfg.update(overrides)
    config = TrainConfig(**cfg)
    lora = unet_lora(unet, config.targets, config.rank, config.alpha, config.seed)
    g = torch.Generator().manual_seed(11)
    latents = torch.randn(2, 4, 8, 8, generator=g) * 0.5 + torch.linspace(-1, 1, 8)[None, None, :, None]
    prior = torch.randn(3, 4, 8, 8, generator=g) if config.prior_weight else None
    token = torch.zeros(1, CROSS) if config.train_token else None
    return Trainer(DiffusersDenoiser(unet, SCHEDULE), lora, FakeText(), latents, config, prior_latents=prior,
                   token_init=token)


def eval_reconstruction(trainer, n=16):
    g = torch.Generator().manual_seed(123)
    x0 = trainer.latents.repeat(n // trainer.latents.shape[0], 1, 1, 1)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    ctx = trainer.context([trainer.config.fill(trainer.config.instance_prompt)] * x0.shape[0])
    with torch.no_grad():
        pred = trainer.denoiser(SCHEDULE.q_sample(x0, eps, t), t, ctx)
    return float(losses.reconstruction_loss(pred, eps).mean())


def test_twenty_steps_lower_the_reconstruction_loss(tiny_unet):
    tr = make_trainer(tiny_unet, learning_rate=3e-2, batch_size=2)
    before = eval_reconstruction(tr)
    tr.train(20)
    after = eval_reconstruction(tr)
    assert after < 0.92 * before, (before, after)  # observed 1.14 -> 0.97
    assert len(tr.history) == 20 and set(tr.history[0]) == {"reconstruction", "total"}


def test_all_terms_run_and_are_logged(tiny_unet):
    tr = make_trainer(tiny_unet, steps=2, prior_weight=1.0, sude_weight=0.4, palp_weight=1.0,
                      palp_prompts=["a sketch of a dog", "a dog in the snow"], grad_accumulation=2, batch_size=2)
    tr.train()
    assert set(tr.history[-1]) == {"reconstruction", "prior", "sude", "palp", "total"}
    assert all(math.isfinite(v) for row in tr.history for v in row.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.lora.parameters())


def test_palp_without_prompts_is_refused():
    with pytest.raises(ValueError, match="target prompt"):
        TrainConfig(palp_weight=1.0)


def state_of(trainer):
    return {k: v.clone() for k, v in trainer.lora.lora_state().items()}


@pytest.mark.parametrize("extra", [{}, {"sude_weight": 0.4, "palp_weight": 0.5, "palp_prompts": ["a sketch of a dog"],
                                        "train_token": True}])
def test_resume_equals_uninterrupted(tmp_path, extra, tiny_unet):
    full = make_trainer(tiny_unet, **extra)
    full.train(6)
    first = make_trainer(tiny_unet, **extra)
    first.train(3)
    path = first.save(str(tmp_path / "run.state.safetensors"))
    del first
    resumed = make_trainer(tiny_unet, **extra)
    resumed.load(path)
    assert resumed.step == 3 and len(resumed.history) == 3
    resumed.train(6)
    a, b = state_of(full), state_of(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["total"] for r in full.history] == [r["total"] for r in resumed.history]
    if extra.get("train_token"):
        assert torch.equal(full.token, resumed.token) and full.token.abs().sum() > 0


def test_resume_refuses_another_rank(tmp_path, tiny_unet):
    tr = make_trainer(tiny_unet, steps=1)
    tr.train()
    path = tr.save(str(tmp_path / "s.safetensors"))
    with pytest.raises(ValueError, match="rank"):
        make_trainer(tiny_unet, rank=2).load(path)
