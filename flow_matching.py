"""Flow matching for images in one file: learn a velocity field, then ride it from noise to data.

Flow matching (Lipman et al. 2022) trains a network v(x, t) so that the ODE dx/dt = v(x, t) carries
noise x0 ~ N(0, I) at t=0 to data x1 at t=1 (minRF and Stable Diffusion 3 run time the other way).
For one data point x1 the optimal-transport (OT) path and its velocity are known in closed form,
and regressing on them is enough to learn the field:

    path    x_t = (1 - (1 - σ_min) t) x0 + t x1     so x_t | x1 ~ N(t x1, (1 - (1 - σ_min) t)² I)
    target  u   = d/dt x_t = x1 - (1 - σ_min) x0
    loss    L_CFM = E_{t, x0, x1} || v(x_t, t) - u ||²
    ODE     dx/dt = v(x, t) from x(0) ~ N(0, I) to x(1), a sample

Sections 1-8 are the method, up to the train and sample commands; then come the likelihood and the
plumbing (checkpoints, command line).

Usage:
    python flow_matching.py train --data-dir data --minutes 10      # writes runs/mnist/ckpt.pt
    python flow_matching.py sample --ckpt runs/mnist/ckpt.pt --out samples.png
    python flow_matching.py likelihood --ckpt runs/mnist/ckpt.pt --data-dir data     # bits/dim

References:
    Lipman, Chen, Ben-Hamu, Nickel, Le. Flow Matching for Generative Modeling. arXiv:2210.02747.
    Esser et al. Scaling Rectified Flow Transformers (logit-normal t). arXiv:2403.03206.
    Ho, Salimans. Classifier-Free Diffusion Guidance. arXiv:2207.12598.
    Karras et al. Guiding a Diffusion Model with a Bad Version of Itself. arXiv:2406.02507.
    Kynkäänniemi et al. Applying Guidance in a Limited Interval. arXiv:2404.07724.
    Grathwohl et al. FFJORD (Hutchinson's divergence estimator in flows). arXiv:1810.01367.
"""
import argparse
import copy
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import datasets
from torchvision.utils import save_image

