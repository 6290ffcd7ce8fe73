"""Flow matching for images in one file: learn a velocity field, then ride it from noise to data.

Flow matching (Lipman et al. 2022) trains a network v(x, t) so that the ODE dx/dt = v(x, t) carries
noise x0 ~ N(0, I) at t=0 to data x1 at t=1 (minRF and Stable Diffusion 3 run time the other way).
For one data point x1 the optimal-transport (OT) path and its velocity are known in closed form,
and regressing on them is enough to learn the field:

    path    x_t = (1 - (1 - σ_min) t) x0 + t x1     so x_t | x1 ~ N(t x1, (1 - (1 - σ_min) t)² I)
    target  u   = d/dt x_t = x1 - (1 - σ_min) x0
    loss    L_CFM = E_{t, x0, x1} || v(x_t, t) - u ||²
    ODE     dx/dt = v(x, t) from x(0) ~ N(0, I) to x(1), a sample

Usage:
    python flow_matching.py train --data-dir data --minutes 10      # writes runs/mnist/ckpt.pt
    python flow_matching.py sample --ckpt runs/mnist/ckpt.pt --out samples.png
    python flow_matching.py likelihood --ckpt runs/mnist/ckpt.pt --data-dir data     # bits/dim
    python flow_matching.py train --class-cond --out runs/cond   # then sample --label 7

References:
    Lipman, Chen, Ben-Hamu, Nickel, Le. Flow Matching for Generative Modeling. arXiv:2210.02747.
    Esser et al. Scaling Rectified Flow Transformers (logit-normal t). arXiv:2403.03206.
    Ho, Salimans. Classifier-Free Diffusion Guidance. arXiv:2207.12598.
    Karras et al. Guiding a Diffusion Model with a Bad Version of Itself. arXiv:2406.02507.
    Kynkäänniemi et al. Applying Guidance in a Limited Interval. arXiv:2404.07724.
    Grathwohl et al. FFJORD (Hutchinson's divergence estimator in flows). arXiv:1810.01367.
    Dormand, Prince. A family of embedded Runge-Kutta formulae. J. Comput. Appl. Math. 6, 1980.
"""
import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# === Part I: the method, in tensors and modules ===================================================
# --- 1. Time embedding ----------------------------------------------------------------------------
# e(t) = (sin ω_k t, cos ω_k t) with ω_k = 1000^(k / (dim/2 - 1)), from 1 to 1000 radians per unit
# time: some features change slowly across [0, 1], others tell apart times 1e-3 apart.
# Test: test_time_embedding_varies_slowly_and_quickly_across_the_unit_interval.
def time_embedding(t, dim):
    freqs = torch.logspace(0, 3, dim // 2, device=t.device)         # ω_k
    angles = t[:, None].float() * freqs                             # (B, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)           # (B, dim)

# --- 2. Velocity network --------------------------------------------------------------------------
# v(x, t, y) has the shape of x. A small U-Net: residual blocks at four resolutions (28, 14, 7, 4
# for MNIST), each given the time embedding, and skips from each resolution on the way down to the
# same one on the way up. A class-conditional network adds an embedding of the label y to the time
# embedding; its extra label, `classes`, is ∅, "no label", for classifier-free guidance (section 7).
# Tests: test_network_output_has_the_input_shape_and_depends_on_t, and the two after it.
class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)                           # at first: x plus a constant

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h

