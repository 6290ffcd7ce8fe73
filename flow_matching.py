"""Flow matching for images in one file: learn a velocity field, then ride it from noise to data.

Flow matching (Lipman et al. 2022) trains a network v(x, t) so that the ODE dx/dt = v(x, t) carries
noise x0 ~ N(0, I) at t=0 to data x1 ~ p_data at t=1. The field that does this (the marginal
velocity) is intractable, but for a single data point x1 the optimal-transport (OT) path and its
velocity are known in closed form, and regressing on them is enough:

    path    x_t = (1 - (1 - σ_min) t) x0 + t x1       so x_t | x1 ~ N(t x1, (1 - (1 - σ_min) t)² I)
    target  u   = d/dt x_t = x1 - (1 - σ_min) x0
    loss    L_CFM = E_{t, x0, x1} || v(x_t, t) - u ||²
    ODE     dx/dt = v(x, t) from x(0) ~ N(0, I) to x(1), a sample

L_FM (regression on the marginal velocity) equals L_CFM plus a constant that does not depend on the
network (Theorem 2 of the paper), so both have the same minimiser: the marginal velocity, which is
the posterior mean of u given x_t. Time runs from noise (t=0) to data (t=1) throughout; some
codebases (minRF, Stable Diffusion 3) run it the other way.

Usage:
    python flow_matching.py train --data-dir data --minutes 10      # writes runs/mnist/ckpt.pt
    python flow_matching.py sample --ckpt runs/mnist/ckpt.pt --solver rk4 --steps 5 --out s.png

References:
    Lipman, Chen, Ben-Hamu, Nickel, Le. Flow Matching for Generative Modeling. arXiv:2210.02747, 2022.
    Tong et al. Improving and generalizing flow-based generative models with minibatch optimal
        transport (TorchCFM). arXiv:2302.00482, 2023.
    Esser et al. Scaling Rectified Flow Transformers for High-Resolution Image Synthesis
        (logit-normal t). arXiv:2403.03206, 2024.
"""
import argparse
import contextlib
import copy
import io
import math
import os
import signal
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import datasets
from torchvision.utils import save_image