def die(message):
    """A user's mistake: one line on stderr, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

# --- 1. Time embedding ----------------------------------------------------------------------------
# Sines and cosines of t at frequencies from 1 to 1000 radians per unit time: some features change
# slowly across [0, 1], others tell apart times 1e-3 apart.
def time_embedding(t, dim):
    freqs = torch.logspace(0, 3, dim // 2, device=t.device)         # ω_k = 1000^(k / (dim/2 - 1))
    angles = t[:, None].float() * freqs                             # (B, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)           # (B, dim)

# --- 2. Velocity network --------------------------------------------------------------------------
# v(x, t) has the shape of x. A small U-Net: residual blocks at resolutions 28, 14, 7 and 4, the
# time embedding added inside every block, and skip connections from each resolution on the way
# down to the same resolution on the way up.
class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)                           # the branch starts at 0

    # Tensors stay NCHW: PyTorch's GroupNorm on channels_last CPU tensors is up to 6x slower.
    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h

class VelocityNet(nn.Module):
    def __init__(self, widths=(32, 64, 128, 128), emb_dim=128):
        super().__init__()
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(1, widths[0], 3, padding=1)
        above = [widths[0]] + list(widths[:-1])                     # each level's input width
        self.down = nn.ModuleList(ResBlock(c_in, c, emb_dim) for c_in, c in zip(above, widths))
        self.pool = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for c in widths[:-1])
        self.mid = ResBlock(widths[-1], widths[-1], emb_dim)
        self.up = nn.ModuleList(ResBlock(2 * c, c_in, emb_dim) for c_in, c in zip(above, widths))
        self.head = nn.Sequential(
            nn.GroupNorm(8, widths[0]), nn.SiLU(), nn.Conv2d(widths[0], 1, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)

    def forward(self, x, t):
        emb = self.time_mlp(time_embedding(t, self.emb_dim))
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

# --- 3. The OT probability path -------------------------------------------------------------------
# Conditioned on a data point x1, x_t moves on a straight line from the noise x0 to (almost) x1:
# σ_min > 0 leaves a little noise at t=1 so that p_1(x | x1) = N(x1, σ_min² I) is not a point mass.
def ot_path(x0, x1, t, sigma_min):
    t = t.view(-1, *[1] * (x1.dim() - 1))                           # broadcast t over pixels
    xt = (1 - (1 - sigma_min) * t) * x0 + t * x1                    # (1 - (1 - σ_min) t) x0 + t x1
    u = x1 - (1 - sigma_min) * x0                                   # u = d/dt x_t
    return xt, u

def draw_t(n):
    """t for training, logit-normal (Esser et al. 2024): more weight on the middle of the path,
    where the target is most ambiguous. Any density positive on (0, 1) trains the same field."""
    return torch.sigmoid(torch.randn(n))                            # t = σ(s), s ~ N(0, 1)

# --- 4. The conditional flow matching loss --------------------------------------------------------
# Regressing on the marginal velocity (L_FM) is intractable; L_CFM regresses on u instead, and
# L_FM = L_CFM + C with C independent of v (Lipman et al., Theorem 2), so both have the same
# minimiser: the marginal velocity, the posterior mean of u given x_t.
def cfm_loss(model, x0, x1, t, sigma_min):
    xt, u = ot_path(x0, x1, t, sigma_min)
    return F.mse_loss(model(xt, t), u)                              # E || v(x_t, t) - u ||² / D

# --- 5. Data --------------------------------------------------------------------------------------
# Both data sets hold 28x28 grey images. The training set sits in memory as one uint8 tensor, and
# batches are gathered from it directly, which is faster than a per-image DataLoader.
DATASETS = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}

def load_images(name, root, train=True):
    """(N, 1, 28, 28) uint8 images; torchvision downloads them when it can."""
    kind = DATASETS[name]
    folder = os.path.join(root, kind.__name__, "raw")
    new_folders = missing_folders(folder)
    try:
        data = kind(root, train=train, download=True)
    except Exception:                                               # no files and no network
        for path in new_folders:                                    # leave no empty folders
            if os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)
        files = ", ".join(file for file, _ in kind.resources)
        die(f"{name} is not in {folder} and cannot be downloaded: put {files} there")
    return data.data[:, None].contiguous()

def missing_folders(path):
    """The folders on the way to `path` that do not exist yet, deepest first."""
    missing = []
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(os.path.abspath(path))
    return missing

def to_model_scale(pixels):
    return pixels.float() / 127.5 - 1                               # {0, ..., 255} → [-1, 1]

def to_unit_scale(x):
    return ((x + 1) / 2).clamp(0, 1)                                # [-1, 1] → [0, 1] for images

def draw_batch(images, batch_size):
    """Everything random in a step, from torch's global generator, whose state in the checkpoint
    makes a resumed run draw the same batches."""
    x1 = to_model_scale(images[torch.randint(len(images), (batch_size,))])    # x1 ~ p_data
    x0 = torch.randn_like(x1)                                       # x0 ~ N(0, I)
    return x0, x1, draw_t(batch_size)

# --- 6. Samplers ----------------------------------------------------------------------------------
# Generation integrates dx/dt = v(x, t) from t=0 (noise) to t=1 for any v(x, t): the network, or,
# in the tests, fields with known solutions. Error at t=1: O(h) for Euler, O(h⁴) for RK4.
def euler_step(v, x, t, h):
    return x + h * v(x, t)                                          # x_{t+h} = x_t + h v(x_t, t)

def rk4_step(v, x, t, h):
    k1 = v(x, t)
    k2 = v(x + h / 2 * k1, t + h / 2)
    k3 = v(x + h / 2 * k2, t + h / 2)
    k4 = v(x + h * k3, t + h)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

SOLVERS = {"euler": euler_step, "rk4": rk4_step}

def step_times(steps, solver, t0=0.0, t1=1.0):
    """Where each step starts, then t1. Euler takes equal steps. v changes fastest near the noise
    and near the data, where RK4's error gathers, so there RK4's steps are a third as long as
    mid-path: t = s - sin(2πs) / 4π at s = i / steps, a slope of 1/2 at the ends and 3/2 mid-way."""
    times = []
    for i in range(steps + 1):
        s = i / steps
        if solver == "rk4":
            s = s - math.sin(2 * math.pi * s) / (4 * math.pi)
        times.append(t0 + (t1 - t0) * s)
    return times

def integrate(v, x, steps, solver="rk4", t0=0.0, t1=1.0, trajectory=None):
    """x(t1) from x(t0) in `steps` steps of dx/dt = v(x, t); `trajectory` gets x after each."""
    times = step_times(steps, solver, t0, t1)
    for t, t_next in zip(times[:-1], times[1:]):
        x = SOLVERS[solver](v, x, t, t_next - t)
        if trajectory is not None:
            trajectory.append(x)
    return x

@torch.no_grad()
def generate(v, noise, steps, solver, trajectory=None):
    """Images in [0, 1]: noise at t=0 carried along v to t=1."""
    return to_unit_scale(integrate(v, noise, steps, solver, trajectory=trajectory))

# --- 7. Training ----------------------------------------------------------------------------------
# Adam on L_CFM, β₂ = 0.99 (a short memory, for short runs), gradient clipping; the learning rate
# warms up, then decays linearly to zero over the budget. Samples come from a moving average (EMA).
@dataclass
class RunConfig:
    """What defines a run. Its checkpoint keeps it (as nanoGPT keeps its model_args), so sample,
    likelihood and train --resume need nothing else. train's flags of the same names set it."""
    dataset: str = "mnist"                  # a key of DATASETS
    widths: tuple = (32, 64, 128, 128)      # U-Net channels at each resolution, from the top
    sigma_min: float = 0.0                  # noise left at t=1 on the OT path
    lr: float = 2e-3                        # peak learning rate of Adam
    batch_size: int = 128                   # images per optimizer step
    seed: int = 0                           # the same seed trains the same weights
    steps: int = None                       # stop after this many optimizer steps in all,
    minutes: float = None                   # or this many minutes of training (10 if neither)
    save_every: int = 1000                  # save ckpt.pt and a grid of samples this often (steps)