class VelocityNet(nn.Module):
    def __init__(self, channels=1, widths=(32, 64, 128, 128), classes=0, emb_dim=128):
        super().__init__()
        self.emb_dim = emb_dim
        self.classes = classes                                      # 0: no labels
        self.time_mlp = nn.Sequential(
            nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if classes:
            self.label_emb = nn.Embedding(classes + 1, emb_dim)     # labels 0, ..., classes - 1, ∅
        self.stem = nn.Conv2d(channels, widths[0], 3, padding=1)
        above = [widths[0]] + list(widths[:-1])                     # each level's input width
        self.down = nn.ModuleList(ResBlock(c_in, c, emb_dim) for c_in, c in zip(above, widths))
        self.pool = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for c in widths[:-1])
        self.mid = ResBlock(widths[-1], widths[-1], emb_dim)
        # Listed top-down like `down`, run bottom-up: a level's block takes h and that level's
        # skip, c channels each, so 2c, and gives h the width of the level above it, c_in.
        self.up = nn.ModuleList(ResBlock(2 * c, c_in, emb_dim) for c_in, c in zip(above, widths))
        self.head = nn.Sequential(
            nn.GroupNorm(8, widths[0]), nn.SiLU(), nn.Conv2d(widths[0], channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)                        # at first, v is a constant

    def forward(self, x, t, y=None):
        emb = self.time_mlp(time_embedding(t, self.emb_dim))
        if self.classes:
            if y is None:                                           # no label: the null label
                y = torch.full((len(x),), self.classes, device=x.device)
            emb = emb + self.label_emb(y)
        h = self.stem(x)
        skips = []
        for level, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if level < len(self.pool):
                h = self.pool[level](h)                             # halve the resolution
        h = self.mid(h, emb)
        for block, skip in zip(reversed(self.up), reversed(skips)):
            h = F.interpolate(h, size=skip.shape[-2:])              # back to the skip's resolution
            h = block(torch.cat([h, skip], dim=1), emb)
        return self.head(h).float()                                 # float32 under autocast too

# --- 3. The OT probability path and the times t ---------------------------------------------------
# Conditioned on a data point x1, x_t moves on a straight line from the noise x0 to (almost) x1:
# σ_min > 0 leaves a little noise at t=1 so that p_1(x | x1) = N(x1, σ_min² I) is not a point mass.
# Tests: test_path_endpoints, test_target_is_the_time_derivative_of_the_path.
def ot_path(x0, x1, t, sigma_min):
    t = t.view(-1, *[1] * (x1.dim() - 1))                           # broadcast t over pixels
    xt = (1 - (1 - sigma_min) * t) * x0 + t * x1                    # (1 - (1 - σ_min) t) x0 + t x1
    u = x1 - (1 - sigma_min) * x0                                   # u = d/dt x_t
    return xt, u

def draw_t(n, scale=1.0):
    """t for training, logit-normal (Esser et al. 2024): mid-path, where u is most ambiguous. Scale
    1.5 puts 1 t in 40 past 0.95 (1: 1 in 600), where log p_1 is decided: better bits/dim."""
    return torch.sigmoid(scale * torch.randn(n))                    # t = σ(s), s ~ N(0, scale²)

# --- 4. The conditional flow matching loss --------------------------------------------------------
# Regressing on the marginal velocity (L_FM) is intractable; L_CFM regresses on u instead, and
# L_FM = L_CFM + C with C independent of v (Lipman et al., Theorem 2), so both have the same
# minimiser: the marginal velocity, the posterior mean of u given x_t. With labels y, the same
# holds for each class: v(x, t, y) learns the marginal velocity of that class's images.
# Tests: test_fm_and_cfm_losses_differ_by_the_same_constant_for_any_field, and the two near it.
def cfm_loss(model, x0, x1, t, sigma_min, y=None):
    xt, u = ot_path(x0, x1, t, sigma_min)
    return F.mse_loss(model(xt, t, y), u)                           # E || v(x_t, t) - u ||² / D

# --- 5. A training step ---------------------------------------------------------------------------
# A batch pairs images x1 ~ p_data, on [-1, 1], with noise x0 ~ N(0, I) and times t. Adam steps on
# L_CFM with its gradient clipped to norm 1, at a rate that warms up, then decays linearly to zero
# over the run; a moving average of the weights (EMA) draws the samples.
# Tests: test_training_lowers_the_loss_on_a_tiny_data_set, and the tests of this section.
def to_model_scale(pixels):
    return pixels.float() / 127.5 - 1                               # {0, ..., 255} → [-1, 1]

def to_unit_scale(x):
    return ((x + 1) / 2).clamp(0, 1)                                # [-1, 1] → [0, 1] for images

def draw_batch(images, batch_size, labels=None, null_label=None, flip=False, t_scale=1.0):
    """x0, x1, t and labels y (None without `labels`) from uint8 images (N, C, H, W). Each label is
    ∅ with probability 0.1, drawn per image, so v is learnt without one too; `flip` mirrors half."""
    index = torch.randint(len(images), (batch_size,))
    x1 = to_model_scale(images[index])                              # x1 ~ p_data
    if flip:
        x1 = torch.where(torch.rand(batch_size, 1, 1, 1) < 0.5, x1.flip(-1), x1)
    x0 = torch.randn_like(x1)                                       # x0 ~ N(0, I)
    t = draw_t(batch_size, t_scale)
    if labels is None:
        return x0, x1, t, None
    return x0, x1, t, torch.where(torch.rand(batch_size) < 0.1, null_label, labels[index])

def adam(model, lr):
    """Adam with β₂ = 0.99: a shorter memory of gradients than the usual 0.999, for short runs."""
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))

def learning_rate(peak, step, progress, warmup=200):
    """The rate at a step, given the share `progress` of the run's budget that has passed."""
    warm = min(1.0, (step + 1) / warmup)                            # 1) linear warm-up
    decay = max(0.0, 1.0 - progress)                                # 2) linear decay to zero
    return peak * warm * decay

@torch.no_grad()
def ema_update(ema, model, step, decay=0.999):
    decay = min(decay, (1 + step) / (10 + step))                    # short memory while young
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)                                       # e ← decay e + (1 - decay) p

def autocast(device, bf16):
    """bfloat16 autocast if bf16, else none, on any device (older PyTorch has none for MPS)."""
    return torch.autocast(device.type if bf16 else "cpu", torch.bfloat16, enabled=bf16)