def die(message):
    """A user's mistake: one line on stderr and exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# --- 1. Time embedding --------------------------------------------------------------------------
# The network needs t as a vector it can use: sines and cosines of t at geometric frequencies from
# 1 to 1000 radians per unit time, so that some features change slowly across [0, 1] and others
# tell apart times only 1e-3 apart.

def time_embedding(t, dim):
    freqs = torch.logspace(0, 3, dim // 2, device=t.device)        # ω_k = 1000^(k / (dim/2 - 1))
    angles = t[:, None].float() * freqs                               # (B, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)             # (B, dim)


# --- 2. Velocity network --------------------------------------------------------------------------
# v(x, t) has the shape of x. A small U-Net: residual blocks at three resolutions (28, 14, 7 for
# MNIST; 32, 16, 8 for CIFAR-10), the time embedding added inside every block, and skip
# connections from each resolution on the way down to the same resolution on the way up.

class Norm(nn.GroupNorm):
    """GroupNorm(8) computed in float32: under bfloat16 autocast on a CPU, PyTorch's bfloat16 kernel
    for channels_last tensors is about 10x slower than the float32 one (and less accurate)."""
    def __init__(self, channels):
        super().__init__(8, channels)

    def forward(self, x):
        return super().forward(x.float())


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.norm1, self.conv1 = Norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = Norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)                             # each block starts as the identity

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class VelocityNet(nn.Module):
    def __init__(self, channels=1, width=32, emb_dim=128, classes=0):
        super().__init__()
        widths = [width, 2 * width, 4 * width]                       # channels per resolution
        self.emb_dim, self.classes = emb_dim, classes
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(classes + 1, emb_dim) if classes else None  # label `classes` = none
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.ModuleList(ResBlock(a, b, emb_dim) for a, b in zip([width] + widths, widths))
        self.pool = nn.ModuleList(nn.Conv2d(w, w, 3, stride=2, padding=1) for w in widths[:-1])
        self.mid = ResBlock(widths[-1], widths[-1], emb_dim)
        self.up = nn.ModuleList(ResBlock(2 * b, a, emb_dim) for a, b in zip([width] + widths, widths))
        self.head = nn.Sequential(Norm(width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)

    def forward(self, x, t, y=None):
        emb = self.time_mlp(time_embedding(t, self.emb_dim))
        if self.classes:                                              # no label given: the null label
            emb = emb + self.label_emb(torch.full_like(t, self.classes, dtype=torch.long) if y is None else y)
        h, skips = self.stem(x), []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.pool):
                h = self.pool[i](h)                                   # halve the resolution
        h = self.mid(h, emb)
        for i in reversed(range(len(self.up))):
            h = self.up[i](torch.cat([h, skips.pop()], dim=1), emb)
            if i > 0:
                h = F.interpolate(h, scale_factor=2.0)                # double it back
        return self.head(h)


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

def cfm_loss(model, x0, x1, t, sigma_min, y=None):
    xt, u = ot_path(x0, x1, t, sigma_min)
    return F.mse_loss(model(xt, t, y).float(), u)                           # L_CFM = E || v(x_t, t) - u ||² / D


# --- 5. Data ----------------------------------------------------------------------------------------
# A whole training set of small images fits in memory as one uint8 tensor; batches are gathered
# from it directly, which is faster than a per-image DataLoader. Pixels map to [-1, 1].

DATASETS = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}


def load_images(name, root, train=True):
    """(N, C, H, W) uint8 images and (N,) labels; torchvision downloads them when it can."""
    kind = DATASETS[name]
    try:
        with contextlib.redirect_stdout(io.StringIO()):               # torchvision's download chatter
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


# --- 6. Samplers ------------------------------------------------------------------------------------
# Generation integrates dx/dt = v(x, t) from t=0 (noise) to t=1 with a fixed step h. Each step
# function works for any velocity v(x, t), so the tests can hand them fields with known solutions.
# Error after reaching t=1: O(h) for Euler, O(h²) for midpoint, O(h⁴) for RK4.

def euler_step(v, x, t, h):
    return x + h * v(x, t)                                            # x_{t+h} = x_t + h v(x_t, t)


def midpoint_step(v, x, t, h):
    return x + h * v(x + h / 2 * v(x, t), t + h / 2)


def rk4_step(v, x, t, h):
    k1 = v(x, t)
    k2 = v(x + h / 2 * k1, t + h / 2)
    k3 = v(x + h / 2 * k2, t + h / 2)
    k4 = v(x + h * k3, t + h)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


SOLVERS = {"euler": (euler_step, 1), "midpoint": (midpoint_step, 2), "rk4": (rk4_step, 4)}  # (step, NFE per step)


def integrate(v, x, steps, solver="rk4", t0=0.0, t1=1.0):
    """x(t1) from x(t0) in `steps` equal steps; returns it and the number of evaluations of v (NFE)."""
    step, evals = SOLVERS[solver]
    h = (t1 - t0) / steps
    for i in range(steps):
        x = step(v, x, t0 + i * h, h)
    return x, steps * evals


def velocity_field(model, y=None):
    """The network as a v(x, t) with t a number, as the samplers call it."""
    return lambda x, t: model(x, torch.full((len(x),), t, device=x.device), y)


@torch.no_grad()
def generate(model, noise, steps, solver):
    x, nfe = integrate(velocity_field(model), noise, steps, solver)
    return to_unit_scale(x), nfe


# --- 7. Training --------------------------------------------------------------------------------------
# AdamW on L_CFM with gradient clipping; the learning rate warms up, then decays linearly to zero
# over the run's budget (its steps, or its minutes). Samples come from an exponential moving average
# (EMA) of the weights, which averages out the noise of the last steps.

def learning_rate(peak, step, progress, warmup=200):
    return peak * min(1.0, (step + 1) / warmup) * max(0.0, 1.0 - progress)


@torch.no_grad()
def ema_update(ema, model, step, decay):
    d = min(decay, (1 + step) / (10 + step))                          # short memory while the run is young
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)                                             # e ← d e + (1 - d) p


def save_checkpoint(path, state):
    torch.save(state, path + ".tmp")                                  # a crash mid-write leaves the old file
    os.replace(path + ".tmp", path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"{path} is not a readable checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or not {"model", "ema", "config", "step"} <= ckpt.keys():
        die(f"{path} is not a flow_matching.py checkpoint")
    return ckpt


def build_model(config, state=None, device="cpu"):
    try:
        model = VelocityNet(config["channels"], config["width"], classes=config["classes"])
        if state is not None:
            model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as e:
        die(f"the checkpoint does not match this version of flow_matching.py ({type(e).__name__})")
    return model.to(device, memory_format=torch.channels_last)


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        die(f"--device {name} is not available on this machine")
    return torch.device(name)


def bf16_is_fast(device):
    """bfloat16 autocast pays on GPUs and on CPUs with native bfloat16 (AVX-512 BF16, AMX); elsewhere
    it is emulated and several times slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def draw_batch(images, batch_size):
    """Everything random in one training step, drawn on the CPU from torch's global generator, so
    that a checkpoint of that generator's state makes a resumed run repeat the same batches."""
    idx = torch.randint(len(images), (batch_size,))
    x1 = to_model_scale(images[idx])
    return torch.randn_like(x1), x1, draw_t(batch_size)               # x0 ~ N(0, I), x1 ~ p_data, t