@dataclass
class TrainState:
    """What a run changes as it trains; its checkpoint holds all of it."""
    model: nn.Module
    ema: nn.Module                          # a moving average of the model's weights, to sample
    opt: torch.optim.Optimizer
    guide: dict = None                      # the EMA's weights a quarter of the way through
    step: int = 0
    elapsed: float = 0.0                    # seconds of training

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

def train_step(state, batch, lr, sigma_min, bf16):
    """One Adam step on L_CFM, then the EMA's; returns the loss."""
    for group in state.opt.param_groups:
        group["lr"] = lr
    x0, x1, t = batch
    with torch.autocast(x0.device.type, torch.bfloat16, enabled=bf16):
        loss = cfm_loss(state.model, x0, x1, t, sigma_min)
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(state.model.parameters(), 1.0)
    state.opt.step()
    ema_update(state.ema, state.model, state.step)
    return loss.item()

def train(args):
    config, ckpt = run_config(args)                                 # the flags, or the run's own
    device = pick_device()
    torch.manual_seed(config.seed)
    images = load_images(config.dataset, args.data_dir)
    model = build_model(config, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.99))
    state = TrainState(model, copy.deepcopy(model).requires_grad_(False), opt)
    if ckpt is not None:
        restore(state, ckpt)
    bf16 = use_bfloat16(device, args.fp32)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{config.dataset}: {len(images)} images on {device}"
          f"{' with bfloat16 autocast' if bf16 else ''}; {parameters / 1e6:.2f}M parameters; "
          f"from step {state.step}", flush=True)

    def next_batch():
        return [part.to(device) for part in draw_batch(images, config.batch_size)]
    stopped = run_steps(state, config, next_batch, bf16, args.out)
    if state.step % config.save_every or not os.path.exists(os.path.join(args.out, "ckpt.pt")):
        save_run(state, config, args.out)                           # unless the last step saved
    how = " on a stop signal" if stopped else ""
    print(f"step {state.step}, {state.elapsed / 60:.1f} min{how}: saved {args.out}/ckpt.pt and "
          f"{args.out}/samples_{state.step:06d}.png")