def train_step(model, ema, opt, batch, lr, step, sigma_min=0.0, bf16=False):
    """One Adam step on L_CFM at learning rate lr, then the EMA's; returns the loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    x0, x1, t, y = batch
    with autocast(x0.device, bf16):
        loss = cfm_loss(model, x0, x1, t, sigma_min, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    ema_update(ema, model, step)
    return loss.item()

# --- 6. Samplers ----------------------------------------------------------------------------------
# Generation integrates dx/dt = v(x, t) from t=0 (noise) to t=1 for any v(x, t): the network, or,
# in the tests, fields with known solutions. Fixed steps of length h miss x(1) by O(h) for Euler,
# O(h²) for Adams-Bashforth and O(h⁴) for RK4, at 1, 1 and 4 evaluations of v a step.
# Tests: test_solvers_converge_at_their_order, test_steps_follow_the_grid_and_end_at_t1.
def euler_step(v, x, t, h, memory=None):
    return x + h * v(x, t), None                                    # x_{t+h} = x_t + h v(x_t, t)

def rk4_step(v, x, t, h, memory=None):
    k1 = v(x, t)
    k2 = v(x + h / 2 * k1, t + h / 2)
    k3 = v(x + h / 2 * k2, t + h / 2)
    k4 = v(x + h * k3, t + h)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), None

def adams_bashforth_step(v, x, t, h, memory=None):
    """Second order at one evaluation a step: v taken as the line through its values at the starts
    of this step and the last, memory = (that v, that h), integrated over this step; Euler first."""
    slope = v(x, t)
    before, h_before = memory or (slope, h)                         # first step: Euler's slope
    r = h / h_before
    return x + h * ((1 + r / 2) * slope - r / 2 * before), (slope, h)  # ∫ of the line, t to t+h

SOLVERS = {"euler": euler_step, "ab2": adams_bashforth_step, "rk4": rk4_step}

def integrate(v, x, steps, solver="rk4", t0=0.0, t1=1.0, trajectory=None):
    """x(t1) from x(t0) in `steps` steps of dx/dt = v(x, t); `trajectory` gets x after each. Steps
    start at t = s - a sin(2πs) / 2π, s = i / steps: equal for Euler (a = 0), shorter near noise and
    data, where v changes fastest and the error gathers, for AB2 (a = 0.3) and RK4 (a = 1/2)."""
    a = {"euler": 0.0, "ab2": 0.3, "rk4": 0.5}[solver]
    grid = [i / steps for i in range(steps + 1)]
    times = [t0 + (t1 - t0) * (s - a * math.sin(2 * math.pi * s) / (2 * math.pi)) for s in grid]
    memory = None
    for t, t_next in zip(times[:-1], times[1:]):
        x, memory = SOLVERS[solver](v, x, t, t_next - t, memory)
        if trajectory is not None:
            trajectory.append(x)
    return x

# Dormand-Prince 5(4) (Dormand & Prince 1980; Hairer, Nørsett & Wanner, Solving ODEs I, Table
# II.5.2): k_i = v(x + h Σ_j a_ij k_j, t + c_i h). a's last row weighs the fifth-order solution, so
# k_7 is v at the new point, the next step's k_1: 6 evaluations a step. DP_E weighs the difference
# from the embedded fourth-order solution: the step's error. Tests: test_dopri5_*.
DP_TABLEAU = ((1 / 5, (1 / 5,)),                                    # (c_i, a_i1 ... a_i,i-1), i > 1
              (3 / 10, (3 / 40, 9 / 40)),
              (4 / 5, (44 / 45, -56 / 15, 32 / 9)),
              (8 / 9, (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729)),
              (1, (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656)),
              (1, (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)))
DP_E = (71 / 57600, 0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)  # b5 - b4

def dopri5_step(v, x, t, h, k1):
    """x(t + h) to fifth order, its error estimate x5 - x4 and k_7, from k1 = v(x, t) and 6 more."""
    k = [k1]
    for c, a in DP_TABLEAU:
        k.append(v(x + h * sum(a_j * k_j for a_j, k_j in zip(a, k)), t + c * h))
    x_new = x + h * sum(b_j * k_j for b_j, k_j in zip(DP_TABLEAU[-1][1], k))  # x + h Σ b_j k_j
    error = h * sum(e_j * k_j for e_j, k_j in zip(DP_E, k))         # x5 - x4
    return x_new, error, k[-1]

def dopri5(v, x, t0=0.0, t1=1.0, rtol=1e-5, atol=1e-5, trajectory=None):
    """x(t1) from x(t0) in steps sized to keep r, the root mean square of error / (atol + rtol |x|),
    at most 1: a step with r > 1 is retried; each next h is h · 0.9 r^(-1/5), within [h/5, 10 h]."""
    t, k1 = t0, v(x, t0)
    h = 0.01 * (t1 - t0)                                            # a first guess; r corrects it
    while t != t1:
        h = h if abs(h) < abs(t1 - t) else t1 - t                   # the last step ends at t1
        x_new, error, k_new = dopri5_step(v, x, t, h, k1)
        scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        r = (error / scale).square().mean().sqrt().item()
        if r <= 1:                                                  # kept
            t = t + h                                               # t1 itself at the last
            x, k1 = x_new, k_new
            if trajectory is not None:
                trajectory.append(x)
        h = h * min(10.0, max(0.2, 0.9 * max(r, 1e-10) ** -0.2))
    return x

# --- 7. Guidance ----------------------------------------------------------------------------------
# Guidance pushes v away from a weaker prediction of it, v_weak + w (v - v_weak) with w > 1. For
# classifier-free guidance (Ho & Salimans 2022) v_weak is the same network without the label; for
# autoguidance (Karras et al. 2024), the same network early in its training, the guide, given the
# same label: its errors are the final network's, only larger. Both at once add their pushes. Each
# acts mid-path only (Kynkäänniemi et al. 2024): guiding at t < 0.2 costs fd, past 0.8 buys little.
# Tests: test_classifier_free_guidance_mixes..., test_autoguidance_mixes..., test_the_guide_acts...
@dataclass
class GuidedField:
    """The samplers' v(x, t), t a number: the network given labels y, guided where t is in times."""
    model: nn.Module
    y: torch.Tensor = None                  # a label per image; None: the null label, or no label
    guidance: float = 1.0                   # classifier-free guidance's w; 1 is none
    guide: nn.Module = None                 # autoguidance's guide
    autoguidance: float = 1.0               # autoguidance's w; 1 is none
    times: tuple = (0.2, 0.8)               # guided where times[0] ≤ t ≤ times[1]
    passes: int = 0                         # network evaluations so far, passes over single images

    def __call__(self, x, t):
        mid_path = self.times[0] <= t <= self.times[1]
        cfg = mid_path and self.guidance != 1
        ag = mid_path and self.autoguidance != 1
        self.passes += len(x) * (1 + cfg + ag)                      # the networks to run
        t = torch.full((len(x),), t, device=x.device)
        v = self.model(x, t, self.y)
        pushed = v
        if cfg:                                                     # v_null + w (v_y - v_null)
            pushed = pushed + (self.guidance - 1) * (v - self.model(x, t))
        if ag:                                                      # v_guide + w (v - v_guide)
            pushed = pushed + (self.autoguidance - 1) * (v - self.guide(x, t, self.y))
        return pushed

