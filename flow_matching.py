"""Flow matching for images in one file: learn a velocity field, then ride it from noise to data.

Flow matching (Lipman et al. 2022) trains a network v(x, t) so that the ODE dx/dt = v(x, t) carries
noise x0 ~ N(0, I) at t=0 to data x1 at t=1 (minRF and Stable Diffusion 3 run time the other way).
For one data point x1 the optimal-transport (OT) path and its velocity are known in closed form,
and regressing on them is enough to learn the field:

    path    x_t = (1 - (1 - σ_min) t) x0 + t x1       so x_t | x1 ~ N(t x1, (1 - (1 - σ_min) t)² I)
    target  u   = d/dt x_t = x1 - (1 - σ_min) x0
    loss    L_CFM = E_{t, x0, x1} || v(x_t, t) - u ||²
    ODE     dx/dt = v(x, t) from x(0) ~ N(0, I) to x(1), a sample

Usage:
    python flow_matching.py train --data-dir data --minutes 10      # writes runs/mnist/ckpt.pt
    python flow_matching.py sample --ckpt runs/mnist/ckpt.pt --solver rk4 --steps 5 --out s.png
    python flow_matching.py likelihood --ckpt runs/mnist/ckpt.pt --data-dir data     # bits/dim

References:
    Lipman, Chen, Ben-Hamu, Nickel, Le. Flow Matching for Generative Modeling. arXiv:2210.02747, 2022.
    Grathwohl et al. FFJORD (Hutchinson's divergence estimator in flows). arXiv:1810.01367, 2018.
    Ho, Salimans. Classifier-Free Diffusion Guidance. arXiv:2207.12598, 2022.
    Karras et al. Guiding a Diffusion Model with a Bad Version of Itself (autoguidance). arXiv:2406.02507, 2024.
    Esser et al. Scaling Rectified Flow Transformers (logit-normal t). arXiv:2403.03206, 2024.
"""
import argparse
import copy
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import datasets
from torchvision.utils import save_image