def run_steps(state, config, next_batch, bf16, out):
    """Train until the budget runs out or a stop signal comes; True if a signal stopped the run."""
    max_steps = config.steps or math.inf
    max_seconds = 60 * config.minutes if config.minutes else math.inf
    signals = catch_stop_signals()
    clock = time.perf_counter() - state.elapsed                     # a resumed run keeps its time
    start = (state.step, state.elapsed)                             # for the rate of this command
    last_line = state.elapsed
    while state.step < max_steps and state.elapsed < max_seconds and not signals:
        progress = max(state.step / max_steps, state.elapsed / max_seconds)  # whichever ends first
        lr = learning_rate(config.lr, state.step, progress)
        loss = train_step(state, next_batch(), lr, config.sigma_min, bf16)
        state.step += 1
        state.elapsed = time.perf_counter() - clock
        if state.guide is None and progress >= 0.25:                # autoguidance's guide
            state.guide = copy.deepcopy(state.ema.state_dict())
        if not math.isfinite(loss):
            die(f"the loss is {loss} at step {state.step}: try a lower --lr (ckpt.pt: last save)")
        if state.step == start[0] + 10 or state.elapsed - last_line >= 30:  # soon, then each 30 s
            line = log_line(state, config.batch_size, loss, start, max_steps, max_seconds)
            print(line, flush=True)
            last_line = state.elapsed
        if state.step % config.save_every == 0:
            save_run(state, config, out)
    return bool(signals)

def log_line(state, batch_size, loss, start, max_steps, max_seconds):
    """A log line: step, loss, images per second since this command started, and time left."""
    rate = (state.step - start[0]) * batch_size / (state.elapsed - start[1])
    left = min(max_seconds - state.elapsed, (max_steps - state.step) * batch_size / rate)
    return f"step {state.step:6d}  loss {loss:.4f}  {rate:6.1f} img/s  {left / 60:5.1f} min left"

# --- 8. Sampling, with autoguidance ---------------------------------------------------------------
# Guidance pushes v away from a weaker prediction of it: v_weak + w (v - v_weak) with w > 1 (as
# classifier-free guidance pushes away from the network without the label; Ho & Salimans 2022).
# Autoguidance (Karras et al. 2024) takes for v_weak the same network early in its training, the
# guide, whose errors are those of the final network, only larger. `sample` uses w = 2.5, mid-path
# only (Kynkäänniemi et al. 2024): guiding at t < 0.2 costs fd, and at t > 0.8 it buys little.
def guided_field(model, guide=None, w=1.0, times=(0.2, 0.8)):
    """The network as the samplers' v(x, t), t a number; with a guide, guided with weight w where
    times[0] ≤ t ≤ times[1]. v.passes counts the networks' passes over single images."""
    def v(x, t):
        guided = guide is not None and w != 1 and times[0] <= t <= times[1]
        v.passes += len(x) * (2 if guided else 1)                   # the network, and its guide
        t = torch.full((len(x),), t, device=x.device)
        v_model = model(x, t)
        if not guided:
            return v_model
        v_guide = guide(x, t)
        return v_guide + w * (v_model - v_guide)                    # v_guide + w (v - v_guide)
    v.passes = 0
    return v

def autoguidance_weight(args, guide):
    """--autoguidance, 2.5 by default; 1, the network alone, for a run without a guide."""
    if guide is not None:
        return 2.5 if args.autoguidance is None else args.autoguidance
    if args.autoguidance not in (None, 1.0):
        die(f"{args.ckpt} holds no guide for --autoguidance: its run ended before a quarter of it")
    return 1.0