@dataclass(frozen=True)
class Solver:
    """How to integrate dx/dt = v; --solver S runs SAMPLERS[S], each measured in docs/results.md."""
    name: str = "rk4"                       # a fixed-step solver of SOLVERS, or dopri5
    steps: int = 5                          # the fixed-step solver's steps
    tol: float = 1e-5                       # dopri5's rtol = atol, to which it sizes its own steps
    guided: tuple = (0.2, 0.8)              # where in t `sample` guides v

    def __str__(self):
        detail = f"tolerance {self.tol:g}" if self.name == "dopri5" else f"{self.steps} steps"
        return f"{self.name}, {detail}"

    def __call__(self, v, x, t0=0.0, t1=1.0, trajectory=None):
        if self.name == "dopri5":
            return dopri5(v, x, t0, t1, self.tol, self.tol, trajectory)
        return integrate(v, x, self.steps, self.name, t0, t1, trajectory)

SAMPLERS = {"rk4": Solver("rk4", 5),                                # 30 evaluations: the best fd
            "ab2": Solver("ab2", 7, guided=(0.2, 0.6)),             # 10, 3 steps guided: +10 fd
            "euler": Solver("euler", 7, guided=(0.2, 0.6)),         # 10: fd a little above AB2's
            "dopri5": Solver("dopri5")}                             # the ODE's own answer: ~700
GUIDANCE = 2.0                          # classifier-free: the least w with 99.5% in their class
AUTOGUIDANCE = 2.5                      # unconditional models with a guide: fd lowest of w 1 to 3

# --- 8. Likelihood --------------------------------------------------------------------------------
# The flow also gives exact densities. Along a trajectory the continuity equation reads
# d/dt log p_t(x_t) = -div v(x_t, t), so log p_1(x1) = log N(x0; 0, I) - ∫_0^1 div v(x_t, t) dt,
# where x0 is x1 carried back to t=0. We integrate x and the divergence together, from t=1 to 0.
# Tests: test_log_likelihood_of_a_gaussian_data_set_matches_the_closed_form, and the three after.
def divergence(v, x, t, noise):
    """v(x, t) and Hutchinson's estimate of its divergence, εᵀ (∂v/∂x) ε, from one vector-Jacobian
    product: unbiased for noise ε with E[ε εᵀ] = I, such as random signs."""
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        vx = v(x, t)
        vjp = torch.autograd.grad(vx, x, noise)[0]                  # εᵀ J
    return vx.detach(), (vjp * noise).flatten(1).sum(1)             # εᵀ J ε

def log_likelihood(v, x1, solver=Solver("dopri5")):
    """log p_1(x1) under the flow of v, per sample; random signs ε drawn once for its whole path."""
    dim = x1[0].numel()
    noise = torch.randint(0, 2, x1.shape, dtype=x1.dtype, device=x1.device) * 2 - 1  # ε = ±1

    def augmented(z, t):                                            # z = (x, ∫ div v dt)
        vx, div = divergence(v, z[:, :dim].view_as(x1), t, noise)
        return torch.cat([vx.flatten(1), div[:, None]], dim=1)

    z = torch.cat([x1.flatten(1), x1.new_zeros(len(x1), 1)], dim=1)
    z = solver(augmented, z, t0=1.0, t1=0.0)
    x0 = z[:, :dim]
    int_div = z[:, dim]                                             # ∫_1^0 div v = -∫_0^1 div v
    log_p0 = -0.5 * (x0 ** 2).sum(1) - 0.5 * dim * math.log(2 * math.pi)   # log N(x0; 0, I)
    return log_p0 + int_div

def bits_per_dim(pixels, v, solver=Solver("dopri5")):
    """Bits/dim of 8-bit images. pixel + U[0, 1) has a density on [0, 256)^D, and
    x = (pixel + U - 1/2) / 127.5 - 1 puts it on the model's scale, so
    bits/dim = -(log p_x(x) - D ln 127.5) / (D ln 2)."""
    x = to_model_scale(pixels.float() + torch.rand(pixels.shape, device=pixels.device) - 0.5)
    dim = x[0].numel()
    log_px = log_likelihood(v, x, solver)
    return -(log_px - dim * math.log(127.5)) / (dim * math.log(2))

# === Part II: running it (data, the training run, checkpoints, the commands, their errors) ========
import argparse  # noqa: E402
import copy  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from torchvision import datasets  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

# --- 9. Data and devices --------------------------------------------------------------------------
# Images keep their data set's shape: 1x28x28 for MNIST and Fashion-MNIST, 3x32x32 for CIFAR-10.
# The training set sits in memory as one uint8 tensor: faster batches than a DataLoader's.
DATASETS = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST,
            "cifar10": datasets.CIFAR10}