def die(message):
    """A user's mistake: one line on stderr (from the first process only, under torchrun) and exit code 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

# --- 1. Time embedding ----------------------------------------------------------------------------
# Sines and cosines of t at frequencies from 1 to 1000 radians per unit time: some features change
# slowly across [0, 1], others tell apart times 1e-3 apart.
def time_embedding(t, dim):
    freqs = torch.logspace(0, 3, dim // 2, device=t.device)        # ω_k = 1000^(k / (dim/2 - 1))
    angles = t[:, None].float() * freqs                               # (B, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)             # (B, dim)

# --- 2. Velocity network --------------------------------------------------------------------------
# v(x, t) has the shape of x. A small U-Net: residual blocks at resolutions 28, 14, 7, 4 for MNIST
# (32 down to 4 for CIFAR-10), the time embedding added inside every block, and skip connections
# from each resolution on the way down to the same resolution on the way up.
class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)                             # the residual branch starts near 0

    def forward(self, x, emb):  # GroupNorm in float32: PyTorch's bfloat16 one on channels_last CPU tensors is 10x slower
        h = self.conv1(F.silu(self.norm1(x.float()))) + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h.float())))
        return self.skip(x) + h

class VelocityNet(nn.Module):
    def __init__(self, channels=1, widths=(32, 64, 128, 128), emb_dim=128, classes=0):
        super().__init__()
        self.emb_dim, self.classes = emb_dim, classes
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(classes + 1, emb_dim) if classes else None  # label `classes` = none
        self.stem = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList(ResBlock(a, b, emb_dim) for a, b in zip(widths[:1] + widths[:-1], widths))
        self.pool = nn.ModuleList([nn.Conv2d(w, w, 3, stride=2, padding=1) for w in widths[:-1]] + [nn.Identity()])
        self.mid = ResBlock(widths[-1], widths[-1], emb_dim)
        self.up = nn.ModuleList(ResBlock(2 * b, a, emb_dim) for a, b in zip(widths[:1] + widths[:-1], widths))
        self.head = nn.Sequential(nn.GroupNorm(8, widths[0]), nn.SiLU(), nn.Conv2d(widths[0], channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)

    def forward(self, x, t, y=None):
        emb = self.time_mlp(time_embedding(t, self.emb_dim))
        if self.classes:                                              # no label given: the null label
            emb = emb + self.label_emb(torch.full_like(t, self.classes, dtype=torch.long) if y is None else y)
        h, skips = self.stem(x), []
        for block, pool in zip(self.down, self.pool):
            skips.append(block(h, emb))
            h = pool(skips[-1])                                       # halve the resolution (not the last)
        h = self.mid(h, emb)
        for up, skip in zip(reversed(self.up), reversed(skips)):      # back to each skip's resolution
            h = up(torch.cat([F.interpolate(h, size=skip.shape[-2:]), skip], dim=1), emb)
        return self.head(h.float())

# --- 3. The OT probability path -------------------------------------------------------------------
# Conditioned on a data point x1, x_t moves on a straight line from the noise x0 to (almost) x1:
# σ_min > 0 leaves a little noise at t=1 so that p_1(x | x1) = N(x1, σ_min² I) is not a point mass.
def ot_path(x0, x1, t, sigma_min):
    t = t.view(-1, *[1] * (x1.dim() - 1))                             # broadcast t over pixels
    xt = (1 - (1 - sigma_min) * t) * x0 + t * x1                      # x_t = (1 - (1 - σ_min) t) x0 + t x1
    u = x1 - (1 - sigma_min) * x0                                     # u = d/dt x_t = x1 - (1 - σ_min) x0
    return xt, u

def draw_t(n):
    """t for training. Logit-normal (Esser et al. 2024): more weight on the middle of the path,
    where the target is most ambiguous; any density that is positive on (0, 1) trains the same field."""
    return torch.sigmoid(torch.randn(n))                              # t = σ(s), s ~ N(0, 1)

# --- 4. The conditional flow matching loss --------------------------------------------------------
# Regressing on the marginal velocity (L_FM) is intractable; L_CFM regresses on u instead, and
# L_FM = L_CFM + C with C independent of v (Theorem 1 of seed 000), so both have the same minimiser:
# the marginal velocity, the posterior mean of u given x_t.
def cfm_loss(model, x0, x1, t, sigma_min, y=None):
    xt, u = ot_path(x0, x1, t, sigma_min)
    return F.mse_loss(model(xt, t, y).float(), u)                     # L_CFM = E || v(x_t, t) - u ||² / D

# --- 5. Data --------------------------------------------------------------------------------------
# The training set sits in memory as one uint8 tensor; batches are gathered from it directly, which
# is faster than a per-image DataLoader. Pixels map to [-1, 1].
DATASETS = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}

def load_images(name, root, train=True):
    """(N, C, H, W) uint8 images and (N,) labels; torchvision downloads them when it can."""
    kind = DATASETS[name]
    try:
        data = kind(root, train=train, download=True)
    except Exception:
        folder, files = (os.path.join(root, kind.__name__, "raw"), [f for f, _ in kind.resources]) \
            if hasattr(kind, "resources") else (root, [kind.filename])
        die(f"{name} is not in {folder} and cannot be downloaded: put {', '.join(files)} there")
    images = torch.as_tensor(data.data)
    images = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(data.targets)

def to_model_scale(pixels):
    return pixels.float() / 127.5 - 1                                 # {0, ..., 255} → [-1, 1]

def to_unit_scale(x):
    return ((x + 1) / 2).clamp(0, 1)                                  # [-1, 1] → [0, 1] for images

# --- 6. Samplers ----------------------------------------------------------------------------------
# Generation integrates dx/dt = v(x, t) from t=0 (noise) to t=1 for any v(x, t) (the tests hand in fields
# with known solutions). Error at t=1: O(h) for Euler, O(h⁴) for RK4. v changes fastest near the noise and
# near the data, where RK4's error gathers, so its steps there are a third as long as mid-path ones.
def euler_step(v, x, t, h):
    return x + h * v(x, t)                                            # x_{t+h} = x_t + h v(x_t, t)

def rk4_step(v, x, t, h):
    k1 = v(x, t)
    k2 = v(x + h / 2 * k1, t + h / 2)
    k3 = v(x + h / 2 * k2, t + h / 2)
    k4 = v(x + h * k3, t + h)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

SOLVERS = {"euler": (euler_step, 1, 0.0), "rk4": (rk4_step, 4, 0.5)}  # (step, NFE per step, a of the grid)

def integrate(v, x, steps, solver="rk4", t0=0.0, t1=1.0, trajectory=None):
    """x(t1) from x(t0) in `steps` steps, and the number of evaluations of v (NFE); a `trajectory` list gets each x."""
    step, evals, a = SOLVERS[solver]                                  # s = i / steps, t = s - a sin(2πs) / 2π
    times = [t0 + (t1 - t0) * (s - a * math.sin(2 * math.pi * s) / (2 * math.pi)) for s in (i / steps for i in range(steps + 1))]
    for t, t_next in zip(times, times[1:]):
        x = step(v, x, t, t_next - t)
        if trajectory is not None:
            trajectory.append(x)
    return x, steps * evals

# Guidance pushes v away from a weaker prediction of it, to v_weak + w (v - v_weak) with w > 1. For classifier-free
# guidance v_weak is the network without the label; for autoguidance, the same network early in training: same errors, larger.
def guided(v, v_weak, w):
    """v_weak + w (v - v_weak) as a field: w = 0 is v_weak, w = 1 is v (one network pass), w > 1 goes past v."""
    def field(x, t):
        weak = v_weak(x, t)
        return weak + w * (v(x, t) - weak)
    return v if w == 1 else field

def velocity_field(model, y=None, guidance=1.0, guide=None, autoguidance=1.0):
    """The network as the samplers' v(x, t), guided by labels y (weight `guidance`) and by an earlier network `guide`."""
    def net(m, labels):
        return lambda x, t: m(x, torch.full((len(x),), t, device=x.device), labels)
    def conditional(m):                                               # v_null + w (v_y - v_null)
        return net(m, y) if y is None else guided(net(m, y), net(m, torch.full_like(y, m.classes)), guidance)
    return conditional(model) if guide is None else guided(conditional(model), conditional(guide), autoguidance)