def train_step(model, ema, opt, batch, lr, step, args):
    for group in opt.param_groups:
        group["lr"] = lr
    x0, x1, t = batch
    with torch.autocast(x0.device.type, torch.bfloat16, enabled=args.bf16):
        loss = cfm_loss(model, x0, x1, t, args.sigma_min)
    if not torch.isfinite(loss):
        die(f"the loss is {loss.item()} at step {step}; the last checkpoint is kept (try a lower --lr)")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    ema_update(ema, model, step, args.ema_decay)
    return loss.item()


def start_run(args, images, device):
    """Model, EMA, optimizer and position (step, seconds) of a new run, or of the one in --out."""
    config = dict(dataset=args.dataset, channels=images.shape[1], size=images.shape[2],
                  width=args.width, classes=0, sigma_min=args.sigma_min)
    model = build_model(config, device=device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    run = dict(config=config, model=model, ema=ema, opt=opt, step=0, elapsed=0.0)
    if args.resume:
        ckpt = load_checkpoint(os.path.join(args.out, "ckpt.pt"))
        if ckpt["config"] != config:
            die(f"--resume: the checkpoint in {args.out} was trained with {ckpt['config']}, not {config}")
        model.load_state_dict(ckpt["model"]), ema.load_state_dict(ckpt["ema"]), opt.load_state_dict(ckpt["optimizer"])
        run.update(step=ckpt["step"], elapsed=ckpt["elapsed"])
        torch.set_rng_state(ckpt["rng"])
    return run


def save_run(run, args, noise):
    state = dict(model=run["model"].state_dict(), ema=run["ema"].state_dict(), optimizer=run["opt"].state_dict(),
                 step=run["step"], elapsed=run["elapsed"], config=run["config"], rng=torch.get_rng_state(),
                 args=vars(args))
    save_checkpoint(os.path.join(args.out, "ckpt.pt"), state)
    grid = generate(run["ema"], noise, 5, "rk4")[0]
    save_image(grid, os.path.join(args.out, f"samples_{run['step']:06d}.png"), nrow=8)


def train(args):
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    images, _ = load_images(args.dataset, args.data_dir)
    args.bf16 = args.precision == "bf16" or args.precision == "auto" and bf16_is_fast(device)
    run = start_run(args, images, device)
    model, step = run["model"], run["step"]
    print(f"{args.dataset}: {len(images)} images of {tuple(images.shape[1:])} on {device}"
          f"{' with bfloat16 autocast' if args.bf16 else ''}; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; from step {step}")
    noise = torch.randn(64, *images.shape[1:], generator=torch.Generator().manual_seed(0)).to(device)
    stop = []                                                         # Ctrl-C and SIGTERM end the run cleanly
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, frame: stop.append(number))
    steps, budget = args.steps or math.inf, 60 * args.minutes if args.minutes else math.inf
    start, window = time.perf_counter() - run["elapsed"], (time.perf_counter(), step)
    while step < steps and run["elapsed"] < budget and not stop:
        progress = step / steps if args.steps else run["elapsed"] / budget
        batch = [a.to(device) for a in draw_batch(images, args.batch_size)]
        loss = train_step(model, run["ema"], run["opt"], batch, learning_rate(args.lr, step, progress), step, args)
        step = run["step"] = step + 1
        run["elapsed"] = time.perf_counter() - start
        if step % args.log_every == 0:
            rate = (step - window[1]) * args.batch_size / (time.perf_counter() - window[0])
            left = min(budget - run["elapsed"], (steps - step) * args.batch_size / rate)
            print(f"step {step:6d}  loss {loss:.4f}  {rate:6.1f} img/s  {left / 60:5.1f} min left", flush=True)
            window = (time.perf_counter(), step)
        if step % args.save_every == 0:
            save_run(run, args, noise)
    save_run(run, args, noise)
    print(f"saved {args.out}/ckpt.pt at step {step} ({run['elapsed'] / 60:.1f} min)"
          + (" on a stop signal" if stop else ""))


# --- 8. Command line -----------------------------------------------------------------------------------