def load_data(name, root, train=True):
    """(N, C, H, W) uint8 images and (N,) labels; torchvision downloads them when it can."""
    kind = DATASETS[name]
    if kind is datasets.CIFAR10:                                    # one archive, which it unpacks
        folder = os.path.join(root, kind.base_folder)
        files = f"{kind.filename} in {root}"
    else:
        folder = os.path.join(root, kind.__name__, "raw")
        files = ", ".join(file for file, _ in kind.resources) + " there"
    new_folders = [path for path in [folder, *Path(folder).parents] if not os.path.exists(path)]
    try:
        data = kind(root, train=train, download=True)
    except Exception:                                               # no files and no network
        for path in new_folders:                                    # leave no empty folders
            if os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)
        die(f"{name} is not in {folder} and cannot be downloaded: put {files}")
    images = torch.as_tensor(data.data)                             # grey (N, H, W), colour NHWC
    images = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(data.targets)

def pick_device(name):
    """--device: auto takes CUDA, then Apple's MPS, then the CPU; one asked for must exist."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        name = next((kind for kind, present in available.items() if present), "cpu")
    if not available.get(name, True):                               # the CPU is always there
        die(f"--device {name}: this machine has no {name} device (--device auto finds one)")
    return torch.device(name)

def use_bfloat16(device, fp32):
    """bfloat16 where it is native: CUDA with bfloat16, or a CPU with AVX-512 BF16; not on MPS."""
    if fp32 or device.type == "mps":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    detect = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private; older torch lacks it
    return torch.backends.mkldnn.is_available() and detect is not None and detect()

# --- 10. The run's settings and checkpoints -------------------------------------------------------
@dataclass
class RunConfig:
    """What defines a run: train's flags set it, its checkpoint keeps it (nanoGPT's model_args)."""
    dataset: str = "mnist"                  # a key of DATASETS
    class_cond: bool = False                # learn v(x, t, label) too, for --label and --guidance
    widths: tuple = (32, 64, 128, 128)      # U-Net channels at each resolution, from the top
    sigma_min: float = 0.0                  # noise left at t=1 on the OT path
    t_scale: float = 1.0                    # training times t = σ(s), s ~ N(0, t_scale²)
    lr: float = 2e-3                        # peak learning rate of Adam
    batch_size: int = 128                   # images per optimizer step
    seed: int = 0                           # the same seed trains the same weights
    steps: int = None                       # stop after this many optimizer steps in all,
    minutes: float = 10.0                   # or this many minutes of training (None: no limit)
    save_every: int = 1000                  # save ckpt.pt and a grid of samples this often (steps)
    image_shape: tuple = None               # (C, H, W), from the data when the run starts,
    classes: int = None                     # and the number of labels in it

@dataclass
class TrainState:
    """What a run changes as it trains; its checkpoint holds all of it."""
    model: nn.Module
    ema: nn.Module                          # a moving average of the model's weights, to sample
    opt: torch.optim.Optimizer
    guide: dict = None                      # the EMA's weights a quarter of the way through
    step: int = 0
    elapsed: float = 0.0                    # seconds of training

CHECKPOINT_KEYS = {"config", "model", "ema", "optimizer", "guide", "step", "elapsed", "rng"}
EXTENDABLE = {"steps", "minutes", "save_every"}                     # what --resume may change

def build_model(config, weights=None, device="cpu"):
    classes = config.classes if config.class_cond else 0
    model = VelocityNet(config.image_shape[0], config.widths, classes)
    if weights is not None:                                         # trained: to evaluate
        model.load_state_dict(weights)
        model.eval().requires_grad_(False)
    return model.to(device)

def save_run(state, config, folder):
    """ckpt.pt, written whole or not at all, and a grid of 64 samples from the EMA alone."""
    os.makedirs(folder, exist_ok=True)
    checkpoint = {"config": asdict(config), "model": state.model.state_dict(),
                  "ema": state.ema.state_dict(), "optimizer": state.opt.state_dict(),
                  "guide": state.guide, "step": state.step, "elapsed": state.elapsed,
                  "rng": torch.get_rng_state()}
    path = os.path.join(folder, "ckpt.pt")
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)                                 # a crash leaves the old file
    noise = torch.randn(64, *config.image_shape, generator=torch.Generator().manual_seed(0))
    images = draw_samples(GuidedField(state.ema), noise, default_labels(config, 64), Solver())
    grid = os.path.join(folder, f"samples_{state.step:06d}.png")
    save_image(images, grid, nrow=config.classes if config.class_cond else 8)

def load_checkpoint(path):
    """A checkpoint and its RunConfig, read onto the CPU; weights_only=True runs no code from it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        die(f"no checkpoint at {path}")
    except Exception:
        die(f"{path} is not a readable checkpoint")
    complete = isinstance(ckpt, dict) and CHECKPOINT_KEYS <= ckpt.keys()
    if not complete or set(ckpt["config"]) != {field.name for field in fields(RunConfig)}:
        die(f"{path} is not a checkpoint of this version of flow_matching.py")
    return ckpt, RunConfig(**ckpt["config"])

def restore(state, ckpt):
    """Where the checkpoint stopped, random state included, so the batches go on as they would."""
    for part, key in ((state.model, "model"), (state.ema, "ema"), (state.opt, "optimizer")):
        part.load_state_dict(ckpt[key])
    for key in ("guide", "step", "elapsed"):
        setattr(state, key, ckpt[key])
    torch.set_rng_state(ckpt["rng"])

def run_config(args):
    """The run's settings and, with --resume, its checkpoint. A new run takes the flags given over
    RunConfig's defaults; a resumed one keeps its own, and only its budget may change."""
    given = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
    if "steps" in given or "minutes" in given:                      # the budget given is the whole
        given = {"steps": None, "minutes": None, **given}           # budget, new run or resumed
    if not args.resume:
        return RunConfig(**given), None
    ckpt, stored = load_checkpoint(os.path.join(args.out, "ckpt.pt"))
    for name, value in given.items():
        flag = "--" + name.replace("_", "-")
        if name not in EXTENDABLE and value != getattr(stored, name):
            die(f"{flag} {shown(value)} would change the run in {args.out}, trained with "
                f"{flag} {shown(getattr(stored, name))}: --resume continues a run as set up")
    extended = {name: value for name, value in given.items() if name in EXTENDABLE}
    return replace(stored, **extended), ckpt