def sample(args):
    config, model, guide, device = load_model(args)
    autoguidance = autoguidance_weight(args, guide)
    noise = torch.randn(args.n, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed))
    noise = noise.to(device)
    frames = [noise[:128]] if args.trajectory else None             # x_t of the first chunk
    start = time.perf_counter()
    images = []
    v = guided_field(model, guide, autoguidance)
    bf16 = use_bfloat16(device, args.fp32)                          # as in train; x stays float32
    for i, chunk in enumerate(noise.split(128)):                    # 128 at a time stay in cache
        trajectory = frames if i == 0 else None
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            images.append(generate(v, chunk, args.steps, args.solver, trajectory))
    print(f"{args.n} samples in {time.perf_counter() - start:.1f} s: {args.solver}, {args.steps} "
          f"steps, autoguidance {autoguidance:g}, {v.passes / args.n:g} network evaluations each")
    if args.out:
        write_images(torch.cat(images).cpu(), args.out, math.ceil(math.sqrt(args.n)))
    if args.trajectory:                                             # a row per sample
        rows = to_unit_scale(torch.stack([x[:8] for x in frames], 1).flatten(0, 1))
        write_images(rows.cpu(), args.trajectory, nrow=len(frames))

def load_model(args):
    """The run's settings, its EMA as a model, its guide (or None) and the device they are on."""
    device = pick_device()
    ckpt, config = load_checkpoint(args.ckpt)
    model = build_model(config, ckpt["ema"], device).eval().requires_grad_(False)
    guide = None
    if ckpt["guide"] is not None:
        guide = build_model(config, ckpt["guide"], device).eval().requires_grad_(False)
    return config, model, guide, device

def write_images(images, path, nrow):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".pt"):
        torch.save(images, path)                                    # (N, 1, 28, 28) in [0, 1]
    else:
        save_image(images, path, nrow=nrow)
    print(f"wrote {path}")

# --- 9. Likelihood --------------------------------------------------------------------------------
# The flow also gives exact densities. Along a trajectory the continuity equation reads
# d/dt log p_t(x_t) = -div v(x_t, t), so log p_1(x1) = log N(x0; 0, I) - ∫_0^1 div v(x_t, t) dt,
# where x0 is x1 carried back to t=0. We integrate x and the divergence together, from t=1 to 0.
def divergence(v, x, t, noise):
    """v(x, t) and Hutchinson's estimate of its divergence, εᵀ (∂v/∂x) ε, from one vector-Jacobian
    product: unbiased for noise ε with E[ε εᵀ] = I, such as random signs."""
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        vx = v(x, t)
        vjp = torch.autograd.grad(vx, x, noise)[0]                  # εᵀ J
    return vx.detach(), (vjp * noise).flatten(1).sum(1)             # εᵀ J ε

def log_likelihood(v, x1, steps, solver="rk4"):
    """log p_1(x1) under the flow of v, one number per sample."""
    dim = x1[0].numel()
    noise = torch.randint(0, 2, x1.shape, dtype=x1.dtype, device=x1.device) * 2 - 1  # ε = ±1

    def augmented(z, t):                                            # z = (x, ∫ div v dt)
        vx, div = divergence(v, z[:, :dim].view_as(x1), t, noise)
        return torch.cat([vx.flatten(1), div[:, None]], dim=1)

    z = torch.cat([x1.flatten(1), x1.new_zeros(len(x1), 1)], dim=1)
    z = integrate(augmented, z, steps, solver, t0=1.0, t1=0.0)
    x0 = z[:, :dim]
    int_div = z[:, dim]                                             # ∫_1^0 div v = -∫_0^1 div v
    log_p0 = -0.5 * (x0 ** 2).sum(1) - 0.5 * dim * math.log(2 * math.pi)   # log N(x0; 0, I)
    return log_p0 + int_div