def sample(args):
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.ckpt)
    model = build_model(ckpt["config"], ckpt["ema"], device).eval()
    c, s = ckpt["config"]["channels"], ckpt["config"]["size"]
    noise = torch.randn(args.n, c, s, s, generator=torch.Generator().manual_seed(args.seed))
    start, out = time.perf_counter(), []
    for chunk in noise.split(500):
        x, nfe = generate(model, chunk.to(device).contiguous(memory_format=torch.channels_last), args.steps, args.solver)
        out.append(x.cpu())
    x = torch.cat(out)
    if args.out.endswith(".pt"):
        torch.save(x.contiguous(), args.out)
    else:
        save_image(x, args.out, nrow=math.ceil(math.sqrt(args.n)))
    print(f"wrote {args.n} samples to {args.out}: {args.solver}, {nfe} NFE, {time.perf_counter() - start:.1f} s")


def checked(kind, ok, what):
    """An argparse type: `kind(text)` that must satisfy `ok`, else a one-line error naming `what`."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


POSITIVE_INT = checked(int, lambda n: n > 0, "a positive integer")
POSITIVE = checked(float, lambda x: x > 0 and math.isfinite(x), "a positive number")
IN_0_1 = checked(float, lambda x: 0 <= x < 1, "a number in [0, 1)")


class Parser(argparse.ArgumentParser):
    def error(self, message):                                         # one line and exit 2, like every bad input
        die(message)


def writable(path, ends=None):
    """Fail now, not after an hour of work, when an output file cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if ends and not path.endswith(ends):
        die(f"{path}: the output must end in {' or '.join(ends)}")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        die(f"cannot write {path}: {folder} is not a writable folder")


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = Parser(add_help=False)
    common.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to run (auto: cuda, then mps, then cpu)")
    common.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same run or samples")
    t = sub.add_parser("train", parents=[common], help="train a velocity network")
    t.add_argument("--dataset", default="mnist", choices=sorted(DATASETS), help="torchvision data set")
    t.add_argument("--data-dir", default="./data", help="folder the data set is read from or downloaded to")
    t.add_argument("--out", default="runs/mnist", help="run folder: ckpt.pt and sample grids go there")
    t.add_argument("--steps", type=POSITIVE_INT, help="stop after this many optimizer steps in all (resumed runs included)")
    t.add_argument("--minutes", type=POSITIVE, help="stop after this much training time (default 10 if --steps is not given)")
    t.add_argument("--batch-size", type=POSITIVE_INT, default=128, help="images per optimizer step")
    t.add_argument("--lr", type=POSITIVE, default=2e-3, help="peak learning rate of AdamW")
    t.add_argument("--width", type=POSITIVE_INT, default=32, help="channels at full resolution (x2, x4 below); a multiple of 8")
    t.add_argument("--sigma-min", type=IN_0_1, default=0.0, help="noise left at t=1 on the OT path")
    t.add_argument("--ema-decay", type=IN_0_1, default=0.999, help="decay of the weights' moving average used for sampling")
    t.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="bf16: bfloat16 autocast for the "
                   "forward pass; auto: bf16 where the hardware has it natively (CUDA, AVX-512 BF16 CPUs), else fp32")
    t.add_argument("--log-every", type=POSITIVE_INT, default=100, help="print a log line every this many steps")
    t.add_argument("--save-every", type=POSITIVE_INT, default=1000, help="save ckpt.pt and a sample grid every this many steps")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its ckpt.pt")
    s = sub.add_parser("sample", parents=[common], help="draw samples from a checkpoint")
    s.add_argument("--ckpt", required=True, help="checkpoint written by train")
    s.add_argument("--solver", default="rk4", choices=sorted(SOLVERS), help="ODE solver")
    s.add_argument("--steps", type=POSITIVE_INT, default=5, help="solver steps from t=0 to t=1 (NFE: Euler 1, midpoint 2, RK4 4 per step)")
    s.add_argument("--n", type=POSITIVE_INT, default=64, help="number of samples")
    s.add_argument("--out", default="samples.png", help=".png for a grid, .pt for a tensor (N, C, H, W) in [0, 1]")
    args = p.parse_args(argv)
    if args.command == "train":
        if args.width % 8:
            die(f"--width must be a multiple of 8 (GroupNorm uses 8 groups), got {args.width}")
        if args.steps is None and args.minutes is None:
            args.minutes = 10.0
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            die(f"cannot create the run folder {args.out}: {e.strerror}")
        writable(os.path.join(args.out, "ckpt.pt"))
    else:
        writable(args.out, (".png", ".pt"))
    return args


def main(argv=None):
    args = parse_args(argv)
    {"train": train, "sample": sample}[args.command](args)


if __name__ == "__main__":
    main()