def shown(value):
    """A setting's value as it reads on the command line: widths as 32,64,128,128."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

# --- 11. The training run -------------------------------------------------------------------------
def train(args):
    config, ckpt = run_config(args)                                 # the flags, or the run's own
    device = pick_device(args.device)
    torch.manual_seed(config.seed)
    images, labels = load_data(config.dataset, args.data_dir)
    config = replace(config, image_shape=tuple(images.shape[1:]), classes=int(labels.max()) + 1)
    model = build_model(config, device=device)
    state = TrainState(model, copy.deepcopy(model).requires_grad_(False), adam(model, config.lr))
    if ckpt is not None:
        restore(state, ckpt)
    bf16 = use_bfloat16(device, args.fp32)
    kind = "class-conditional, " if config.class_cond else ""
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{config.dataset}: {len(images)} images of {'x'.join(map(str, images.shape[1:]))} on "
          f"{device}{' with bfloat16 autocast' if bf16 else ''}; {kind}{parameters:.2f}M "
          f"parameters; from step {state.step}", flush=True)

    def next_batch():
        given = labels if config.class_cond else None
        flip = config.dataset == "cifar10"                          # a mirrored digit is no digit
        batch = draw_batch(images, config.batch_size, given, config.classes, flip, config.t_scale)
        return [part if part is None else part.to(device) for part in batch]
    stopped = run_steps(state, config, next_batch, bf16, args.out)
    if state.step % config.save_every or not os.path.exists(os.path.join(args.out, "ckpt.pt")):
        save_run(state, config, args.out)                           # unless the last step saved
    how = " on a stop signal" if stopped else ""
    print(f"step {state.step}, {state.elapsed / 60:.1f} min{how}: saved {args.out}/ckpt.pt and "
          f"{args.out}/samples_{state.step:06d}.png")

def run_steps(state, config, next_batch, bf16, out):
    """Train to the end of the budget or a stop (Ctrl-C, SIGTERM, `| head`); True if stopped."""
    max_steps = config.steps or math.inf
    max_seconds = 60 * config.minutes if config.minutes else math.inf
    signals = []                                                    # Ctrl-C and SIGTERM land here
    for number in (signal.SIGINT, signal.SIGTERM):                  # instead of killing the run
        signal.signal(number, lambda number, frame: signals.append(number))
    clock = time.perf_counter() - state.elapsed                     # a resumed run keeps its time
    start_step = state.step                                         # for this command's rate
    start_elapsed = state.elapsed
    last_line = state.elapsed
    while state.step < max_steps and state.elapsed < max_seconds and not signals:
        progress = max(state.step / max_steps, state.elapsed / max_seconds)  # whichever ends first
        lr = learning_rate(config.lr, state.step, progress)
        loss = train_step(state.model, state.ema, state.opt, next_batch(), lr, state.step,
                          config.sigma_min, bf16)
        state.step += 1
        state.elapsed = time.perf_counter() - clock
        if state.guide is None and progress >= 0.25:                # autoguidance's guide
            state.guide = copy.deepcopy(state.ema.state_dict())
        if not math.isfinite(loss):
            die(f"the loss is {loss} at step {state.step}: try a lower --lr (ckpt.pt: last save)")
        if state.step == start_step + 10 or state.elapsed - last_line >= 30:  # soon, then each 30 s
            rate = (state.step - start_step) / (state.elapsed - start_elapsed)   # steps per second
            left = min(max_seconds - state.elapsed, (max_steps - state.step) / rate)
            try:
                print(f"step {state.step:6d}  loss {loss:.4f}  {rate * config.batch_size:6.1f} "
                      f"img/s  {left / 60:5.1f} min left", flush=True)
            except BrokenPipeError:                                 # its reader has gone
                signals.append("closed pipe")
            last_line = state.elapsed
        if state.step % config.save_every == 0:
            save_run(state, config, out)
    return bool(signals)

# --- 12. Sampling and likelihood ------------------------------------------------------------------
def load_model(args):
    device = pick_device(args.device)
    ckpt, config = load_checkpoint(args.ckpt)
    model = build_model(config, ckpt["ema"], device)
    guide = None if ckpt["guide"] is None else build_model(config, ckpt["guide"], device)
    return config, model, guide, device

def in_chunks(n, size=128):
    """Slices of n images, `size` at a time; when slow, a line every 30 s: done, rate, time left."""
    start = last_line = time.perf_counter()
    for done in range(size, n + size, size):
        yield slice(done - size, done)
        now = time.perf_counter()
        if now - last_line >= 30 and done < n:
            rate = done / (now - start)
            left = (n - done) / rate / 60
            print(f"{done:6d} of {n} images  {rate:6.1f} img/s  {left:5.1f} min left", flush=True)
            last_line = now

def default_labels(config, n):
    """Sample i of a class-conditional model gets label i mod classes: a class per grid column."""
    return torch.arange(n) % config.classes if config.class_cond else None

def draw_samples(v, noise, labels, solver, bf16=False, trajectory=None):
    """Images in [0, 1]: noise carried along v, a GuidedField; `trajectory` gets chunk 1's x_t."""
    device = next(v.model.parameters()).device
    images = []
    for part in in_chunks(len(noise)):
        v.y = None if labels is None else labels[part].to(device)
        with autocast(device, bf16), torch.no_grad():
            x = solver(v, noise[part].to(device), trajectory=trajectory)
        images.append(to_unit_scale(x))
        trajectory = None
    return torch.cat(images).cpu()