def bits_per_dim(pixels, v, steps, solver):
    """Bits/dim of 8-bit images. pixel + U[0, 1) has a density on [0, 256)^D, and
    x = (pixel + U - 1/2) / 127.5 - 1 puts it on the model's scale, so
    bits/dim = -(log p_x(x) - D ln 127.5) / (D ln 2)."""
    x = to_model_scale(pixels.float() + torch.rand(pixels.shape, device=pixels.device) - 0.5)
    dim = x[0].numel()
    log_px = log_likelihood(v, x, steps, solver)
    return -(log_px - dim * math.log(127.5)) / (dim * math.log(2))

def likelihood(args):
    config, model, _, device = load_model(args)
    images = load_images(config.dataset, args.data_dir, train=False)
    torch.manual_seed(args.seed)                                    # which images, U and ε
    pixels = images[torch.randperm(len(images))[:args.n]].to(device)
    v = guided_field(model)
    start = time.perf_counter()
    bpd = [bits_per_dim(chunk, v, args.steps, args.solver) for chunk in pixels.split(128)]
    bpd = torch.cat(bpd).cpu()
    print(f"{bpd.mean():.3f} ± {bpd.std() / math.sqrt(len(bpd)):.3f} bits/dim on {len(bpd)} "
          f"{config.dataset} test images in {time.perf_counter() - start:.1f} s: {args.solver}, "
          f"{args.steps} steps, {v.passes / len(bpd):g} network evaluations (and gradients) each")

# --- 10. Checkpoints and devices ------------------------------------------------------------------
CHECKPOINT_KEYS = {"config", "model", "ema", "optimizer", "guide", "step", "elapsed", "rng"}
EXTENDABLE = {"steps", "minutes", "save_every"}                     # what --resume may change

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
    noise = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    device = next(state.ema.parameters()).device
    grid = generate(guided_field(state.ema), noise.to(device), 5, "rk4")
    save_image(grid, os.path.join(folder, f"samples_{state.step:06d}.png"), nrow=8)

def load_checkpoint(path):
    """A checkpoint and its RunConfig. weights_only=True: unpickling runs no code from the file."""
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
    state.model.load_state_dict(ckpt["model"])
    state.ema.load_state_dict(ckpt["ema"])
    state.opt.load_state_dict(ckpt["optimizer"])
    state.guide = ckpt["guide"]
    state.step = ckpt["step"]
    state.elapsed = ckpt["elapsed"]
    torch.set_rng_state(ckpt["rng"])

def run_config(args):
    """The run's settings and, with --resume, its checkpoint. A new run takes the flags given over
    RunConfig's defaults; a resumed one keeps its own, and only its budget may change."""
    given = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
    if not args.resume:
        if "steps" not in given and "minutes" not in given:
            given["minutes"] = 10.0
        return RunConfig(**given), None
    ckpt, stored = load_checkpoint(os.path.join(args.out, "ckpt.pt"))
    for name, value in given.items():
        flag = "--" + name.replace("_", "-")
        if name not in EXTENDABLE and value != getattr(stored, name):
            die(f"{flag} {shown(value)} would change the run in {args.out}, trained with "
                f"{flag} {shown(getattr(stored, name))}: --resume continues a run as set up")
    extended = {name: value for name, value in given.items() if name in EXTENDABLE}
    if "steps" in extended or "minutes" in extended:                # a new budget replaces the old
        extended = {"steps": None, "minutes": None, **extended}
    return replace(stored, **extended), ckpt