@torch.no_grad()
def generate(model, noise, steps, solver, y=None, guidance=1.0, guide=None, autoguidance=1.0, trajectory=None):
    x, nfe = integrate(velocity_field(model, y, guidance, guide, autoguidance), noise, steps, solver, trajectory=trajectory)
    return to_unit_scale(x), nfe

# --- 7. Likelihood --------------------------------------------------------------------------------
# The flow also gives exact densities. Along a trajectory the continuity equation (seed 000) reads
# d/dt log p_t(x_t) = -div v(x_t, t), so log p_1(x1) = log N(x0; 0, I) - ∫_0^1 div v(x_t, t) dt, where
# x0 is x1 carried back to t=0. We integrate x and the divergence together, from t=1 down to t=0.
def divergence(v, x, t, noise=None):
    """v(x, t) and its divergence: Hutchinson's estimate E_ε[εᵀ (∂v/∂x) ε] with one vector-Jacobian
    product for Rademacher noise ε, or, with noise=None, the exact trace (one product per dimension)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        vx = v(x, t)
        if noise is not None:
            div = (torch.autograd.grad(vx, x, noise)[0] * noise).flatten(1).sum(1)   # εᵀ J ε
        else:                                                                        # Σ_i ∂v_i/∂x_i
            div = sum(torch.autograd.grad(vx.flatten(1)[:, i].sum(), x, retain_graph=True)[0].flatten(1)[:, i]
                      for i in range(x[0].numel()))
    return vx.detach(), div.detach()

def log_likelihood(v, x1, steps, solver="rk4", exact=False):
    """log p_1(x1) of the flow of v, per sample, and the NFE."""
    d = x1[0].numel()
    noise = None if exact else torch.randint(0, 2, x1.shape, device=x1.device).float() * 2 - 1  # ε = ±1
    def augmented(z, t):                                              # z = (x, ∫ div v dt)
        vx, div = divergence(v, z[:, :d].view_as(x1), t, noise)
        return torch.cat([vx.flatten(1), div[:, None]], dim=1)
    z = torch.cat([x1.flatten(1), x1.new_zeros(len(x1), 1)], dim=1)
    z, nfe = integrate(augmented, z, steps, solver, t0=1.0, t1=0.0)
    x0, int_div = z[:, :d], z[:, d]                                   # int_div = ∫_1^0 div = -∫_0^1 div
    log_p0 = -0.5 * (x0 ** 2).sum(1) - 0.5 * d * math.log(2 * math.pi)  # log N(x0; 0, I)
    return log_p0 + int_div, nfe

def bits_per_dim(pixels, log_likelihood_of):
    """Bits/dim of 8-bit images: pixel + U[0, 1) has a density on [0, 256)^D; x = (pixel + U - 1/2) / 127.5 - 1
    puts it on the model's scale, so bits/dim = -(log p_x(x) - D ln 127.5) / (D ln 2)."""
    x = to_model_scale(pixels.float() + torch.rand(pixels.shape, device=pixels.device) - 0.5)
    (log_px, nfe), d = log_likelihood_of(x), x[0].numel()
    return -(log_px - d * math.log(127.5)) / (d * math.log(2)), nfe