def conditioning(args, config, guide):
    """Labels and guidance weights, the flags' or the defaults of docs/results.md, or an error."""
    if not config.class_cond and (args.label is not None or args.guidance is not None):
        die(f"--label and --guidance need a model trained with --class-cond: {args.ckpt} was not")
    if args.label is not None and not 0 <= args.label < config.classes:
        die(f"--label {args.label}: {config.dataset}'s labels run from 0 to {config.classes - 1}")
    if guide is None and args.autoguidance not in (None, 1.0):
        die(f"{args.ckpt} holds no guide for --autoguidance: its run ended before a quarter of it")
    labels = default_labels(config, args.n)
    if args.label is not None:
        labels = torch.full((args.n,), args.label)
    default_guidance = GUIDANCE if config.class_cond else 1.0
    default_autoguidance = 1.0 if config.class_cond or guide is None else AUTOGUIDANCE
    guidance = default_guidance if args.guidance is None else args.guidance
    autoguidance = default_autoguidance if args.autoguidance is None else args.autoguidance
    return labels, guidance, autoguidance

def sample(args):
    config, model, guide, device = load_model(args)
    labels, guidance, autoguidance = conditioning(args, config, guide)
    seeded = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.n, *config.image_shape, generator=seeded)
    frames = [noise[:128].to(device)] if args.trajectory else None  # x_t of the first chunk
    v = GuidedField(model, None, guidance, guide, autoguidance, args.solver.guided)
    bf16 = use_bfloat16(device, args.fp32)                          # as in train; x stays float32
    start = time.perf_counter()
    images = draw_samples(v, noise, labels, args.solver, bf16, frames)
    seconds = time.perf_counter() - start
    nrow = math.ceil(math.sqrt(args.n))
    if config.class_cond and args.label is None:
        nrow = config.classes                                       # a class per column
    if args.out:
        write_images(images, args.out, nrow)
    if args.trajectory:                                             # a row per sample
        write_images(trajectory_rows(frames), args.trajectory, len(frames))
    written = " and ".join(path for path in (args.out, args.trajectory) if path)
    weights = f"guidance {guidance:g}, " if config.class_cond else ""
    print(f"{args.n} samples in {seconds:.1f} s: {args.solver}, {weights}"
          f"autoguidance {autoguidance:g}, {v.passes / args.n:g} network evaluations each; "
          f"wrote {written}")

def trajectory_rows(frames, samples=8):
    """x_t after each step for the first `samples` samples, a row each, from x_0 on the left."""
    rows = torch.stack([x[:samples] for x in frames], dim=1)        # (samples, frames, C, H, W)
    return to_unit_scale(rows.flatten(0, 1)).cpu()

def write_images(images, path, nrow):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".pt"):
        torch.save(images, path)
    else:
        save_image(images, path, nrow=nrow)

def likelihood(args):
    """Bits/dim of test images; a class-conditional model's unconditional density, v given ∅."""
    config, model, _, device = load_model(args)
    images, _ = load_data(config.dataset, args.data_dir, train=False)
    torch.manual_seed(args.seed)                                    # which images, U and ε
    pixels = images[torch.randperm(len(images))[:args.n]].to(device)
    v = GuidedField(model)
    start = time.perf_counter()
    bpd = torch.cat([bits_per_dim(pixels[i], v, args.solver) for i in in_chunks(len(pixels))])
    print(f"{bpd.mean():.3f} ± {bpd.std() / math.sqrt(len(bpd)):.3f} bits/dim on {len(bpd)} "
          f"{config.dataset} test images in {time.perf_counter() - start:.1f} s: "
          f"{args.solver}, {v.passes / len(bpd):g} network evaluations (and gradients) each")

# --- 13. Command line -----------------------------------------------------------------------------
def die(message):
    """A user's mistake: one line on stderr, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

def checked(kind, ok, what):
    """An argparse type: kind(text), which must satisfy ok; argparse's errors name it `what`."""
    def parse(text):
        value = kind(text)
        if not ok(value):
            raise ValueError(text)
        return value
    parse.__name__ = what
    return parse

SEED = checked(int, lambda n: abs(n) < 2 ** 63, "64-bit integer")
COUNT = checked(int, lambda n: n > 0, "positive integer")
POSITIVE = checked(float, lambda x: 0 < x < math.inf, "positive number")
WEIGHT = checked(float, lambda x: 0 <= x < math.inf, "non-negative number")
FRACTION = checked(float, lambda x: 0 <= x < 1, "number in [0, 1)")
WIDTHS = checked(lambda text: tuple(int(c) for c in text.split(",")),
                 lambda widths: all(c > 0 and c % 8 == 0 for c in widths), "list of multiples of 8")

class Parser(argparse.ArgumentParser):
    def error(self, message):                                       # one line and exit code 2
        die(message)

def config_flag(parser, name, help, **kwargs):
    """A train flag for RunConfig's `name`; absent from args unless given, for --resume to see."""
    default = getattr(RunConfig, name)
    if default is not None and default is not False:
        help += f" (default {shown(default)})"
    flag = "--" + name.replace("_", "-")                            # its dest: name
    parser.add_argument(flag, default=argparse.SUPPRESS, help=help, **kwargs)