def shown(value):
    """A setting's value as it reads on the command line: widths as 32,64,128,128."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

def build_model(config, state=None, device="cpu"):
    """The network a config describes, with the weights `state` if given."""
    model = VelocityNet(config.widths)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device)

def pick_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

def use_bfloat16(device, fp32):
    """bfloat16 where it is native: CUDA, or a CPU with AVX-512 BF16; float32 elsewhere."""
    if fp32:
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    detect = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private; older torch lacks it
    return torch.backends.mkldnn.is_available() and detect is not None and detect()

def catch_stop_signals():
    """A list that Ctrl-C and SIGTERM append to instead of killing the run, which then saves."""
    caught = []
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda number, frame: caught.append(number))
    return caught

# --- 11. Command line -----------------------------------------------------------------------------
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
    if default is not None:
        help += f" (default {shown(default)})"
    flag = "--" + name.replace("_", "-")
    parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help, **kwargs)

TRAIN_NOTE = """A run stops at --steps or --minutes, whichever comes first; its learning rate
decays to zero there. --resume continues the run in --out as it was set up, and a --steps or
--minutes given with it replaces the budget: the decay then stretches to the new end."""

def train_flags(parser):
    config_flag(parser, "dataset", "torchvision data set", choices=sorted(DATASETS))
    config_flag(parser, "steps", "stop after this many optimizer steps in all", type=COUNT)
    config_flag(parser, "minutes", "stop after this many minutes of training in all "
                "(default 10 if --steps is not given)", type=POSITIVE)
    config_flag(parser, "batch_size", "images per optimizer step", type=COUNT)
    config_flag(parser, "lr", "peak learning rate of Adam", type=POSITIVE)
    config_flag(parser, "widths", "U-Net channels per resolution, from the top", type=WIDTHS)
    config_flag(parser, "sigma_min", "noise left at t=1 on the OT path", type=FRACTION)
    config_flag(parser, "seed", "the same seed trains the same weights", type=SEED)
    config_flag(parser, "save_every", "save ckpt.pt and a grid every this many steps", type=COUNT)
    parser.add_argument("--out", default="runs/mnist", help="run folder (default %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")

def sample_flags(parser):
    parser.add_argument("--steps", type=COUNT, default=5, help="solver steps (default %(default)s)")
    parser.add_argument("--n", type=COUNT, default=64, help="samples (default %(default)s)")
    parser.add_argument("--out", help=".png for a grid, .pt for a tensor (N, 1, 28, 28) in [0, 1] "
                        "(default samples.png, unless --trajectory is all that is asked)")
    parser.add_argument("--autoguidance", type=WEIGHT, metavar="WEIGHT",
                        help="1 is the network alone (default 2.5, or 1 for a run without a guide)")
    parser.add_argument("--trajectory", help="also save x_t from noise to image for 8 samples, "
                        "a row each, to this .png")

def parse_args(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    data = Parser(add_help=False)
    data.add_argument("--data-dir", default="./data",
                      help="the data set's folder; torchvision downloads it there (default ./data)")
    reader = Parser(add_help=False)
    reader.add_argument("--ckpt", required=True, help="checkpoint written by train")
    reader.add_argument("--solver", default="rk4", choices=sorted(SOLVERS),
                        help="ODE solver (default %(default)s)")
    reader.add_argument("--seed", type=SEED, default=0, help="same seed, same draws (default 0)")
    precision = Parser(add_help=False)                              # train's and sample's
    precision.add_argument("--fp32", action="store_true",
                           help="no bfloat16 autocast (on by itself on CUDA and AVX-512 BF16 CPUs)")
    train_flags(commands.add_parser("train", parents=[data, precision], description=TRAIN_NOTE,
                                    help="train a velocity network"))
    sample_flags(commands.add_parser("sample", parents=[reader, precision], help="draw samples"))
    lk = commands.add_parser("likelihood", parents=[data, reader], help="bits/dim")
    lk.add_argument("--n", type=checked(int, lambda n: n > 1, "integer above 1"), default=1000,
                    help="test images, 2 or more for the ±, a standard error (default %(default)s)")
    lk.add_argument("--steps", type=COUNT, default=20, help="solver steps (default %(default)s)")
    args = parser.parse_args(argv)
    check_outputs(args)
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
        if args.out:
            check_writable(args.out, (".png", ".pt"))
        if args.trajectory:
            check_writable(args.trajectory, (".png",))

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
    commands = {"train": train, "sample": sample, "likelihood": likelihood}
    commands[args.command](args)

if __name__ == "__main__":
    main()