# --- 8. Training ----------------------------------------------------------------------------------
# AdamW on L_CFM with gradient clipping; the learning rate warms up, then decays linearly to zero over
# the run's budget (steps or minutes). Samples come from an exponential moving average (EMA) of the weights.
def learning_rate(peak, step, progress, warmup=200):
    return peak * min(1.0, (step + 1) / warmup) * max(0.0, 1.0 - progress)

@torch.no_grad()
def ema_update(ema, model, step, decay=0.999):
    d = min(decay, (1 + step) / (10 + step))                          # short memory while the run is young
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)                                             # e ← d e + (1 - d) p

def load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"no checkpoint at {path}" if isinstance(e, FileNotFoundError) else f"{path} is not a readable checkpoint")
    if not isinstance(ckpt, dict) or not {"model", "ema", "optimizer", "step", "elapsed", "config", "rng"} <= ckpt.keys():
        die(f"{path} is not a flow_matching.py checkpoint")
    return ckpt

def build_model(config, state=None, device="cpu"):
    try:
        model = VelocityNet(config["channels"], config["widths"], classes=config["classes"])
        if state is not None:
            model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as e:
        die(f"the checkpoint does not match this version of flow_matching.py ({type(e).__name__})")
    return model.to(device, memory_format=torch.channels_last)

def pick_device(name):
    available = dict(cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available(), cpu=True)
    name = next(d for d in available if available[d]) if name == "auto" else name
    if not available[name]:
        die(f"--device {name} is not available on this machine")
    return torch.device(name)

def draw_batch(images, labels, batch_size, classes=0, flip=False, p_drop=0.1):
    """Everything random in a step, from torch's global generator on the CPU, whose state in the checkpoint
    makes a resumed run repeat the same batches. Each label becomes the null label with probability p_drop."""
    idx = torch.randint(len(images), (batch_size,))
    x1 = to_model_scale(images[idx])
    x1 = torch.where(torch.rand(batch_size, 1, 1, 1) < 0.5, x1.flip(-1), x1) if flip else x1  # mirror half of them
    y = torch.where(torch.rand(batch_size) < p_drop, classes, labels[idx])
    return torch.randn_like(x1), x1, draw_t(batch_size), y            # x0 ~ N(0, I), x1 ~ p_data, t, y

def setup_processes(args):
    """Rank, number of processes and device; several under torchrun, which sets WORLD_SIZE."""
    device, world = pick_device(args.device), int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, device
    if args.batch_size % world:
        die(f"--batch-size {args.batch_size} does not split evenly over {world} processes")
    if device.type == "cuda":
        if torch.cuda.device_count() < int(os.environ["LOCAL_WORLD_SIZE"]):
            die(f"--nproc_per_node {os.environ['LOCAL_WORLD_SIZE']} is more than the {torch.cuda.device_count()} GPUs here")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device

def agreed(values):
    """The largest of each number over all processes, so that they all stop and schedule alike."""
    if not dist.is_initialized():
        return values
    values = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.tolist()

def train_step(net, ema, opt, batch, lr, step, args):
    """One AdamW step on L_CFM; `net` is the model or its DDP wrapper."""
    for group in opt.param_groups:
        group["lr"] = lr
    x0, x1, t, y = batch
    with torch.autocast(x0.device.type if args.bf16 else "cpu", torch.bfloat16, enabled=args.bf16):  # older torch has no MPS autocast
        loss = cfm_loss(net, x0, x1, t, args.sigma_min, y if args.class_cond else None)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    ema_update(ema, getattr(net, "module", net), step)
    return loss.item()