def train_flags(parser):
    config_flag(parser, "dataset", "torchvision data set", choices=sorted(DATASETS))
    config_flag(parser, "class_cond", "learn v(x, t, label) too; 1 label in 10 is dropped",
                action="store_true")
    config_flag(parser, "steps", "stop after this many optimizer steps in all", type=COUNT)
    config_flag(parser, "minutes", "stop after this many minutes of training in all, unless "
                "--steps alone is given", type=POSITIVE)
    config_flag(parser, "batch_size", "images per optimizer step", type=COUNT)
    config_flag(parser, "lr", "peak learning rate of Adam", type=POSITIVE)
    config_flag(parser, "widths", "U-Net channels per resolution, from the top", type=WIDTHS)
    config_flag(parser, "sigma_min", "noise left at t=1 on the OT path", type=FRACTION)
    config_flag(parser, "t_scale", "training times t = sigmoid(s), s ~ N(0, T²)", type=POSITIVE)
    config_flag(parser, "seed", "the same seed trains the same weights", type=SEED)
    config_flag(parser, "save_every", "save ckpt.pt and a grid every this many steps", type=COUNT)
    parser.add_argument("--out", default="runs/mnist", help="run folder (default %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out as it was "
                        "set up; a --steps or --minutes given with it replaces the budget")

def sample_flags(parser):
    reader_flags(parser, "rk4")
    parser.add_argument("--n", type=COUNT, default=64, help="samples (default %(default)s)")
    parser.add_argument("--out", help=".png for a grid, .pt for a tensor (N, C, H, W) in [0, 1] "
                        "(default samples.png, unless --trajectory is all that is asked)")
    parser.add_argument("--label", type=int, help="draw this class from a class-conditional "
                        "model (default: sample i draws class i mod 10, a class per column)")
    parser.add_argument("--guidance", type=WEIGHT, help="classifier-free guidance (default 2)")
    parser.add_argument("--autoguidance", type=WEIGHT, help="1 for none (default 2.5 for an "
                        "unconditional model with a guide, else 1)")
    parser.add_argument("--trajectory", help="also save x_t of 8 samples, a row each, to this .png")

def reader_flags(parser, solver):
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train")
    parser.add_argument("--seed", type=SEED, default=0, help="same seed, same draws (default 0)")
    parser.add_argument("--solver", default=solver, choices=sorted(SAMPLERS),
                        help="ODE solver; dopri5 sizes its own steps (default %(default)s)")
    parser.add_argument("--steps", type=COUNT, help="steps of rk4 (default 5), ab2 or euler (7)")
    parser.add_argument("--tol", type=POSITIVE, help="dopri5's rtol = atol (default 1e-05)")

def parse_args(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    data = Parser(add_help=False)
    data.add_argument("--data-dir", default="./data",
                      help="the data set's folder; torchvision downloads it there (default ./data)")
    device = Parser(add_help=False)
    device.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to run; auto takes cuda, then mps, then cpu (default auto)")
    precision = Parser(add_help=False)                              # train's and sample's
    precision.add_argument("--fp32", action="store_true",
                           help="no bfloat16 autocast (on by itself on CUDA and AVX-512 BF16 CPUs)")
    train_flags(commands.add_parser("train", parents=[data, device, precision],
                                    help="train a velocity network"))
    sample_flags(commands.add_parser("sample", parents=[device, precision], help="draw samples"))
    lk = commands.add_parser("likelihood", parents=[data, device], help="bits/dim")
    lk.add_argument("--n", type=checked(int, lambda n: n > 1, "integer above 1"), default=128,
                    help="test images, 2 or more (default %(default)s: ± 0.03 bits/dim in minutes)")
    reader_flags(lk, "dopri5")
    args = parser.parse_args(argv)
    check_outputs(args)
    if args.command == "train":
        return args
    preset = SAMPLERS[args.solver]                                  # a Solver of Part I
    wrong = "steps" if preset.name == "dopri5" else "tol"           # the flag that does not apply
    if getattr(args, wrong) is not None:
        die(f"--{wrong} does not apply to --solver {args.solver}")
    args.solver = replace(preset, steps=args.steps or preset.steps, tol=args.tol or preset.tol)
    return args

def check_outputs(args):
    """Fail now, not after the work, when an output cannot be written."""
    if args.command == "train":
        ckpt = os.path.join(args.out, "ckpt.pt")
        check_writable(ckpt, (".pt",))
        if args.resume and not os.path.exists(ckpt):
            die(f"--resume: {args.out} holds no run to continue (no ckpt.pt)")
        if not args.resume and os.path.exists(ckpt):
            die(f"{args.out} holds a run already: add --resume to continue it, or choose --out")
    if args.command == "sample":
        if args.out is None and not args.trajectory:
            args.out = "samples.png"
        for path, endings in ((args.out, (".png", ".pt")), (args.trajectory, (".png",))):
            if path:
                check_writable(path, endings)

def check_writable(path, endings):
    """A file name with one of the endings, in a writable folder that exists or can be made."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)                            # the nearest that exists
    writable = os.path.isdir(folder) and os.access(folder, os.W_OK)
    if not path.endswith(endings) or os.path.isdir(path) or not writable:
        die(f"cannot write {path}: it must end in {' or '.join(endings)}, in a writable folder")

def main(argv=None):
    args = parse_args(argv)
    try:
        {"train": train, "sample": sample, "likelihood": likelihood}[args.command](args)
    except BrokenPipeError:                                         # `... | head -1` read enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to say
        sys.exit(1)

if __name__ == "__main__":
    main()