def start_run(args, images, labels, device):
    """Model, EMA, optimizer and position (step, seconds) of a new run, or of the one in --out."""
    config = dict(dataset=args.dataset, channels=images.shape[1], size=images.shape[2],
                  widths=args.widths, classes=int(labels.max()) + 1 if args.class_cond else 0, sigma_min=args.sigma_min)
    model = build_model(config, device=device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    run = dict(config=config, model=model, ema=ema, opt=opt, step=0, elapsed=0.0, guide=None)
    if args.resume:
        ckpt = load_checkpoint(os.path.join(args.out, "ckpt.pt"))
        if ckpt["config"] != config:
            changed = ", ".join(f"{k} {v} (now {config.get(k)})" for k, v in ckpt["config"].items() if config.get(k) != v)
            die(f"--resume: the run in {args.out} was trained with other settings: {changed}")
        model.load_state_dict(ckpt["model"]), ema.load_state_dict(ckpt["ema"]), opt.load_state_dict(ckpt["optimizer"])
        run.update(step=ckpt["step"], elapsed=ckpt["elapsed"], guide=ckpt.get("guide"))
        torch.set_rng_state(ckpt["rng"])
    return run

def save_run(run, args, noise):
    state = dict(model=run["model"].state_dict(), ema=run["ema"].state_dict(), optimizer=run["opt"].state_dict(),
                 step=run["step"], elapsed=run["elapsed"], config=run["config"], rng=torch.get_rng_state(), guide=run["guide"])
    path = os.path.join(args.out, "ckpt.pt")
    torch.save(state, path + ".tmp")                                  # a crash mid-write leaves the old file
    os.replace(path + ".tmp", path)
    save_image(generate(run["ema"], noise, 5, "rk4")[0], os.path.join(args.out, f"samples_{run['step']:06d}.png"), nrow=8)

def train(args):
    rank, world, device = setup_processes(args)
    torch.manual_seed(args.seed)                                      # the same on every process
    images, labels = load_images(args.dataset, args.data_dir)
    cpu_bf16 = torch.backends.mkldnn.is_available() and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    native_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and cpu_bf16
    args.bf16 = native_bf16 and not args.fp32                         # emulated bfloat16 is slower than float32
    run = start_run(args, images, labels, device)
    model, step = run["model"], run["step"]
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    log = print if rank == 0 else lambda *a, **k: None
    log(f"{args.dataset}: {len(images)} images of {tuple(images.shape[1:])} on {world} x {device}"
        f"{' with bfloat16 autocast' if args.bf16 else ''}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; from step {step}")
    noise = torch.randn(64, *images.shape[1:], generator=torch.Generator().manual_seed(0)).to(device)
    stop = []                                                         # Ctrl-C and SIGTERM end the run cleanly
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, frame: stop.append(number))
    steps, budget = args.steps or math.inf, 60 * (args.minutes or (math.inf if args.steps else 10))
    start, first, stopped = time.perf_counter() - run["elapsed"], (run["elapsed"], step), False
    while step < steps and run["elapsed"] < budget and not stopped:
        progress = max(step / steps, run["elapsed"] / budget)         # whichever budget runs out first
        batch = draw_batch(images, labels, args.batch_size, run["config"]["classes"], args.dataset == "cifar10")
        batch = [a[rank::world].to(device) for a in batch]           # this process's share of the batch
        loss = train_step(net, run["ema"], run["opt"], batch, learning_rate(args.lr, step, progress), step, args)
        step = run["step"] = step + 1
        if run["guide"] is None and progress >= 0.25:                 # autoguidance's guide: the EMA a quarter of the way in
            run["guide"] = copy.deepcopy(run["ema"].state_dict())
        run["elapsed"], stopped, worst = agreed([time.perf_counter() - start, float(bool(stop)), loss])
        if not math.isfinite(worst):                                  # NaN weights reach every process
            die(f"the loss is {worst} at step {step}; ckpt.pt, if any, is from the last save (try a lower --lr)")
        if step % 100 == 0:
            rate = (step - first[1]) * args.batch_size / (run["elapsed"] - first[0])
            left = min(budget - run["elapsed"], (steps - step) * args.batch_size / rate)
            log(f"step {step:6d}  loss {loss:.4f}  {rate:6.1f} img/s  {left / 60:5.1f} min left", flush=True)
        if step % args.save_every == 0 and rank == 0:
            save_run(run, args, noise)
    if rank == 0 and step % args.save_every:                          # unless the loop has just saved it
        save_run(run, args, noise)
    log(f"saved {args.out}/ckpt.pt at step {step} ({run['elapsed'] / 60:.1f} min)" + (" on a stop signal" if stopped else ""))
    if world > 1:
        dist.destroy_process_group()

# --- 9. Command line ------------------------------------------------------------------------------
def load_model(args):
    """The checkpoint --ckpt; its EMA weights and its guide (None before a quarter of the run) as models on --device; the device."""
    device, ckpt = pick_device(args.device), load_checkpoint(args.ckpt)
    model, guide = (build_model(ckpt["config"], w, device).eval().requires_grad_(False) if w else None for w in (ckpt["ema"], ckpt.get("guide")))
    return ckpt, model, guide, device

def sample(args):
    ckpt, model, guide, device = load_model(args)
    c, s, classes = ckpt["config"]["channels"], ckpt["config"]["size"], model.classes
    noise = torch.randn(args.n, c, s, s, generator=torch.Generator().manual_seed(args.seed)).to(device)
    if args.label is not None and not 0 <= args.label < classes or args.guidance != 1 and not classes:
        die(f"--label must be in 0..{classes - 1}, got {args.label}" if classes else "--label and --guidance need a --class-cond model")
    if guide is None and args.autoguidance not in (None, 1):
        die(f"{args.ckpt} holds no guide for --autoguidance: its run ended before a quarter of its budget, or predates autoguidance")
    w = 1.0 if guide is None else 2.0 if args.autoguidance is None else args.autoguidance
    draw = lambda noise, y, frames=None: generate(model, noise, args.steps, args.solver, y, args.guidance, guide, w, frames)
    nrow = math.ceil(args.n / classes) if classes and args.label is None else math.ceil(math.sqrt(args.n))
    y = None if not classes else (torch.full((args.n,), args.label) if args.label is not None  # no --label: a row per class
                                  else torch.arange(args.n) // nrow).to(device)
    start = time.perf_counter()                                       # 128 at a time stay in the CPU's caches
    x, nfe = zip(*(draw(noise[i:i + 128], y if y is None else y[i:i + 128]) for i in range(0, args.n, 128)))
    x, nfe = torch.cat(x).cpu(), nfe[0]
    torch.save(x.contiguous(), args.out) if args.out.endswith(".pt") else save_image(x, args.out, nrow=nrow)
    print(f"wrote {args.n} samples to {args.out}: {args.solver}, {nfe} NFE, {f'autoguidance {w:g}, ' if w != 1 else ''}{time.perf_counter() - start:.1f} s")
    if args.trajectory:                                               # x_t after each step, from the noise on, for 8 samples
        frames = [noise[:8]]
        draw(noise[:8], y if y is None else y[:8], frames)
        save_image(to_unit_scale(torch.stack(frames, 1).flatten(0, 1)), args.trajectory, nrow=len(frames))

def likelihood(args):
    ckpt, model, _, device = load_model(args)
    images, _ = load_images(ckpt["config"]["dataset"], args.data_dir, train=False)
    torch.manual_seed(args.seed)                                      # which images, U and ε
    pixels = images[torch.randperm(len(images))[:args.n]].to(device)
    start, v = time.perf_counter(), velocity_field(model)
    bpd, nfe = zip(*(bits_per_dim(chunk, lambda x: log_likelihood(v, x, args.steps, args.solver)) for chunk in pixels.split(128)))
    bpd, nfe = torch.cat(bpd).cpu(), nfe[0]
    print(f"{bpd.mean():.3f} ± {bpd.std() / math.sqrt(len(bpd)):.3f} bits/dim on {len(bpd)} {ckpt['config']['dataset']} "
          f"test images: {args.solver}, {nfe} NFE, {time.perf_counter() - start:.1f} s")

def checked(kind, ok, what):
    """An argparse type: `kind(text)` that must satisfy `ok`; argparse reports failures naming `what`."""
    def parse(text):
        if not ok(value := kind(text)):
            raise ValueError(text)
        return value
    parse.__name__ = what
    return parse

SEED = checked(int, lambda n: abs(n) < 2 ** 63, "64-bit integer")
POSITIVE_INT = checked(int, lambda n: n > 0, "positive integer")
POSITIVE = checked(float, lambda x: x > 0 and math.isfinite(x), "positive number")
WIDTHS = checked(lambda text: [int(w) for w in text.split(",")], lambda ws: all(w > 0 and w % 8 == 0 for w in ws), "list of multiples of 8")
NON_NEGATIVE = checked(float, lambda x: x >= 0 and math.isfinite(x), "non-negative number")

class Parser(argparse.ArgumentParser):
    def error(self, message):                                         # one line and exit 2, like every bad input
        die(message)

def writable(path, ends):
    """Fail now, not after the work, when an output file cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not path.endswith(ends) or os.path.isdir(path) or not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
        die(f"cannot write {path}: it must be a file name ending in {' or '.join(ends)}, in a writable folder")

def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = Parser(add_help=False)
    common.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to run (auto: cuda, then mps, then cpu)")
    common.add_argument("--seed", type=SEED, default=0, help="random seed: the same seed gives the same run or samples")
    data, reader = Parser(add_help=False), Parser(add_help=False)
    data.add_argument("--data-dir", default="./data", help="folder the data set is read from or downloaded to")
    reader.add_argument("--ckpt", required=True, help="checkpoint written by train")
    reader.add_argument("--solver", default="rk4", choices=sorted(SOLVERS), help="ODE solver")
    t = sub.add_parser("train", parents=[common, data], help="train a velocity network")
    t.add_argument("--dataset", default="mnist", choices=sorted(DATASETS), help="torchvision data set")
    t.add_argument("--out", default="runs/mnist", help="run folder: ckpt.pt and sample grids go there")
    t.add_argument("--steps", type=POSITIVE_INT, help="stop after this many optimizer steps in all (resumed runs included)")
    t.add_argument("--minutes", type=POSITIVE, help="stop after this much training time (default 10 if --steps is not given)")
    t.add_argument("--batch-size", type=POSITIVE_INT, default=128, help="images per optimizer step, over all processes under torchrun")
    t.add_argument("--lr", type=POSITIVE, default=2e-3, help="peak learning rate of AdamW")
    t.add_argument("--widths", type=WIDTHS, default=[32, 64, 128, 128], help="channels of the U-Net at each resolution, from the top, comma-separated multiples of 8")
    t.add_argument("--sigma-min", type=checked(float, lambda x: 0 <= x < 1, "number in [0, 1)"), default=0.0, help="noise left at t=1 on the OT path")
    t.add_argument("--fp32", action="store_true", help="no bfloat16 autocast, which is on where it is fast (CUDA, AVX-512 BF16 CPUs)")
    t.add_argument("--save-every", type=POSITIVE_INT, default=1000, help="save ckpt.pt and a sample grid every this many steps")
    t.add_argument("--class-cond", action="store_true", help="learn v(x, t, label) for classifier-free guidance (labels dropped 10%% of the time)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its ckpt.pt")
    s = sub.add_parser("sample", parents=[common, reader], help="draw samples from a checkpoint")
    s.add_argument("--steps", type=POSITIVE_INT, default=5, help="solver steps from t=0 to t=1 (NFE: Euler 1, RK4 4 per step)")
    s.add_argument("--n", type=POSITIVE_INT, default=64, help="number of samples")
    s.add_argument("--out", default="samples.png", help=".png for a grid, .pt for a tensor (N, C, H, W) in [0, 1]")
    s.add_argument("--label", type=int, help="class to sample from a --class-cond model (default: one row per class)")
    s.add_argument("--guidance", type=NON_NEGATIVE, default=1.0, help="classifier-free guidance weight w: 0 unconditional, 1 conditional, >1 sharper")
    s.add_argument("--autoguidance", type=NON_NEGATIVE, help="autoguidance weight w, with the run's guide (its EMA a quarter of the way through): 1 off, default 2")
    s.add_argument("--trajectory", help="also save x_t from noise to image for 8 samples to this .png, one row each")
    lk = sub.add_parser("likelihood", parents=[common, data, reader], help="bits/dim of test images under a checkpoint")
    lk.add_argument("--n", type=checked(int, lambda n: n > 1, "integer above 1"), default=1000, help="number of test images, 2 or more (the ± is the standard error of their mean)")
    lk.add_argument("--steps", type=POSITIVE_INT, default=20, help="solver steps from t=1 back to t=0")
    args = p.parse_args(argv)
    if args.command == "train":
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            die(f"cannot create the run folder {args.out}: {e.strerror}")
        writable(os.path.join(args.out, "ckpt.pt"), (".pt",))
        if not args.resume and os.path.exists(os.path.join(args.out, "ckpt.pt")):
            die(f"{args.out} holds a run already: add --resume to continue it, or give another --out")
    elif args.command == "sample":
        writable(args.out, (".png", ".pt"))
        if args.trajectory: writable(args.trajectory, (".png",))
    return args

def main(argv=None):
    args = parse_args(argv)
    {"train": train, "sample": sample, "likelihood": likelihood}[args.command](args)

if __name__ == "__main__":
    main()
