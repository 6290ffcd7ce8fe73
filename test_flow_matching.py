"""Tests for flow_matching.py, in the script's two parts and its section order. Most of Part I's
check an identity of flow matching numerically on a case whose answer is known in closed form;
Part II's check what the commands do, on fake data sets small enough to learn in seconds.
Run: python -m pytest -q test_flow_matching.py"""
import argparse
import contextlib
import importlib
import io
import json
import math
import os
import pickle
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torchvision

import flow_matching as fm

torch.set_num_threads(1)                                            # tiny networks: one is faster
HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--widths", "8,8", "--batch-size", "8"]
# Subprocesses: no network (a closed proxy), and one thread each, since several run side by side.
OFFLINE = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               OMP_NUM_THREADS="1")


def randomize(model, seed=0):
    """Give the zero-initialised layers random weights, so the output depends on every input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def read_png(path):
    """A PNG's pixels as a uint8 tensor (C, H, W)."""
    from PIL import Image                                           # torchvision's own dependency
    from torchvision.transforms.functional import pil_to_tensor
    with Image.open(path) as image:
        return pil_to_tensor(image)


# --- Fake data sets, each unlike the others -------------------------------------------------------

def write_idx(path, array):
    """torchvision's on-disk MNIST format: a magic number (8 = unsigned bytes, then the number of
    dimensions), each dimension as a big-endian int32, then the bytes."""
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, array.dim()]))
        for size in array.shape:
            f.write(size.to_bytes(4, "big"))
        f.write(array.to(torch.uint8).numpy().tobytes())


def squares(k):
    """Fake MNIST's image of class k: a bright 8x6 square on black, the class saying where."""
    image = torch.zeros(28, 28)
    r, c = 2 + 8 * (k // 4), 2 + 6 * (k % 4)
    image[r:r + 8, c:c + 6] = 255
    return image


def bars(k):
    """Fake Fashion-MNIST's image of class k: a grey bar across the image, 2 rows, at row 2 + 2k."""
    image = torch.zeros(28, 28)
    image[2 + 2 * k:4 + 2 * k, 2:26] = 128
    return image


def fake_mnist(root, folder="MNIST", n_train=64, n_test=16, draw=squares):
    """Images of `draw`, class i mod 10 for image i: small enough to learn in seconds."""
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw, exist_ok=True)
    for split, n in [("train", n_train), ("t10k", n_test)]:
        labels = torch.arange(n) % 10
        images = torch.stack([draw(k) for k in labels.tolist()])
        write_idx(os.path.join(raw, f"{split}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{split}-labels-idx1-ubyte"), labels)
    return root


def colour_squares(k):
    """Fake CIFAR-10's image of class k, (32, 32, 3): a square of colour k in the left half."""
    image = torch.zeros(32, 32, 3, dtype=torch.uint8)
    image[4 + 2 * k:12 + 2 * k, 2:10] = torch.tensor([25 * k, 255 - 25 * k, 100])
    return image


def fake_cifar(root, per_batch=10):
    """CIFAR-10's python format: pickled dicts of rows of 3072 bytes (the planes R, G, B), in
    five training batches and a test batch, and the class names."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = [i % 10 for i in range(per_batch)]
        rows = torch.stack([colour_squares(k).permute(2, 0, 1).flatten() for k in labels])
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": rows.numpy(), "labels": labels}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class {k}" for k in range(10)]}, f)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    fake_mnist(root, "FashionMNIST", draw=bars)
    fake_cifar(root)
    return fake_mnist(root)


@pytest.fixture
def cifar(monkeypatch):
    """The fake CIFAR-10 cannot match torchvision's checksums of the real files: skip the check."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def generated(v, noise, solver):
    """Images in [0, 1], as sample draws them: the noise carried along v from t=0 to t=1."""
    with torch.no_grad():
        return fm.to_unit_scale(solver(v, noise))


def cli(*args, check=True):
    """flow_matching.py in a process of its own, as a user runs it."""
    command = [sys.executable, os.path.join(HERE, "flow_matching.py"), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=OFFLINE, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def main(*args):
    """flow_matching.py's main in this process, which is faster: train's Ctrl-C handlers are not
    installed, so that they cannot replace pytest's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fm.signal, "signal", lambda *args: None)
        fm.main(list(map(str, args)))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A tiny run of 12 steps that saves at 6 and 12; its guide is taken at step 3."""
    out = tmp_path_factory.mktemp("run")
    main("train", "--data-dir", data, "--out", out, "--steps", 12, "--save-every", 6, *TINY)
    return out


@pytest.fixture(scope="module")
def cond_run(data, tmp_path_factory):
    """A tiny class-conditional run of 12 steps. 16 channels: GroupNorm's 8 groups of one channel
    each would wipe out the embeddings' per-channel shifts, and the label with them."""
    out = tmp_path_factory.mktemp("cond_run")
    main("train", "--data-dir", data, "--out", out, "--steps", 12, "--class-cond",
         "--widths", "16,16", "--batch-size", 8)
    return out


class Constant(torch.nn.Module):
    """A 'network' whose velocity is a constant, or, given labels, the constant plus 100 times
    the label (the null label: nothing added); it counts its passes."""
    def __init__(self, value, classes=10):
        super().__init__()
        self.value, self.classes, self.passes = value, classes, 0

    def forward(self, x, t, y=None):
        self.passes += 1
        v = torch.full_like(x, self.value)
        if y is not None:
            shift = torch.where(y == self.classes, 0, 100 * y).float()
            v = v + shift.view(-1, *[1] * (x.dim() - 1))
        return v


# ==================================================================================================
# Part I: the method
# ==================================================================================================

# --- 1. Time embedding ----------------------------------------------------------------------------

def test_time_embedding_varies_slowly_and_quickly_across_the_unit_interval():
    """Some features change across all of [0, 1] (coarse), others tell apart times 1e-3 apart."""
    t = torch.tensor([0.0, 0.5, 0.5005, 1.0])
    e = fm.time_embedding(t, 64)
    assert e.shape == (4, 64)
    torch.testing.assert_close(e[0], torch.cat([torch.zeros(32), torch.ones(32)]))  # sin 0, cos 0
    torch.testing.assert_close(e[1, [0, 32]], torch.tensor([math.sin(0.5), math.cos(0.5)]))
    assert (e[0] - e[3]).norm() > 4                                 # the ends of the path differ
    slow = e[:, [0, 32]]                                            # sin and cos at 1 rad per t
    assert (slow[0] - slow[3]).norm() > 0.9                         # |(sin 1, cos 1) - (0, 1)|
    assert (e[1] - e[2]).abs().max() > 0.3                          # the fastest separate Δt = 5e-4
    torch.testing.assert_close(e[1, 31], torch.tensor(math.sin(500.0)))   # ω = 1000 at the top


# --- 2. Velocity network --------------------------------------------------------------------------

@pytest.mark.parametrize("channels, size", [(1, 28), (1, 32), (3, 32)])
def test_network_output_has_the_input_shape_and_depends_on_t(channels, size):
    net = randomize(fm.VelocityNet(channels, widths=[8, 16, 16, 16]))
    x = torch.randn(2, channels, size, size)
    v0, v1 = net(x, torch.zeros(2)), net(x, torch.full((2,), 0.7))
    assert v0.shape == x.shape
    assert (v0 - v1).abs().mean() > 1e-3 * v0.abs().mean()


def test_a_new_network_gives_a_constant_v_and_a_new_block_adds_a_constant_to_its_input():
    """The weights of the head's last convolution and of each block's second one start at zero,
    their biases do not: v is the head's bias at first, and a block is x plus conv2's bias."""
    net = fm.VelocityNet(1, widths=[8, 16])
    x, t = torch.randn(2, 1, 28, 28), torch.rand(2)
    expected = net.head[-1].bias.view(1, 1, 1, 1).expand_as(x)
    torch.testing.assert_close(net(x, t), expected)
    block = fm.ResBlock(8, 8, 4)
    h = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(block(h, torch.randn(2, 4)), h + block.conv2.bias.view(1, 8, 1, 1))


def test_network_output_depends_on_the_label_and_no_label_is_the_null_label():
    """Labels 0 and 1 give other velocities; y=None is label `classes`, ∅. An unconditional
    network has no label embedding at all."""
    net = randomize(fm.VelocityNet(1, widths=[8, 16], classes=10))
    x, t = torch.randn(3, 1, 28, 28), torch.rand(3)
    v0, v1 = net(x, t, torch.zeros(3, dtype=torch.long)), net(x, t, torch.ones(3, dtype=torch.long))
    assert (v0 - v1).abs().mean() > 1e-3 * v0.abs().mean()
    assert net.label_emb.num_embeddings == 11
    torch.testing.assert_close(net(x, t), net(x, t, torch.full((3,), 10)))
    assert not hasattr(fm.VelocityNet(1, widths=[8, 16]), "label_emb")


# --- 3. The OT probability path and the times t ---------------------------------------------------

SIGMA = 0.1


def test_path_endpoints():
    """x_0 = x0 (noise) and x_1 = x1 + σ_min x0 (data, blurred by σ_min)."""
    x0, x1 = torch.randn(5, 3), torch.randn(5, 3)
    xt, _ = fm.ot_path(x0, x1, torch.zeros(5), SIGMA)
    torch.testing.assert_close(xt, x0)
    xt, _ = fm.ot_path(x0, x1, torch.ones(5), SIGMA)
    torch.testing.assert_close(xt, x1 + SIGMA * x0)


def test_target_is_the_time_derivative_of_the_path():
    """u = d/dt x_t, by forward-mode autodiff in t (Lipman et al., eq. 21-22)."""
    x0, x1, t = torch.randn(4, 6), torch.randn(4, 6), torch.rand(4)
    _, u = fm.ot_path(x0, x1, t, SIGMA)

    def path(s):
        return fm.ot_path(x0, x1, s, SIGMA)[0]

    _, dxt_dt = torch.func.jvp(path, (t,), (torch.ones(4),))
    torch.testing.assert_close(u, dxt_dt)


def test_path_given_x1_is_gaussian_with_mean_t_x1_and_std_sigma_t():
    """p_t(x | x1) = N(t x1, σ_t² I) with σ_t = 1 - (1 - σ_min) t, by Monte Carlo over x0."""
    torch.manual_seed(0)
    n, x1 = 200_000, torch.tensor([2.0, -1.0])
    for t in [0.0, 0.3, 0.8, 1.0]:
        xt, _ = fm.ot_path(torch.randn(n, 2), x1.expand(n, 2), torch.full((n,), t), SIGMA)
        sigma_t = 1 - (1 - SIGMA) * t
        torch.testing.assert_close(xt.mean(0), t * x1, atol=5 * sigma_t / n ** 0.5, rtol=0)
        torch.testing.assert_close(xt.std(0), torch.full((2,), sigma_t), atol=0.01 * sigma_t,
                                   rtol=0)


@pytest.mark.parametrize("scale, past_095", [((), 0.0016), ((1.5,), 0.025)])
def test_training_times_are_logit_normal_with_scale_one_unless_asked(scale, past_095):
    """t = σ(s), s ~ N(0, scale²): logit(t) has mean 0 and standard deviation 1 by default, and
    1 t in 600 is past 0.95 (P(s > logit 0.95 = 2.94) = 0.0016); scale 1.5 puts 1 in 40 there."""
    torch.manual_seed(0)
    t = fm.draw_t(200_000, *scale)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean()) < 0.02 and abs(logit.std() - (scale or (1.0,))[0]) < 0.02
    assert (t > 0.95).float().mean().item() == pytest.approx(past_095, rel=0.1)


# --- 4. The conditional flow matching loss --------------------------------------------------------

def test_cfm_loss_is_the_mean_squared_error_to_the_target_given_the_labels():
    net = randomize(fm.VelocityNet(1, widths=[8, 16, 16], classes=10))
    x0, x1, t = torch.randn(3, 1, 28, 28), torch.randn(3, 1, 28, 28), torch.rand(3)
    y = torch.tensor([1, 4, 10])
    xt, u = fm.ot_path(x0, x1, t, SIGMA)
    expected = ((net(xt, t, y) - u) ** 2).mean()
    torch.testing.assert_close(fm.cfm_loss(net, x0, x1, t, SIGMA, y), expected)
    assert fm.cfm_loss(net, x0, x1, t, SIGMA) != expected           # no labels: ∅ for each


# For data made of K points the marginal velocity has a closed form: the conditional velocities
# u(x | x1_k) weighted by the posterior p(x1_k | x_t = x) ∝ N(x; t x1_k, σ_t² I) (Lipman et al.,
# Theorem 1). With it, L_FM can be computed, and compared with L_CFM.
POINTS = torch.tensor([[2.0, 0.0], [-1.0, 1.5], [-1.0, -1.5]])


def marginal_velocity(x, t, sigma_min=SIGMA, points=POINTS):
    t = t.view(-1, 1, 1)
    sigma_t = 1 - (1 - sigma_min) * t
    log_w = -((x[:, None] - t * points) ** 2).sum(-1, keepdim=True) / (2 * sigma_t ** 2)
    x0 = (x[:, None] - t * points) / sigma_t                        # the noise for x via x1_k
    u = points - (1 - sigma_min) * x0                               # u(x | x1_k)
    return (log_w.softmax(1) * u).sum(1)


def path_samples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = POINTS[torch.randint(len(POINTS), (n,), generator=g)]
    x0, t = torch.randn(n, 2, generator=g), torch.rand(n, generator=g)
    xt, u = fm.ot_path(x0, x1, t, SIGMA)
    return xt, t, u


def squared_error(v, u):
    return ((v - u) ** 2).sum(1).mean().item()


def test_marginal_velocity_has_the_lowest_cfm_loss():
    """The minimiser of L_CFM is the marginal velocity: perturbing it raises the loss by E||δ||²."""
    xt, t, u = path_samples(400_000)
    best = marginal_velocity(xt, t)
    for delta in [0.1 * torch.ones(2), 0.1 * best, 0.2 * torch.sin(3 * xt)]:
        worse = best + delta
        assert squared_error(worse, u) > squared_error(best, u)
        gap = squared_error(worse, u) - squared_error(best, u)
        assert gap == pytest.approx((delta ** 2).sum(-1).mean().item(), rel=0.1)


def test_fm_and_cfm_losses_differ_by_the_same_constant_for_any_field():
    """Lipman et al., Theorem 2: L_FM(v) - L_CFM(v) = C for every v, with
    C = E||u_marg||² - E||u||² = -E Var(u | x_t). (For v = 0 it holds by C's definition.)"""
    xt, t, u = path_samples(400_000, seed=1)
    u_marg = marginal_velocity(xt, t)
    c = ((u_marg ** 2).sum(1).mean() - (u ** 2).sum(1).mean()).item()
    for v in [torch.full_like(xt, 3.0), 2 * xt.flip(1) - 1, torch.tanh(xt) * t[:, None]]:
        l_fm = squared_error(v, u_marg)
        l_cfm = squared_error(v, u)
        assert l_fm - l_cfm == pytest.approx(c, abs=0.03)
    assert c < -0.5                                                 # a real gap, not 0 = 0


def test_integrating_the_marginal_velocity_lands_on_the_data():
    """dx/dt = u_t(x) from N(0, I) reaches p_1, the data blurred by σ_min, each point as often."""
    torch.manual_seed(0)
    sigma_min = 0.01
    points = POINTS.double()

    def v(x, t):
        return marginal_velocity(x, torch.full((len(x),), t, dtype=x.dtype), sigma_min, points)

    x1 = fm.integrate(v, torch.randn(3000, 2, dtype=torch.float64), 100, "rk4")
    dist = torch.cdist(x1, points)
    assert dist.min(1).values.max() < 6 * sigma_min                 # every sample on a data point
    spread = (x1 - points[dist.argmin(1)]).std().item()             # ... blurred by N(0, σ_min² I)
    assert spread == pytest.approx(sigma_min, rel=0.05)
    share = torch.bincount(dist.argmin(1), minlength=3) / len(x1)
    torch.testing.assert_close(share, torch.full((3,), 1 / 3, dtype=share.dtype), atol=0.03, rtol=0)


# --- 5. A training step ---------------------------------------------------------------------------

def test_a_batch_pairs_standard_normal_noise_with_images_and_logit_normal_times():
    """x0 ~ N(0, I); x1 the chosen images on the model's scale; logit(t) ~ N(0, 1); no labels;
    logit(t) ~ N(0, 1.5²) with t_scale=1.5."""
    torch.manual_seed(0)
    images = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 1, 8, 8) * 60
    x0, x1, t, y = fm.draw_batch(images, 20_000)
    assert abs(x0.mean()) < 0.01 and abs(x0.std() - 1) < 0.01
    torch.testing.assert_close(x1.unique(), torch.tensor([0.0, 60, 120, 180]) / 127.5 - 1)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean()) < 0.04 and abs(logit.std() - 1) < 0.04
    assert y is None
    t = fm.draw_batch(images, 20_000, t_scale=1.5)[2]
    assert abs(torch.log(t / (1 - t)).std() - 1.5) < 0.04


def test_each_label_becomes_the_null_label_one_time_in_ten_drawn_per_image():
    """Labels follow their images; ∅ (here 10) replaces 10% of them, a different 10% in each
    batch, and in batches of 8 some hold ∅ and some do not: drawn per image, not per batch."""
    torch.manual_seed(0)
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1) * 20
    labels = torch.arange(10)
    _, x1, _, y = fm.draw_batch(images, 50_000, labels, null_label=10)
    kept = y != 10
    assert (y[kept] == ((x1[kept].flatten() + 1) * 127.5 / 20).round().long()).all()
    assert (1 - kept.float().mean()).item() == pytest.approx(0.1, abs=0.005)
    mixed = [fm.draw_batch(images, 8, labels, null_label=10)[3] for _ in range(200)]
    assert any(0 < (y == 10).sum() < 8 for y in mixed)


def test_flip_mirrors_about_half_the_images_left_to_right_and_only_when_asked():
    torch.manual_seed(0)
    image = torch.zeros(1, 1, 2, 2, dtype=torch.uint8)
    image[..., 0] = 255                                             # a bright left column
    _, x1, _, _ = fm.draw_batch(image, 4000, flip=True)
    bright_left = x1[:, 0, 0, 0] > 0
    assert bright_left.float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert (x1[bright_left, ..., 1] < 0).all() and (x1[~bright_left, ..., 1] > 0).all()
    _, x1, _, _ = fm.draw_batch(image, 100)
    assert (x1[..., 0] > 0).all()


def tiny_state(seed=0, classes=0):
    torch.manual_seed(seed)
    net = fm.VelocityNet(1, widths=[8, 16, 16], classes=classes)
    return net, fm.copy.deepcopy(net).requires_grad_(False), fm.adam(net, 3e-3)


def test_training_lowers_the_loss_on_a_tiny_data_set():
    """Two 8x8 images, a pattern and its negative: the zero field scores E||u||² / D = 2, and a net
    that learns where x_t is heading does far better."""
    model, ema, opt = tiny_state()
    pattern = (torch.rand(1, 1, 8, 8) > 0.5).to(torch.uint8) * 255
    images = torch.cat([pattern, 255 - pattern])
    losses = []
    for step in range(150):
        batch = fm.draw_batch(images, 32)
        losses.append(fm.train_step(model, ema, opt, batch, 3e-3, step))
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20


def test_labels_tell_a_class_conditional_network_which_image_to_draw():
    """The same two 8x8 images, labelled 0 and 1: given the label, the network knows x1 itself,
    so its loss falls far below the unconditional one, whose best is the mean of the two."""
    pattern = (torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5)
    images = torch.cat([pattern, ~pattern]).to(torch.uint8) * 255
    labels = torch.tensor([0, 1])
    final = {}
    for classes in (0, 2):
        model, ema, opt = tiny_state(classes=classes)
        losses = []
        for step in range(150):
            batch = fm.draw_batch(images, 32, labels if classes else None, null_label=2)
            losses.append(fm.train_step(model, ema, opt, batch, 3e-3, step))
        final[classes] = sum(losses[-30:]) / 30
    assert final[2] < 0.7 * final[0]


def test_learning_rate_warms_up_then_decays_to_zero():
    assert fm.learning_rate(1.0, 0, 0.0, warmup=10) == pytest.approx(0.1)
    assert fm.learning_rate(1.0, 50, 0.5, warmup=10) == pytest.approx(0.5)
    assert fm.learning_rate(1.0, 99, 1.0, warmup=10) == 0.0
    assert fm.learning_rate(1.0, 99, 0.0) == pytest.approx(0.5)     # 200 steps of warm-up


def test_adam_remembers_gradients_with_beta2_0_99():
    (group,) = fm.adam(torch.nn.Linear(2, 2), 1e-3).param_groups
    assert group["betas"] == (0.9, 0.99) and group["lr"] == 1e-3 and group["weight_decay"] == 0


def test_ema_follows_the_weights_with_its_decay_and_a_short_memory_while_young():
    """e ← d e + (1 - d) p with d = min(decay, (1 + step) / (10 + step)): 1/10 at step 0."""
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    for step, decay in [(10_000, 0.9), (0, 0.1)]:
        before = b.weight.detach().clone()
        fm.ema_update(b, a, step=step, decay=0.9)
        torch.testing.assert_close(b.weight, decay * before + (1 - decay) * a.weight.detach())
    before = b.weight.detach().clone()
    fm.ema_update(b, a, step=10 ** 6)                               # the default decay, 0.999
    torch.testing.assert_close(b.weight, 0.999 * before + 0.001 * a.weight.detach())


def test_a_training_step_clips_the_gradient_norm_to_1():
    """Targets a thousand times too large: the gradient the step used has norm 1."""
    model, ema, opt = tiny_state()
    x0, x1, t, _ = fm.draw_batch(torch.full((2, 1, 8, 8), 255, dtype=torch.uint8), 16)
    fm.train_step(model, ema, opt, (x0, 1000 * x1, t, None), 1e-3, 0)
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert norm == pytest.approx(1.0, rel=1e-4)


def test_autocast_runs_the_network_in_bfloat16_only_when_asked():
    """bf16: a bfloat16 convolution inside; otherwise float32, with the device type set aside."""
    conv = torch.nn.Conv2d(1, 1, 1)
    net = fm.VelocityNet(1, widths=[8, 16])
    with fm.autocast(torch.device("cpu"), True):
        assert conv(torch.randn(1, 1, 2, 2)).dtype == torch.bfloat16
        assert net(torch.randn(1, 1, 8, 8), torch.rand(1)).dtype == torch.float32   # v: float32
    with fm.autocast(torch.device("mps"), False):
        assert conv(torch.randn(1, 1, 2, 2)).dtype == torch.float32


def test_autocast_off_never_names_mps_which_older_pytorch_rejects(monkeypatch):
    """As PyTorch before MPS autocast: torch.autocast('mps', ...) raises even when disabled."""
    autocast = torch.autocast

    def older(device_type, *args, **kwargs):
        if device_type == "mps":
            raise RuntimeError("User specified an unsupported autocast device_type 'mps'")
        return autocast(device_type, *args, **kwargs)

    monkeypatch.setattr(fm.torch, "autocast", older)
    with fm.autocast(torch.device("mps"), False):
        pass


# --- 6. Samplers ----------------------------------------------------------------------------------

class Recorded:
    """A field dx/dt = f(x, t) that records the times it is evaluated at."""
    def __init__(self, f):
        self.f, self.times = f, []

    def __call__(self, x, t):
        self.times.append(t)
        return self.f(x, t)


EVALUATIONS_PER_STEP = {"euler": 1, "ab2": 1, "rk4": 4}


@pytest.mark.parametrize("solver,order", [("euler", 1), ("ab2", 2), ("rk4", 4)])
def test_solvers_converge_at_their_order(solver, order):
    """dx/dt = x cos t has x(1) = x(0) e^{sin 1}; halving h divides the error by 2^order."""
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    exact = x0 * math.exp(math.sin(1.0))
    steps = [16, 32, 64, 128]                                       # AB2 reaches its order by 16
    errors = []
    for n in steps:
        v = Recorded(lambda x, t: x * math.cos(t))
        x1 = fm.integrate(v, x0, n, solver)
        assert len(v.times) == n * EVALUATIONS_PER_STEP[solver]
        errors.append((x1 - exact).abs().max().item())
    slope = -math.log(errors[-1] / errors[0]) / math.log(steps[-1] / steps[0])
    assert slope == pytest.approx(order, abs=0.3)


@pytest.mark.parametrize("solver,t0,t1", [("euler", 0, 1), ("ab2", 0, 1), ("ab2", 1, 0),
                                          ("rk4", 0, 1), ("rk4", 1, 0)])
def test_steps_follow_the_grid_and_end_at_t1(solver, t0, t1):
    """Steps start at t = s - a sin(2πs) / 2π, s = i / n, with a = 0 for Euler (equal steps),
    0.3 for AB2 and 1/2 for RK4, whose first and last steps are then a third as long as mid-path
    ones ((1 - a) / (1 + a) in general)."""
    v = Recorded(lambda x, t: torch.ones_like(x))                   # x(t1) = x(t0) + t1 - t0
    n, a = 40, {"euler": 0.0, "ab2": 0.3, "rk4": 0.5}[solver]
    x1 = fm.integrate(v, torch.zeros(1, dtype=torch.float64), n, solver, t0=t0, t1=t1)
    s = torch.arange(n + 1, dtype=torch.float64) / n
    grid = t0 + (t1 - t0) * (s - a * torch.sin(2 * math.pi * s) / (2 * math.pi))
    starts = v.times[::EVALUATIONS_PER_STEP[solver]]                # where integrate's steps start
    used = torch.tensor(starts + [t1], dtype=torch.float64)
    torch.testing.assert_close(used, grid)
    torch.testing.assert_close(x1, torch.tensor([t1 - t0], dtype=torch.float64))
    lengths = (used[1:] - used[:-1]).abs()
    assert lengths[0] / lengths[n // 2] == pytest.approx((1 - a) / (1 + a), rel=0.01)


def test_adams_bashforth_steps_once_like_euler_then_along_the_line_through_two_slopes():
    """For dx/dt = t the line through two slopes is v itself: every step after the first is exact,
    whatever the ratio r = h / h_before of its length to the last's, and the first, Euler's, misses
    h0²/2; so x after each step is t²/2 - h0²/2. Checked at every step, not only at t=1: on a grid
    symmetric about ½ the errors of a wrong r (h_before / h) cancel between mirrored steps."""
    for steps in (3, 7):
        v = Recorded(lambda x, t: torch.full_like(x, t))
        trajectory = []
        fm.integrate(v, torch.zeros(1, dtype=torch.float64), steps, "ab2", trajectory=trajectory)
        h0 = v.times[1]                                             # the first step's length
        ends = torch.tensor(v.times[1:] + [1.0], dtype=torch.float64)
        torch.testing.assert_close(torch.cat(trajectory), ends ** 2 / 2 - h0 ** 2 / 2)
        assert len(v.times) == steps


def test_integrate_backwards_undoes_forwards_and_records_each_step():
    def v(x, t):
        return torch.sin(x) + t

    x0 = torch.randn(5, dtype=torch.float64)
    trajectory = []
    x1 = fm.integrate(v, x0, 50, "rk4", trajectory=trajectory)
    assert len(trajectory) == 50 and torch.equal(trajectory[-1], x1)
    back = fm.integrate(v, x1, 50, "rk4", t0=1.0, t1=0.0)
    torch.testing.assert_close(back, x0, atol=1e-7, rtol=0)


def dopri5_run(v, x, t0, t1, tol, monkeypatch):
    """dopri5's answer, the steps it tried as (t, h) and the states it kept."""
    tried, kept, step = [], [], fm.dopri5_step

    def recorded(v, x, t, h, k1):
        tried.append((t, h))
        return step(v, x, t, h, k1)

    monkeypatch.setattr(fm, "dopri5_step", recorded)
    return fm.dopri5(v, x, t0, t1, tol, tol, trajectory=kept), tried, kept


def test_dopri5_converges_at_order_5():
    """Fixed steps of Dormand-Prince's fifth-order solution on dx/dt = x cos t: halving h divides
    the error at t=1 by 2⁵ = 32; the embedded estimate shrinks with h too, and each step after the
    first costs 6 evaluations of v, its last one at the new point."""
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    exact = x0 * math.exp(math.sin(1.0))
    errors = []
    for n in (4, 8, 16, 32):
        v = Recorded(lambda x, t: x * math.cos(t))
        x, k1, estimates = x0, v(x0, 0.0), []
        for i in range(n):
            x, error, k1 = fm.dopri5_step(v, x, i / n, 1 / n, k1)
            estimates.append(error.abs().max().item())
            torch.testing.assert_close(k1, x * math.cos((i + 1) / n))   # first same as last
        assert len(v.times) == 1 + 6 * n
        errors.append((x - exact).abs().max().item())
    slope = math.log2(errors[0] / errors[-1]) / 3
    assert slope == pytest.approx(5, abs=0.3)
    assert 0 < max(estimates) < 1e-7


def test_dopri5_is_exact_on_a_quartic_and_its_error_is_the_fourth_order_solutions_miss():
    """v = 5t⁴ from t=0, h=1: a fifth-order solution is exact on it, x(1) = 1; the embedded
    fourth-order one, x4 = Σ b*_j v(c_j), is not; the error estimate is their difference, with
    c and b* as Dormand & Prince give them; and k_7 is v at the new point, 5."""
    c = [0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1]
    b4 = [5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]
    x4 = sum(b * 5 * c_j ** 4 for b, c_j in zip(b4, c))

    def v(x, t):
        return torch.full_like(x, 5 * t ** 4)

    x0 = torch.zeros(1, dtype=torch.float64)
    x1, error, k7 = fm.dopri5_step(v, x0, 0.0, 1.0, v(x0, 0.0))
    torch.testing.assert_close(x1, torch.ones(1, dtype=torch.float64), atol=1e-14, rtol=0)
    torch.testing.assert_close(error, torch.tensor([1 - x4], dtype=torch.float64), atol=1e-14,
                               rtol=0)
    assert abs(1 - x4) > 1e-4 and k7.item() == 5.0


def test_dopri5_sizes_each_step_from_the_error_ratio_of_the_last(monkeypatch):
    """A step of known error on dx/dt = 1 from x = 3, e = 10³ h⁵ (1 + 10³ t³) in every entry, so
    that it grows faster than the controller expects: r = e / (atol + rtol max(|x|, |x_new|)); a
    step is kept if r ≤ 1, else retried from the same t; either way the next h is h · 0.9 r^(-1/5)
    within [h/5, 10 h]; the last step ends on t1 exactly."""
    tried, atol, rtol = [], 1e-4, 1e-3

    def step(v, x, t, h, k1):
        tried.append((t, h, x[0].item()))
        return x + h, torch.full_like(x, 1e3 * h ** 5 * (1 + 1e3 * t ** 3)), k1

    monkeypatch.setattr(fm, "dopri5_step", step)
    kept = []
    x1 = fm.dopri5(lambda x, t: torch.ones_like(x), torch.full((3,), 3.0, dtype=torch.float64),
                   0.0, 1.0, rtol, atol, trajectory=kept)
    t, h, x, expected = 0.0, 0.01, 3.0, []
    while t != 1.0:
        h = min(h, 1.0 - t)
        expected.append((t, h, x))
        r = 1e3 * h ** 5 * (1 + 1e3 * t ** 3) / (atol + rtol * max(abs(x), abs(x + h)))
        if r <= 1:
            t, x = (1.0 if h == 1.0 - t else t + h), x + h
        h = h * min(10.0, max(0.2, 0.9 * r ** -0.2))
    assert [(a, pytest.approx(b), pytest.approx(c)) for a, b, c in expected] == tried
    assert len(tried) > len(kept) > 3                               # some steps were retried
    torch.testing.assert_close(x1, torch.full((3,), 4.0, dtype=torch.float64))
    assert tried[-1][0] + tried[-1][1] == 1.0


@pytest.mark.parametrize("case", ["x cos t", "stiff-ish"])
@pytest.mark.parametrize("tol", [1e-4, 1e-6])
def test_dopri5_keeps_to_its_tolerance(case, tol, monkeypatch):
    """The global error at t=1 stays below 10 (atol + rtol |x|): on dx/dt = x cos t, and on
    dx/dt = -50 (x - sin t) + cos t, x(t) = sin t + x(0) e^(-50t), whose fast decay forces short
    steps at first. A tighter tolerance costs more evaluations."""
    fields = {"x cos t": (lambda x, t: x * math.cos(t), lambda x0: x0 * math.exp(math.sin(1))),
              "stiff-ish": (lambda x, t: -50 * (x - math.sin(t)) + math.cos(t),
                            lambda x0: math.sin(1) + x0 * math.exp(-50))}
    f, solution = fields[case]
    x0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    v = Recorded(f)
    x1, tried, kept = dopri5_run(v, x0, 0.0, 1.0, tol, monkeypatch)
    assert ((x1 - solution(x0)).abs() < 10 * (tol + tol * solution(x0).abs())).all()
    assert len(v.times) == 1 + 6 * len(tried) and torch.equal(kept[-1], x1)
    assert tried[-1][0] + tried[-1][1] == pytest.approx(1.0)        # the last step ends at t1
    monkeypatch.undo()
    more = Recorded(f)
    fm.dopri5(more, x0, 0.0, 1.0, tol / 100, tol / 100)
    assert len(more.times) > len(v.times)


def test_dopri5_retries_a_rejected_step_shorter_from_the_same_point(monkeypatch):
    """dx/dt = -200 x from t = 0 to 1: the first guess, h = 0.01, is too long (h λ = -2), so the
    step is rejected and tried again from the same t, shorter, until one is kept. The evaluations
    are 1 + 6 per step tried, kept or not."""
    v = Recorded(lambda x, t: -200 * x)
    x0 = torch.ones(2, dtype=torch.float64)
    x1, tried, kept = dopri5_run(v, x0, 0.0, 1.0, 1e-6, monkeypatch)
    assert tried[0] == (0.0, 0.01) and tried[1][0] == 0.0 and tried[1][1] < 0.01
    assert len(tried) > len(kept) and len(v.times) == 1 + 6 * len(tried)
    retries = [(a, b) for a, b in zip(tried, tried[1:]) if a[0] == b[0]]
    assert all(b[1] < a[1] for a, b in retries)
    assert x1.abs().max() < 1e-5                                    # e^-200, within atol


@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (1.0, 0.0)])
def test_dopri5_backwards_undoes_forwards(t0, t1):
    def v(x, t):
        return torch.sin(x) + t

    x0 = torch.randn(5, dtype=torch.float64)
    kept = []
    there = fm.Solver("dopri5", tol=1e-9)(v, x0, t0, t1, trajectory=kept)
    assert len(kept) > 1 and torch.equal(kept[-1], there)           # x after each step kept
    torch.testing.assert_close(fm.dopri5(v, there, t1, t0, 1e-9, 1e-9), x0, atol=1e-7, rtol=0)


# --- 7. Guidance ----------------------------------------------------------------------------------

@pytest.mark.parametrize("w, expected, passes", [(0.0, 11.0, 2), (1.0, 1.0, 1), (2.0, -9.0, 2)])
def test_autoguidance_mixes_the_network_and_its_guide(w, expected, passes):
    """v = v_guide + w (v - v_guide), here v = 1 and v_guide = 11: w = 0 is the guide, w = 1 the
    network alone (one network evaluation, not two), w > 1 pushes past the network."""
    model, guide = Constant(1.0), Constant(11.0)
    v = fm.GuidedField(model, guide=guide, autoguidance=w)
    assert torch.equal(v(torch.zeros(2, 5), 0.3), torch.full((2, 5), expected))
    assert model.passes + guide.passes == passes
    assert v.passes == 2 * passes                                   # passes over single images


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_classifier_free_guidance_mixes_the_label_and_the_null_label(w):
    """v = v_null + w (v_y - v_null): with v_y = 1 + 100 y and v_null = 1, label 2 gives
    1 + 200 w, label 0 gives 1 at any w; the network alone (w = 1) runs once."""
    model = Constant(1.0)
    v = fm.GuidedField(model, y=torch.tensor([2, 0]), guidance=w)
    out = v(torch.zeros(2, 3), 0.5)
    torch.testing.assert_close(out, torch.tensor([[1 + 200 * w] * 3, [1.0] * 3]))
    assert (model.passes, v.passes) == ((1, 2) if w == 1 else (2, 4))


def test_both_guidances_add_their_pushes():
    """v + (w_cfg - 1)(v - v_null) + (w_ag - 1)(v - v_guide), three networks' passes: v_y = 201
    (label 2), v_null = 1, v_guide = 211 (the guide given the same label): 201 + 200 - 10 = 391."""
    model, guide = Constant(1.0), Constant(11.0)
    v = fm.GuidedField(model, torch.tensor([2]), 2.0, guide, 2.0)
    assert v(torch.zeros(1, 1), 0.5).item() == 391.0
    assert (model.passes, guide.passes, v.passes) == (2, 1, 3)


@pytest.mark.parametrize("t, guided", [(0.0, False), (0.19, False), (0.2, True), (0.5, True),
                                       (0.8, True), (0.81, False), (1.0, False)])
def test_the_guide_acts_only_mid_path(t, guided):
    """With the default times, v = v_guide + 2 (v - v_guide) = -9 for 0.2 ≤ t ≤ 0.8, and outside
    the network alone, 1, in one pass; times=(0, 1) guides everywhere. The same for
    classifier-free guidance."""
    model, guide = Constant(1.0), Constant(11.0)
    v = fm.GuidedField(model, guide=guide, autoguidance=2.0)
    assert v(torch.zeros(3), t).unique().tolist() == [-9.0 if guided else 1.0]
    assert (model.passes, guide.passes, v.passes) == (1, int(guided), 3 * (1 + guided))
    everywhere = fm.GuidedField(model, guide=guide, autoguidance=2.0, times=(0.0, 1.0))
    assert everywhere(torch.zeros(3), t).unique().tolist() == [-9.0]
    cfg = fm.GuidedField(model, torch.tensor([1]), guidance=2.0)
    assert cfg(torch.zeros(1, 1), t).item() == (201.0 if guided else 101.0)


# --- 8. Likelihood --------------------------------------------------------------------------------

def gaussian_marginal_field(mu, s):
    """The exact marginal velocity when the data are N(μ, s² I) and σ_min = 0: x_t ~ N(t μ, σ_t² I)
    with σ_t² = (1 - t)² + t² s², and v(x, t) = μ + (σ_t'/σ_t) (x - t μ), where
    σ_t σ_t' = t s² - (1 - t)."""
    def v(x, t):
        return mu + (t * s ** 2 - (1 - t)) / ((1 - t) ** 2 + t ** 2 * s ** 2) * (x - t * mu)
    return v


def test_log_likelihood_of_a_gaussian_data_set_matches_the_closed_form():
    """The flow of the exact field carries N(0, I) to N(μ, s² I); the continuity equation must give
    that density's log at any point. That field's Jacobian is a multiple of I, whose trace random
    signs give exactly (ε_i² = 1), so one draw of Hutchinson's estimator suffices."""
    mu, s = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), 0.3
    x1 = mu + s * torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    truth = torch.distributions.Normal(mu, s).log_prob(x1).sum(1)
    v = Recorded(gaussian_marginal_field(mu, s))
    log_p = fm.log_likelihood(v, x1, fm.Solver("rk4", 50))
    torch.testing.assert_close(log_p, truth, atol=1e-3, rtol=0)
    assert len(v.times) == 200 and v.times[0] == 1.0                # from t=1 back to t=0
    torch.testing.assert_close(fm.log_likelihood(v, x1), truth, atol=1e-4, rtol=0)  # dopri5


def test_hutchinson_divergence_is_unbiased():
    """E_ε[εᵀ J ε] = tr J for random signs ε, on a field whose Jacobian is not diagonal."""
    torch.manual_seed(0)
    w = torch.randn(4, 4)

    def v(x, t):
        return torch.tanh(x @ w) * (1 + t)

    x = torch.randn(1, 4)
    exact = torch.func.jacrev(lambda x: v(x, 0.5))(x[0]).trace()
    noise = torch.randint(0, 2, (20_000, 4)).float() * 2 - 1
    _, estimates = fm.divergence(v, x.repeat(20_000, 1), 0.5, noise)
    assert abs(estimates.mean() - exact) < 4 * estimates.std() / math.sqrt(len(estimates))
    assert estimates.std() > 0.01                                   # an estimate, not the trace


def test_the_random_signs_are_drawn_once_for_each_path():
    """log_likelihood draws ε once per sample and keeps it at every evaluation of v."""
    seen = []

    def v(x, t):
        return torch.sin(x) * t

    def recording(v, x, t, noise):
        seen.append(noise)
        return divergence(v, x, t, noise)

    divergence = fm.divergence
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fm, "divergence", recording)
        fm.log_likelihood(v, torch.randn(3, 4), fm.Solver("rk4", 3))
    assert len(seen) == 12 and all(torch.equal(e, seen[0]) for e in seen)
    assert set(seen[0].unique().tolist()) == {-1.0, 1.0}


def test_bits_per_dim_of_a_standard_normal_over_8_bit_pixels():
    """The zero field leaves N(0, I) in place. A pixel k dequantised to
    x = (k + U - 1/2) / 127.5 - 1 then costs E[-log N(x)] + ln 127.5 nats:
    ½ ln 2π + ½ (c² + 1 / (12 · 127.5²)) + ln 127.5 with c = k / 127.5 - 1."""
    torch.manual_seed(0)
    k = torch.tensor([0, 40, 128, 255]).repeat(20_000)
    pixels = k.view(-1, 1, 1, 1).to(torch.uint8)
    bpd = fm.bits_per_dim(pixels, lambda x, t: 0 * x, fm.Solver("euler", 1))
    c = k.double() / 127.5 - 1
    nats = 0.5 * math.log(2 * math.pi) + 0.5 * (c ** 2 + 1 / (12 * 127.5 ** 2)) + math.log(127.5)
    expected = nats / math.log(2)
    torch.testing.assert_close(bpd.double().view(-1, 4).mean(0), expected.view(-1, 4).mean(0),
                               atol=1e-4, rtol=0)


# ==================================================================================================
# Part II: running it
# ==================================================================================================

# --- 9. Data and devices --------------------------------------------------------------------------

def test_images_load_as_bytes_in_the_shape_of_their_data_set(data, cifar):
    """MNIST's squares and Fashion-MNIST's bars, (1, 28, 28); CIFAR-10's colour squares, stored
    (H, W, C), come as (3, 32, 32). Labels come with them."""
    images, labels = fm.load_data("mnist", data, train=False)
    assert images.shape == (16, 1, 28, 28) and images.dtype == torch.uint8
    assert images[3, 0, 2, 20] == 255 and images[3, 0, 2, 19] == 0  # class 3: a square at column 20
    assert labels.tolist() == [i % 10 for i in range(16)]
    fashion, _ = fm.load_data("fashion-mnist", data, train=False)
    assert torch.equal(fashion[3, 0], bars(3).to(torch.uint8))      # not the squares of MNIST
    colour, labels = fm.load_data("cifar10", data, train=True)
    assert colour.shape == (50, 3, 32, 32) and colour.is_contiguous() and len(labels) == 50
    assert torch.equal(colour[7], colour_squares(7).permute(2, 0, 1))


def test_missing_data_names_its_folder_and_files_and_leaves_no_folders(tmp_path, monkeypatch,
                                                                        capsys):
    for proxy in ["http_proxy", "https_proxy"]:                     # no download
        monkeypatch.setenv(proxy, OFFLINE[proxy])
    with pytest.raises(SystemExit) as stop:
        fm.load_data("fashion-mnist", str(tmp_path / "data"))
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert str(tmp_path / "data" / "FashionMNIST" / "raw") in error
    assert "t10k-labels-idx1-ubyte.gz" in error
    assert os.listdir(tmp_path) == []


def test_missing_cifar10_names_the_archive_and_the_folder_torchvision_unpacks_it_to(
        tmp_path, monkeypatch, capsys):
    for proxy in ["http_proxy", "https_proxy"]:
        monkeypatch.setenv(proxy, OFFLINE[proxy])
    root = tmp_path / "data"
    with pytest.raises(SystemExit) as stop:
        fm.load_data("cifar10", str(root))
    (line,) = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and line.startswith("error: cifar10 is not in")
    assert f"{root / 'cifar-10-batches-py'} and" in line
    assert f"cifar-10-python.tar.gz in {root}" in line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"),
                                                 (False, False, "cpu")])
def test_device_auto_takes_cuda_then_mps_then_the_cpu(cuda, mps, expected, monkeypatch, capsys):
    """--device auto finds what there is; a device asked for that is not there: one error line."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert fm.pick_device("auto") == torch.device(expected)
    assert fm.pick_device("cpu") == torch.device("cpu")
    for name, present in [("cuda", cuda), ("mps", mps)]:
        if present:
            assert fm.pick_device(name) == torch.device(name)
            continue
        with pytest.raises(SystemExit) as stop:
            fm.pick_device(name)
        assert stop.value.code == 2 and f"no {name} device" in capsys.readouterr().err


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_bfloat16_is_used_only_where_it_is_native(cpu_bf16, monkeypatch):
    """CUDA: when it supports bfloat16; the CPU: with AVX-512 BF16; MPS: never; --fp32: never."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: cpu_bf16, raising=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: not cpu_bf16)
    assert fm.use_bfloat16(torch.device("cpu"), False) == cpu_bf16
    assert fm.use_bfloat16(torch.device("cuda"), False) == (not cpu_bf16)
    assert not fm.use_bfloat16(torch.device("mps"), False)
    for device in ["cpu", "cuda", "mps"]:
        assert not fm.use_bfloat16(torch.device(device), True)


# --- 10. The run's settings and checkpoints -------------------------------------------------------

def test_train_writes_a_checkpoint_with_its_settings_and_sample_grids(run):
    ckpt = load(run / "ckpt.pt")
    assert ckpt["step"] == 12 and ckpt["guide"] is not None
    config = fm.RunConfig(**ckpt["config"])
    assert (config.widths, config.batch_size, config.steps, config.save_every) == ((8, 8), 8, 12, 6)
    assert (config.dataset, config.lr, config.sigma_min) == ("mnist", 2e-3, 0.0)
    assert (config.class_cond, config.image_shape, config.classes) == (False, (1, 28, 28), 10)
    assert (run / "samples_000006.png").exists() and (run / "samples_000012.png").exists()
    assert not (run / "ckpt.pt.tmp").exists()


def test_a_new_run_takes_the_flags_given_over_the_defaults_and_10_minutes_without_a_budget():
    config, ckpt = fm.run_config(argparse.Namespace(resume=False, lr=1e-3))
    assert ckpt is None and config == fm.RunConfig(lr=1e-3, minutes=10.0)
    config, _ = fm.run_config(argparse.Namespace(resume=False, steps=5))
    assert (config.steps, config.minutes) == (5, None)              # --steps alone: no clock limit
    assert fm.RunConfig().minutes == 10.0 and fm.RunConfig().save_every == 1000


def test_a_budget_given_with_resume_replaces_the_runs_budget(data, tmp_path):
    """--steps or --minutes with --resume is the whole new budget; neither keeps the run's own."""
    main("train", "--data-dir", data, "--out", tmp_path, "--steps", 1, "--minutes", 60, *TINY)
    given = dict(resume=True, out=str(tmp_path))
    config, _ = fm.run_config(argparse.Namespace(**given, steps=3))
    assert (config.steps, config.minutes) == (3, None)
    config, _ = fm.run_config(argparse.Namespace(**given, minutes=5.0))
    assert (config.steps, config.minutes) == (None, 5.0)
    config, _ = fm.run_config(argparse.Namespace(**given))
    assert (config.steps, config.minutes) == (1, 60.0)


def test_resume_keeps_the_run_settings_and_its_clock(data, tmp_path):
    """--resume --steps N continues with the stored learning rate, batch size and widths, and adds
    its time to the run's: the learning rate's schedule and a --minutes budget count all of it."""
    main("train", "--data-dir", data, "--out", tmp_path, "--steps", 2, "--lr", 1e-3,
         "--widths", "8,16", "--batch-size", 4)
    ckpt = load(tmp_path / "ckpt.pt")
    ckpt["elapsed"] = 3600.0                                        # as if it had trained an hour
    torch.save(ckpt, tmp_path / "ckpt.pt")
    main("train", "--data-dir", data, "--out", tmp_path, "--resume", "--steps", 4)
    resumed = load(tmp_path / "ckpt.pt")
    config = fm.RunConfig(**resumed["config"])
    assert (config.lr, config.batch_size, config.widths, config.steps) == (1e-3, 4, (8, 16), 4)
    assert resumed["step"] == 4 and resumed["elapsed"] > 3600
    last_lr = resumed["optimizer"]["param_groups"][0]["lr"]
    assert last_lr == pytest.approx(fm.learning_rate(1e-3, 3, 3 / 4))
    main("train", "--data-dir", data, "--out", tmp_path, "--resume", "--steps", 8, "--minutes", 60,
         "--save-every", 3)
    assert load(tmp_path / "ckpt.pt")["step"] == 4                  # the hour was already spent
    assert load(tmp_path / "ckpt.pt")["config"]["save_every"] == 3  # a resume may change it


def test_resume_keeps_a_class_conditional_run_class_conditional(cond_run, data, tmp_path):
    """--resume without --class-cond continues with labels; with it, the same."""
    for flags in [[], ["--class-cond"]]:
        out = tmp_path / str(len(flags))
        out.mkdir()
        torch.save(load(cond_run / "ckpt.pt"), out / "ckpt.pt")
        main("train", "--data-dir", data, "--out", out, "--resume", "--steps", 13, *flags)
        ckpt = load(out / "ckpt.pt")
        assert ckpt["step"] == 13 and ckpt["config"]["class_cond"]
        assert "label_emb.weight" in ckpt["model"]


def test_a_crash_while_saving_leaves_the_last_checkpoint_whole(run, tmp_path, monkeypatch):
    ckpt, config = fm.load_checkpoint(str(run / "ckpt.pt"))
    model, ema = fm.build_model(config, ckpt["model"]), fm.build_model(config, ckpt["ema"])
    state = fm.TrainState(model, ema, fm.adam(model, 1e-3), step=99)
    fm.save_run(state, config, str(tmp_path))
    save = torch.save

    def crash(obj, path):
        save({"half": "written"}, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(fm.torch, "save", crash)
    state.step = 100
    with pytest.raises(KeyboardInterrupt):
        fm.save_run(state, config, str(tmp_path))
    assert load(tmp_path / "ckpt.pt")["step"] == 99


def test_a_checkpoint_that_would_run_code_is_refused_unrun(tmp_path):
    """torch.load with weights_only=True: a pickle whose loading calls a function is not loaded."""
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))

    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    result = cli("sample", "--ckpt", tmp_path / "evil.pt", check=False)
    assert result.returncode == 2 and "is not a readable checkpoint" in result.stderr
    assert not (tmp_path / "ran").exists()


def test_a_checkpoint_from_any_device_loads_on_the_cpu_first(run, monkeypatch):
    """map_location='cpu': tensors saved on a GPU are read into memory, then moved to --device."""
    calls, torch_load = [], torch.load

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return torch_load(*args, **kwargs)

    monkeypatch.setattr(fm.torch, "load", recorded)
    fm.load_checkpoint(str(run / "ckpt.pt"))
    assert calls == [dict(map_location="cpu", weights_only=True)]


# --- 11. The training run -------------------------------------------------------------------------

def test_train_says_what_it_trains_on(data, tmp_path, capsys, cifar):
    main("train", "--data-dir", data, "--out", tmp_path / "a", "--steps", 1, *TINY)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("mnist: 64 images of 1x28x28 on cpu") and "from step 0" in first
    assert "M parameters" in first and "class-conditional" not in first
    main("train", "--data-dir", data, "--out", tmp_path / "b", "--steps", 1, "--class-cond",
         "--dataset", "cifar10", "--device", "cpu", *TINY)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("cifar10: 50 images of 3x32x32 on cpu")
    assert "class-conditional" in first


def test_the_guide_is_the_ema_after_the_step_that_starts_a_quarter_of_the_way_in(
        data, tmp_path, monkeypatch):
    """Of 8 steps, the third starts at progress 2/8 = 1/4: the guide is the EMA after 3 steps."""
    emas, update = [], fm.ema_update

    def recorded(ema, model, step):
        update(ema, model, step)
        emas.append({k: v.clone() for k, v in ema.state_dict().items()})

    monkeypatch.setattr(fm, "ema_update", recorded)
    main("train", "--data-dir", data, "--out", tmp_path, "--steps", 8, *TINY)
    guide = load(tmp_path / "ckpt.pt")["guide"]
    same = [all(torch.equal(guide[k], ema[k]) for k in guide) for ema in emas]
    assert same == [i == 2 for i in range(8)]


def test_the_same_seed_trains_the_same_weights_and_another_seed_other_weights(data, tmp_path):
    """--seed decides the initial weights and every batch: the comparisons over seeds rest on it."""
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        main("train", "--data-dir", data, "--out", tmp_path / name, "--steps", 2, "--seed", seed,
             *TINY)
    a, b, c = (load(tmp_path / name / "ckpt.pt")["model"] for name in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["stem.weight"], c["stem.weight"])


def test_the_learning_rate_decays_over_the_minutes_when_they_run_out_first(data, tmp_path):
    """With --minutes 0.1 and --steps 10⁶ the clock stops the run, so the last step's rate is near
    0: below half of what the schedule over 10⁶ steps would give it at that step."""
    main("train", "--data-dir", data, "--out", tmp_path, "--minutes", 0.1, "--steps", 10 ** 6,
         *TINY)
    ckpt = load(tmp_path / "ckpt.pt")
    last = ckpt["step"] - 1
    over_the_steps = fm.learning_rate(2e-3, last, last / 1e6)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] < 0.5 * over_the_steps


@pytest.mark.parametrize("seconds, expected", [(1, [10, 40]), (20, [2, 4, 6, 8, 10, 12, 14])])
def test_progress_is_printed_after_10_steps_then_every_30_seconds(seconds, expected, data,
                                                                  tmp_path, monkeypatch, capsys):
    """A clock that moves `seconds` per step: a line at step 10, and whenever 30 s have passed."""
    readings = iter(range(0, 10 ** 6, seconds))
    monkeypatch.setattr(fm.time, "perf_counter", lambda: next(readings))
    main("train", "--data-dir", data, "--out", tmp_path, "--steps", max(expected), *TINY)
    steps = [int(line.split()[1]) for line in capsys.readouterr().out.splitlines()
             if line.startswith("step ") and "loss" in line]
    assert steps == expected


def test_bfloat16_autocast_only_on_cpus_with_avx512_bf16_and_not_with_fp32(data, tmp_path,
                                                                            monkeypatch, capsys):
    """oneDNN's own bfloat16 check also passes AVX-512 CPUs that only emulate bfloat16, slower than
    float32. With --fp32 the weights are those of a float32 run, bit for bit."""
    runs = [("plain", False, []), ("bf16", True, []), ("fp32", True, ["--fp32"])]
    for name, native, flags in runs:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
        main("train", "--data-dir", data, "--out", tmp_path / name, "--steps", 2, *TINY, *flags)
        assert ("with bfloat16 autocast" in capsys.readouterr().out) == (name == "bf16")
    plain, fp32 = load(tmp_path / "plain" / "ckpt.pt"), load(tmp_path / "fp32" / "ckpt.pt")
    assert all(torch.equal(plain["model"][k], fp32["model"][k]) for k in plain["model"])


def test_a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main("train", "--data-dir", data, "--out", tmp_path, "--steps", 50, "--save-every", 1,
             "--lr", 1e30, *TINY)
    assert stop.value.code == 2 and "the loss is" in capsys.readouterr().err
    ckpt = load(tmp_path / "ckpt.pt")
    assert ckpt["step"] < 50
    assert all(torch.isfinite(p).all() for p in ckpt["model"].values())


def test_resume_after_ctrl_c_gives_the_same_weights_as_an_uninterrupted_run(data, tmp_path):
    """Ctrl-C saves a checkpoint; --resume alone then ends bit-identical to one long run."""
    flags = ["--data-dir", data, "--steps", 300, "--save-every", 1000, *TINY]
    cli("train", "--out", tmp_path / "whole", *flags)
    command = [sys.executable, os.path.join(HERE, "flow_matching.py"), "train",
               "--out", tmp_path / "cut", *flags]
    proc = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, text=True, env=OFFLINE)
    for line in proc.stdout:
        if line.startswith("step") and "loss" in line:              # the first progress line
            proc.send_signal(signal.SIGINT)
            break
    assert "on a stop signal" in proc.communicate(timeout=120)[0] and proc.returncode == 0
    assert 1 <= load(tmp_path / "cut" / "ckpt.pt")["step"] < 300
    cli("train", "--data-dir", data, "--out", tmp_path / "cut", "--resume")
    whole, cut = load(tmp_path / "whole" / "ckpt.pt"), load(tmp_path / "cut" / "ckpt.pt")
    assert cut["step"] == whole["step"] == 300
    for key in ["model", "ema", "guide"]:                           # the guide: before the cut
        for name, tensor in whole[key].items():
            assert torch.equal(tensor, cut[key][name]), f"{key}.{name}"
    assert torch.equal(whole["rng"], cut["rng"])


def test_sigterm_and_ctrl_c_stop_the_run_which_saves(data, tmp_path, monkeypatch, capsys):
    """train listens for SIGINT and SIGTERM; SIGTERM at step 3 of 50 ends the run there, saved."""
    handlers, draw_batch = {}, fm.draw_batch

    def terminated_at_step_3(*args, **kwargs):
        if len(calls) == 3:
            handlers[signal.SIGTERM](signal.SIGTERM, None)
        calls.append(1)
        return draw_batch(*args, **kwargs)

    calls = []
    def install(number, handler):
        handlers[number] = handler

    monkeypatch.setattr(fm.signal, "signal", install)
    monkeypatch.setattr(fm, "draw_batch", terminated_at_step_3)
    fm.main(["train", "--data-dir", data, "--out", str(tmp_path), "--steps", "50", *TINY])
    assert set(handlers) == {signal.SIGINT, signal.SIGTERM}
    assert load(tmp_path / "ckpt.pt")["step"] == 4                  # the step under way finishes
    assert "step 4, 0.0 min on a stop signal" in capsys.readouterr().out


class ClosedPipe(io.StringIO):
    """Standard output whose reader has gone after `lines` writes (`... | head -1`); its file
    number is a scratch file's, which main points at /dev/null."""
    def __init__(self, scratch, lines=0):
        super().__init__()
        self.scratch, self.lines = scratch, lines

    def write(self, text):
        if self.lines <= 0:
            raise BrokenPipeError
        self.lines -= text.count("\n")
        return super().write(text)

    def fileno(self):
        return self.scratch.fileno()


def test_a_closed_pipe_stops_training_as_ctrl_c_does_and_ends_quietly(data, tmp_path, capsys,
                                                                       monkeypatch):
    """`train | head -1`: the progress line after 10 steps finds no reader, so the run saves at
    step 10 and the command ends with exit code 1 and nothing on stderr."""
    with open(tmp_path / "scratch", "w") as scratch:
        monkeypatch.setattr(sys, "stdout", ClosedPipe(scratch, lines=1))
        with pytest.raises(SystemExit) as stop:
            main("train", "--data-dir", data, "--out", tmp_path / "r", "--steps", 300, *TINY)
    assert stop.value.code == 1 and capsys.readouterr().err == ""
    assert load(tmp_path / "r" / "ckpt.pt")["step"] == 10


def test_train_follows_the_path_of_its_sigma_min(data, tmp_path, monkeypatch):
    sigmas, loss = [], fm.cfm_loss

    def recorded(model, x0, x1, t, sigma_min, y=None):
        sigmas.append(sigma_min)
        return loss(model, x0, x1, t, sigma_min, y)

    monkeypatch.setattr(fm, "cfm_loss", recorded)
    main("train", "--data-dir", data, "--out", tmp_path, "--steps", 2, "--sigma-min", 0.25, *TINY)
    assert sigmas == [0.25, 0.25]


@pytest.mark.parametrize("dataset, class_cond", [("mnist", False), ("fashion-mnist", True),
                                                 ("cifar10", True)])
def test_batches_come_from_the_data_set_with_labels_if_asked_and_flips_only_for_cifar10(
        dataset, class_cond, data, tmp_path, monkeypatch, cifar):
    """train's batches: its data set's images, its labels with ∅ = 10 when --class-cond, and
    mirrored images for CIFAR-10 alone."""
    calls, draw_batch = [], fm.draw_batch

    def recorded(images, batch_size, labels=None, null_label=None, flip=False, t_scale=1.0):
        calls.append((images, labels, null_label, flip, t_scale))
        return draw_batch(images, batch_size, labels, null_label, flip, t_scale)

    monkeypatch.setattr(fm, "draw_batch", recorded)
    flags = ["--class-cond", "--t-scale", 1.5] if class_cond else []
    main("train", "--data-dir", data, "--out", tmp_path, "--steps", 2, "--dataset", dataset,
         *flags, *TINY)
    (images, labels, null_label, flip, t_scale), _ = calls
    assert torch.equal(images, fm.load_data(dataset, data)[0])
    assert (labels is not None) == class_cond and null_label == 10
    assert flip == (dataset == "cifar10") and t_scale == (1.5 if class_cond else 1.0)
    assert load(tmp_path / "ckpt.pt")["config"]["dataset"] == dataset


def test_the_last_grid_is_drawn_by_the_moving_average_alone(run, cond_run, tmp_path):
    """RK4 in 5 steps, from the noises of seed 0, by the EMA of the checkpoint, no guidance; a
    class-conditional run's grid has a class per column, 10 columns."""
    for folder, step, columns in [(run, 12, 8), (cond_run, 12, 10)]:
        ckpt, config = fm.load_checkpoint(str(folder / "ckpt.pt"))
        ema = fm.build_model(config, ckpt["ema"])
        noise = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        labels = torch.arange(64) % 10 if config.class_cond else None
        expected = generated(fm.GuidedField(ema, labels), noise, fm.Solver("rk4", 5))
        fm.save_image(expected, tmp_path / "expected.png", nrow=columns)
        assert torch.equal(read_png(folder / f"samples_{step:06d}.png"),
                           read_png(tmp_path / "expected.png"))


# --- 12. Sampling and likelihood ------------------------------------------------------------------

def test_sample_writes_a_tensor_and_a_grid_and_repeats_with_a_seed(run, tmp_path, capsys):
    base = ["sample", "--ckpt", run / "ckpt.pt", "--steps", 3, "--n", 6]
    main(*base, "--out", tmp_path / "a.pt")
    # RK4's 3 steps start at t = 0, 0.26 and 0.74: the guide runs at 6 of the 12 evaluations of v
    assert "rk4, 3 steps, autoguidance 2.5, 18 network evaluations each" in capsys.readouterr().out
    main(*base, "--out", tmp_path / "b.pt")
    main(*base, "--out", tmp_path / "c.pt", "--seed", 1)
    a, b, c = load(tmp_path / "a.pt"), load(tmp_path / "b.pt"), load(tmp_path / "c.pt")
    assert a.shape == (6, 1, 28, 28) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    main(*base, "--out", tmp_path / "two.pt", "--autoguidance", 2.5)
    assert torch.equal(a, load(tmp_path / "two.pt"))                # the default weight is 2.5
    main(*base, "--out", tmp_path / "alone.pt", "--autoguidance", 1, "--solver", "euler")
    assert "autoguidance 1, 3 network evaluations each" in capsys.readouterr().out
    assert not torch.equal(a, load(tmp_path / "alone.pt"))
    main(*base, "--out", tmp_path / "new" / "grid.png")             # the folder is made
    assert read_png(tmp_path / "new" / "grid.png").shape[1:] == (2 + 2 * 30, 2 + 3 * 30)


def test_drawn_samples_carry_no_graph_even_from_a_network_that_trains():
    """draw_samples integrates under no_grad: no autograd graph is kept across the steps."""
    net = fm.VelocityNet(1, widths=[8, 16, 16])                     # its weights require gradients
    images = fm.draw_samples(fm.GuidedField(net), torch.randn(2, 1, 28, 28), None, fm.Solver())
    assert images.shape == (2, 1, 28, 28) and not images.requires_grad


@pytest.mark.parametrize("flags, solver, steps, guided, evaluations", [
    ([], "rk4", 5, (0.2, 0.8), 30), (["--steps", 2], "rk4", 2, (0.2, 0.8), 14),
    (["--solver", "ab2"], "ab2", 7, (0.2, 0.6), 10), (["--solver", "ab2", "--steps", 5], "ab2", 5,
                                                      (0.2, 0.6), 6),
    (["--solver", "euler"], "euler", 7, (0.2, 0.6), 10)])
def test_the_default_sampler_is_rk4_in_five_steps_and_ab2_takes_ten_network_evaluations(
        flags, solver, steps, guided, evaluations, run, tmp_path, monkeypatch):
    """RK4 in 5 steps, the guide run at the evaluations in 0.2 ≤ t ≤ 0.8: 30 network evaluations a
    sample; AB2 (and Euler) in 7 steps, guided at the 3 that start in 0.2 ≤ t ≤ 0.6: 10; --steps
    still counts (AB2 in 5 steps: the guide at 1). The presets are SAMPLERS's, in Part I."""
    fields = []
    monkeypatch.setattr(fm, "draw_samples", lambda v, *args: fields.append((v, args)) or
                        torch.zeros(2, 1, 28, 28))
    main("sample", "--ckpt", run / "ckpt.pt", "--n", 2, "--out", tmp_path / "s.pt", *flags)
    (v, (_, _, used, *_)), = fields
    assert used == fm.Solver(solver, steps, guided=guided) and v.times == guided
    assert fm.SAMPLERS[solver] == fm.Solver(solver, 5 if solver == "rk4" else 7, guided=guided)
    ckpt, config = fm.load_checkpoint(str(run / "ckpt.pt"))
    v = fm.GuidedField(fm.build_model(config, ckpt["ema"]), None, 1.0,
                       fm.build_model(config, ckpt["guide"]), 2.5, guided)
    generated(v, torch.zeros(1, 1, 28, 28), used)
    assert v.passes == evaluations


def test_the_trajectory_alone_writes_no_grid_and_every_file_written_is_named(run, tmp_path,
                                                                             monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main("sample", "--ckpt", run / "ckpt.pt", "--n", 8, "--steps", 2, "--trajectory", "flow.png")
    assert os.listdir(tmp_path) == ["flow.png"]
    assert "wrote flow.png" in capsys.readouterr().out
    main("sample", "--ckpt", run / "ckpt.pt", "--n", 8, "--solver", "rk4", "--steps", 2)
    assert sorted(os.listdir(tmp_path)) == ["flow.png", "samples.png"]
    assert "wrote samples.png" in capsys.readouterr().out


@pytest.mark.parametrize("native, flags, bf16", [(False, [], False), (True, [], True),
                                                  (True, ["--fp32"], False)])
def test_samples_are_the_moving_average_guided_by_the_guide_from_the_seeds_noise(
        native, flags, bf16, run, tmp_path, monkeypatch):
    """sample --seed 3 = RK4 on GuidedField(EMA, guide, 2.5, 0.2 ≤ t ≤ 0.8) from randn with seed 3,
    every sample from its own noise, past the first 128 (sample draws 128 at a time) too; the
    networks run under bfloat16 autocast where train's do: on CPUs with AVX-512 BF16, not --fp32."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    main("sample", "--ckpt", run / "ckpt.pt", "--n", 130, "--steps", 2, "--seed", 3,
         "--out", tmp_path / "s.pt", *flags)
    ckpt, config = fm.load_checkpoint(str(run / "ckpt.pt"))
    ema, guide = fm.build_model(config, ckpt["ema"]), fm.build_model(config, ckpt["guide"])
    noise = torch.randn(130, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    expected = {}
    for autocast in (False, True):
        v = fm.GuidedField(ema, guide=guide, autoguidance=2.5)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            expected[autocast] = generated(v, noise, fm.Solver("rk4", 2))
    assert (expected[True] - expected[False]).abs().max() > 1e-4   # 10x the tolerance below
    torch.testing.assert_close(load(tmp_path / "s.pt"), expected[bf16], atol=1e-5, rtol=0)


def test_the_trajectory_shows_x_t_from_the_noise_to_the_samples(run, tmp_path):
    """A row for each of the first 8 samples: its first column is the noise at t=0 and its last the
    sample, as --out has it; past the first chunk of 128, samples add no columns."""
    main("sample", "--ckpt", run / "ckpt.pt", "--n", 130, "--steps", 2, "--out", tmp_path / "s.png",
         "--trajectory", tmp_path / "flow.png")
    samples, flow = read_png(tmp_path / "s.png"), read_png(tmp_path / "flow.png")
    assert flow.shape[1:] == (2 + 8 * 30, 2 + 3 * 30)               # noise, then 2 steps
    noise = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    first = fm.to_unit_scale(noise[0]).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    assert torch.equal(flow[0, 2:30, 2:30], first[0])
    assert torch.equal(flow[:, 2:30, 2 + 2 * 30:30 * 3], samples[:, 2:30, 2:30])
    assert flow.shape[1:] == (2 + 8 * 30, 2 + 3 * 30)              # 8 samples, x_0, x_0.5, x_1


def test_a_class_conditional_sample_goes_round_the_classes_with_classifier_free_guidance(
        cond_run, tmp_path, capsys):
    """No --label: sample i draws class i mod 10, a class per column of the grid; by default with
    classifier-free guidance 2 mid-path and no autoguidance: 2 RK4 steps evaluate v at t = 0, ¼
    and ¼, ½, then ½, ¾, ¾ and 1; the null label's at the 6 in 0.2 ≤ t ≤ 0.8: 14 in all."""
    main("sample", "--ckpt", cond_run / "ckpt.pt", "--n", 25, "--steps", 2, "--out",
         tmp_path / "s.pt", "--fp32")
    out = capsys.readouterr().out
    assert "guidance 2, autoguidance 1, 14 network evaluations each" in out
    ckpt, config = fm.load_checkpoint(str(cond_run / "ckpt.pt"))
    ema = fm.build_model(config, ckpt["ema"])
    noise = torch.randn(25, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    v = fm.GuidedField(ema, torch.arange(25) % 10, guidance=2.0)
    expected = generated(v, noise, fm.Solver("rk4", 2))
    torch.testing.assert_close(load(tmp_path / "s.pt"), expected, atol=1e-5, rtol=0)
    main("sample", "--ckpt", cond_run / "ckpt.pt", "--n", 25, "--steps", 2, "--out",
         tmp_path / "s.png")
    assert read_png(tmp_path / "s.png").shape[1:] == (2 + 3 * 30, 2 + 10 * 30)   # 10 columns


def test_a_label_draws_its_class_and_other_labels_draw_other_images(cond_run, tmp_path):
    """--label K: every sample is class K's, from the same noises; --guidance 1 turns it off."""
    ckpt, config = fm.load_checkpoint(str(cond_run / "ckpt.pt"))
    ema = fm.build_model(config, ckpt["ema"])
    noise = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    samples = {}
    for label, w in [(3, 2.0), (4, 2.0), (3, 1.0)]:
        path = tmp_path / f"{label}_{w}.pt"
        main("sample", "--ckpt", cond_run / "ckpt.pt", "--n", 4, "--steps", 2, "--out", path,
             "--label", label, "--guidance", w, "--fp32")
        samples[label, w] = load(path)
        v = fm.GuidedField(ema, torch.full((4,), label), guidance=w)
        torch.testing.assert_close(samples[label, w], generated(v, noise, fm.Solver("rk4", 2)),
                                   atol=1e-5, rtol=0)
    assert not torch.equal(samples[3, 2.0], samples[4, 2.0])
    assert not torch.equal(samples[3, 2.0], samples[3, 1.0])


def test_a_colour_run_trains_samples_and_measures_likelihood_in_its_shape(data, tmp_path, capsys,
                                                                          cifar):
    """Fake CIFAR-10, class-conditional: a 3-channel network, samples (N, 3, 32, 32), bits/dim."""
    main("train", "--data-dir", data, "--out", tmp_path, "--dataset", "cifar10", "--steps", 4,
         "--class-cond", *TINY)
    ckpt = load(tmp_path / "ckpt.pt")
    assert ckpt["config"]["image_shape"] == (3, 32, 32)
    assert ckpt["ema"]["stem.weight"].shape[1] == 3 and ckpt["ema"]["head.2.weight"].shape[0] == 3
    main("sample", "--ckpt", tmp_path / "ckpt.pt", "--n", 3, "--steps", 1, "--label", 9,
         "--out", tmp_path / "s.pt")
    assert load(tmp_path / "s.pt").shape == (3, 3, 32, 32)
    capsys.readouterr()
    main("likelihood", "--ckpt", tmp_path / "ckpt.pt", "--data-dir", data, "--n", 2, "--solver",
         "rk4", "--steps", 1)
    assert "bits/dim on 2 cifar10 test images" in capsys.readouterr().out


def test_likelihood_prints_bits_per_dim_and_the_evaluations(run, data, capsys):
    main("likelihood", "--ckpt", run / "ckpt.pt", "--data-dir", data, "--n", 8, "--solver", "rk4",
         "--steps", 2)
    out = capsys.readouterr().out
    assert 0 < float(out.split()[0]) < 100
    assert "on 8 mnist test images" in out and "8 network evaluations" in out
    main("likelihood", "--ckpt", run / "ckpt.pt", "--data-dir", data, "--n", 200, "--solver", "rk4",
         "--steps", 1)
    assert "on 16 mnist test images" in capsys.readouterr().out     # --n beyond the test set


def test_likelihood_takes_dopri5_at_1e_5_unless_another_tolerance_is_asked(run, data, capsys,
                                                                         monkeypatch):
    """By default dopri5 at rtol = atol = 1e-5; --tol 1e-3 reaches the solver as its tolerance."""
    used, dopri5 = [], fm.dopri5

    def recorded(v, x, t0, t1, rtol, atol, trajectory=None):
        used.append((rtol, atol))
        return dopri5(v, x, t0, t1, rtol, atol, trajectory)

    monkeypatch.setattr(fm, "dopri5", recorded)
    for flags, said, tol in [([], "dopri5, tolerance 1e-05", 1e-5),
                             (["--tol", 1e-3], "dopri5, tolerance 0.001", 1e-3)]:
        main("likelihood", "--ckpt", run / "ckpt.pt", "--data-dir", data, "--n", 4, *flags)
        assert said in capsys.readouterr().out and used.pop() == (tol, tol)


def test_likelihood_repeats_with_its_seed(run, data, monkeypatch):
    """--seed picks the images, and the random state that draws their dequantisation noise and
    random signs."""
    calls, bits_per_dim = [], fm.bits_per_dim

    def recorded(pixels, v, solver):
        calls.append((pixels.clone(), torch.get_rng_state()))
        return bits_per_dim(pixels, v, solver)

    monkeypatch.setattr(fm, "bits_per_dim", recorded)
    for seed in (1, 1, 2):
        main("likelihood", "--ckpt", run / "ckpt.pt", "--data-dir", data, "--n", 4, "--tol", 1e-3,
             "--seed", seed)
    (pixels, state), again, other = calls
    assert torch.equal(pixels, again[0]) and torch.equal(state, again[1])
    assert not torch.equal(pixels, other[0]) and not torch.equal(state, other[1])


def test_a_class_conditional_likelihood_is_the_unconditional_density_through_the_null_label(
        cond_run, data, tmp_path, capsys):
    """The printed bits/dim are those of v(x, t, ∅) on the seed's images and draws (the network's
    weights made random, so that labels matter)."""
    ckpt, config = fm.load_checkpoint(str(cond_run / "ckpt.pt"))
    ema = randomize(fm.build_model(config, ckpt["ema"]))
    torch.save(dict(ckpt, ema=ema.state_dict()), tmp_path / "ckpt.pt")
    main("likelihood", "--ckpt", tmp_path / "ckpt.pt", "--data-dir", data, "--n", 4, "--solver",
         "rk4", "--steps", 1)
    printed = float(capsys.readouterr().out.split()[0])
    images, _ = fm.load_data("mnist", data, train=False)
    expected = {}
    for name, y in [("null", None), ("label 0", torch.zeros(4, dtype=torch.long))]:
        torch.manual_seed(0)
        pixels = images[torch.randperm(len(images))[:4]]
        bpd = fm.bits_per_dim(pixels, fm.GuidedField(ema, y), fm.Solver("rk4", 1))
        expected[name] = round(bpd.mean().item(), 3)
    assert printed == expected["null"] != expected["label 0"]


@pytest.mark.parametrize("command, n, size", [("sample", 300, 128), ("sample", 256, 128),
                                             ("likelihood", 16, 4)])
def test_long_samples_and_likelihoods_print_progress_every_30_seconds(command, n, size, run, data,
                                                                      tmp_path, monkeypatch,
                                                                      capsys):
    """A clock that moves 40 s per reading: each chunk takes 40 s, so a line after each but the
    last: the images done, their rate since the start, the time left. (likelihood: chunks of 4 of
    the 16 test images.)"""
    readings = iter(range(0, 10 ** 6, 40))
    monkeypatch.setattr(fm.time, "perf_counter", lambda: next(readings))
    in_chunks = fm.in_chunks
    monkeypatch.setattr(fm, "in_chunks", lambda total: in_chunks(total, size))
    flags = ["--out", tmp_path / "s.pt"] if command == "sample" else ["--data-dir", data,
                                                                      "--solver", "rk4"]
    main(command, "--ckpt", run / "ckpt.pt", "--n", n, "--steps", 1, *flags)
    lines = [line for line in capsys.readouterr().out.splitlines() if " of " in line]
    done = list(range(size, n, size))                               # not the last chunk
    assert [int(line.split()[0]) for line in lines] == done
    assert all(f"of {n} images" in line for line in lines)
    for k, line in enumerate(lines, start=1):                       # k chunks in 40 k seconds
        assert float(line.split()[4]) == pytest.approx(size / 40, abs=0.05)   # images per second
        left = (n - k * size) / (size / 40) / 60
        assert float(line.split()[6]) == pytest.approx(left, abs=0.05)        # minutes left


def test_a_closed_pipe_ends_sample_quietly_after_writing_its_samples(run, tmp_path):
    """`sample ... | head -1` with the reader gone before the line comes: exit code 1, no
    traceback, and the samples are written."""
    command = [sys.executable, os.path.join(HERE, "flow_matching.py"), "sample", "--ckpt",
               run / "ckpt.pt", "--n", 4, "--steps", 1, "--out", tmp_path / "s.pt"]
    proc = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=OFFLINE)
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and stderr == ""
    assert load(tmp_path / "s.pt").shape == (4, 1, 28, 28)


# --- 13. Command line -----------------------------------------------------------------------------

def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        fm.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for default in ["(default 0.002)", "(default 128)", "(default 32,64,128,128)", "(default 10.0)",
                    "(default runs/mnist)", "(default ./data)", "replaces the budget",
                    "(default auto)", "1 label in 10", "t=1 on the OT path (default 0.0)",
                    "same weights (default 0)", "s ~ N(0, T²) (default 1.0)"]:
        assert default in out
    with pytest.raises(SystemExit):
        fm.main(["sample", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for default in ["rk4 (default 5), ab2 or euler (7)", "(default 64)", "(default rk4)",
                    "(default 0)", "dopri5 sizes its own steps", "(default 2",
                    "i mod 10", "(default auto)", "guidance (default 2)", "(default 2.5 for an",
                    "rtol = atol (default 1e-05)"]:
        assert default in out
    with pytest.raises(SystemExit):
        fm.main(["likelihood", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for default in ["(default 128: ± 0.03", "(default dopri5)", "rtol = atol (default 1e-05)",
                    "(default ./data)"]:
        assert default in out


def bad_inputs(run, cond_run, data, tmp):
    """Each case: the command line, and words its one error line must hold."""
    ckpt = run / "ckpt.pt"
    cond = cond_run / "ckpt.pt"
    a_file = tmp / "file"
    a_file.write_text("")
    (tmp / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    torch.save(torch.zeros(3), tmp / "tensor.pt")
    for folder in ["empty", "folder.png", "clash/ckpt.pt", "taken", "partial"]:
        (tmp / folder).mkdir(parents=True)
    partial = {k: v for k, v in load(ckpt).items() if k != "optimizer"}
    torch.save(partial, tmp / "partial" / "ckpt.pt")
    torch.save(dict(load(ckpt), guide=None), tmp / "unguided.pt")
    torch.save(load(ckpt), tmp / "taken" / "ckpt.pt")
    train = ["train", "--data-dir", data]
    resume = [*train, "--out", run, "--resume"]
    return {
        "missing checkpoint": (["sample", "--ckpt", tmp / "none.pt"], "no checkpoint at"),
        "corrupt checkpoint": (["sample", "--ckpt", tmp / "corrupt.pt"], "not a readable"),
        "not a checkpoint": (["sample", "--ckpt", tmp / "tensor.pt"], "not a checkpoint of"),
        "partial checkpoint": (["sample", "--ckpt", tmp / "partial" / "ckpt.pt"],
                               "not a checkpoint of"),
        "unknown solver": (["sample", "--ckpt", ckpt, "--solver", "heun"], "invalid choice"),
        "autoguidance, no guide": (["sample", "--ckpt", tmp / "unguided.pt", "--autoguidance", 3],
                                   "holds no guide"),
        "negative autoguidance": (["sample", "--ckpt", ckpt, "--autoguidance", -1], "non-negative"),
        "trajectory not a png": (["sample", "--ckpt", ckpt, "--trajectory", tmp / "f.jpg"],
                                 "must end in .png"),
        "zero steps": (["sample", "--ckpt", ckpt, "--steps", 0], "positive integer"),
        "steps for dopri5": (["sample", "--ckpt", ckpt, "--solver", "dopri5", "--steps", 3],
                             "--steps does not apply to --solver dopri5"),
        "tolerance for rk4": (["likelihood", "--ckpt", ckpt, "--solver", "rk4", "--tol", 1e-3],
                              "--tol does not apply to --solver rk4"),
        "zero tolerance": (["likelihood", "--ckpt", ckpt, "--tol", 0], "positive number"),
        "negative n": (["sample", "--ckpt", ckpt, "--n", -3], "positive integer"),
        "unknown output type": (["sample", "--ckpt", ckpt, "--out", tmp / "s.jpg"],
                                "must end in .png or .pt"),
        "unwritable output": (["sample", "--ckpt", ckpt, "--out", a_file / "s.png"],
                              "writable folder"),
        "output is a folder": (["sample", "--ckpt", ckpt, "--out", tmp / "folder.png"],
                               "cannot write"),
        "seed beyond 64 bits": (["sample", "--ckpt", ckpt, "--seed", 2 ** 64], "64-bit integer"),
        "likelihood, missing checkpoint": (["likelihood", "--ckpt", tmp / "none.pt"],
                                           "no checkpoint at"),
        "likelihood of one image": (["likelihood", "--ckpt", ckpt, "--n", 1], "integer above 1"),
        "widths not multiples of 8": ([*train, "--out", tmp / "w", "--widths", "12,24"],
                                      "multiples of 8"),
        "zero batch size": ([*train, "--out", tmp / "b", "--batch-size", 0], "positive integer"),
        "negative learning rate": ([*train, "--out", tmp / "l", "--lr", -1e-3], "positive number"),
        "zero minutes": ([*train, "--out", tmp / "m", "--minutes", 0, "--steps", 1, *TINY],
                         "positive number"),
        "text for a number": ([*train, "--out", tmp / "t", "--steps", "many"], "positive integer"),
        "sigma_min of 1": ([*train, "--out", tmp / "s", "--sigma-min", 1], "[0, 1)"),
        "unwritable run folder": ([*train, "--out", a_file / "run"],
                                  "end in .pt, in a writable folder"),
        "ckpt.pt is a folder": ([*train, "--out", tmp / "clash"], "cannot write"),
        "data set unavailable": (["train", "--data-dir", tmp / "empty", "--out", tmp / "r"],
                                 "t10k-labels-idx1-ubyte.gz there"),
        "unknown data set": ([*train, "--out", tmp / "u", "--dataset", "svhn"], "invalid choice"),
        "a run over a run": ([*train, "--out", tmp / "taken", "--steps", 1, *TINY],
                             "holds a run already"),
        "resume, no run": ([*train, "--out", tmp / "new", "--resume"], "holds no run"),
        "resume, no optimizer": ([*train, "--out", tmp / "partial", "--resume"],
                                 "not a checkpoint of"),
        "resume, other data set": ([*resume, "--dataset", "fashion-mnist"],
                                   "--dataset fashion-mnist would change the run"),
        "resume, other lr": ([*resume, "--lr", 1e-3], "--lr 0.001 would change the run"),
        "resume, other batch": ([*resume, "--batch-size", 16], "--batch-size 16 would change"),
        "resume, other widths": ([*resume, "--widths", "8,16"], "--widths 8,16 would change"),
        "resume, other seed": ([*resume, "--seed", 1], "--seed 1 would change"),
        "resume, other sigma": ([*resume, "--sigma-min", 0.1], "--sigma-min 0.1 would change"),
        "resume, other t scale": ([*resume, "--t-scale", 1.5], "--t-scale 1.5 would change"),
        "resume, class-cond": ([*resume, "--class-cond"], "--class-cond True would change the run"),
        "label, unconditional": (["sample", "--ckpt", ckpt, "--label", 3], "need a model trained"),
        "guidance, unconditional": (["sample", "--ckpt", ckpt, "--guidance", 2],
                                    "--guidance need a model trained with --class-cond"),
        "label 10": (["sample", "--ckpt", cond, "--label", 10], "labels run from 0 to 9"),
        "label -1": (["sample", "--ckpt", cond, "--label", -1], "--label -1"),
        "label not a number": (["sample", "--ckpt", cond, "--label", "two"], "invalid int"),
        "negative guidance": (["sample", "--ckpt", cond, "--guidance", -1], "non-negative"),
        "unknown device": (["sample", "--ckpt", ckpt, "--device", "tpu"], "invalid choice"),
        "cifar10 unavailable": (["train", "--data-dir", tmp / "empty", "--out", tmp / "c",
                                 "--dataset", "cifar10"], "put cifar-10-python.tar.gz in"),
    }


def test_bad_input_gives_one_line_naming_the_problem_and_exit_code_2(run, cond_run, data,
                                                                    tmp_path, monkeypatch, capsys):
    for proxy in ["http_proxy", "https_proxy"]:                     # no download
        monkeypatch.setenv(proxy, OFFLINE[proxy])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = bad_inputs(run, cond_run, data, tmp_path)
    cases["absent device"] = (["sample", "--ckpt", run / "ckpt.pt", "--device", "cuda"],
                              "--device cuda: this machine has no cuda device")
    for what, (args, words) in cases.items():
        with pytest.raises(SystemExit) as stop:
            main(*args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2, what
        assert len(lines) == 1 and lines[0].startswith("error: "), (what, lines)
        assert words in lines[0], (what, lines[0])
    assert os.listdir(tmp_path / "empty") == []                     # failed runs leave no folders
    assert not (tmp_path / "r").exists() and not (tmp_path / "w").exists()
    assert not (tmp_path / "c").exists()


def test_bad_input_in_a_process_of_its_own_prints_one_line_and_no_traceback(run, data, tmp_path):
    cases = [["sample", "--ckpt", tmp_path / "none.pt"], ["sample", "--steps", "many"],
             ["train", "--data-dir", tmp_path / "empty", "--out", tmp_path / "run"]]
    with ThreadPoolExecutor(len(cases)) as pool:                    # each is mostly importing torch
        results = list(pool.map(lambda args: cli(*args, check=False), cases))
    for result in results:
        assert result.returncode == 2 and result.stdout == ""
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")


# --- tools/score.py -------------------------------------------------------------------------------
# The Fréchet distance against closed forms; the script on the squares of fake_mnist, with a
# classifier of a tiny recipe that learns them in about a second.

sys.path.insert(0, os.path.join(HERE, "tools"))
score = importlib.import_module("score")                             # tools/ is not a package
SCORE = os.path.join(HERE, "tools", "score.py")
TINY_RECIPE = dict(score.RECIPE, widths=[8], features=16, epochs=6, batch_size=40, lr=2e-2)


def float64(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def trace_of_square_root(m, iterations=50):
    """tr M^½ by the Denman–Beavers iteration: Y → M^½ and Z → M^-½ from Y = M, Z = I."""
    y, z = m, torch.eye(len(m), dtype=m.dtype)
    for _ in range(iterations):
        y, z = (y + torch.linalg.inv(z)) / 2, (z + torch.linalg.inv(y)) / 2
    return y.trace().item()


def test_frechet_distance_of_gaussians_with_non_commuting_covariances_matches_the_closed_form():
    """2x2: tr (Σ1 Σ2)^½ = sqrt(tr Σ1 Σ2 + 2 sqrt(det Σ1 Σ2)); 3x3: against Denman–Beavers.
    (tr Σ1^½ Σ2^½, right only when they commute, is 0.3% off here.)"""
    a, b = float64([2.0, 0.9], [0.9, 1.0]), float64([1.0, -0.4], [-0.4, 3.0])
    assert not torch.allclose(a @ b, b @ a)
    mu1, mu2 = float64(1.0, 2.0), float64(0.5, -1.0)
    cross = ((a @ b).trace() + 2 * torch.linalg.det(a @ b).sqrt()).sqrt()
    expected = (mu1 - mu2).square().sum() + a.trace() + b.trace() - 2 * cross
    assert score.frechet_distance(mu1, a, mu2, b) == pytest.approx(expected.item(), rel=1e-12)
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    a, b = p @ p.T + 0.1 * torch.eye(3), q @ q.T + 0.1 * torch.eye(3)
    expected = a.trace() + b.trace() - 2 * trace_of_square_root(a @ b)
    zero = torch.zeros(3)
    assert score.frechet_distance(zero, a, zero, b) == pytest.approx(expected.item(), rel=1e-9)
    assert score.frechet_distance(zero, b, zero, a) == pytest.approx(expected.item(), rel=1e-9)


def test_frechet_distance_is_zero_for_identical_statistics_and_exact_for_diagonal_ones():
    """d(N, N) = 0, also for a singular covariance (to √ε there: square roots of rounding errors);
    diagonal covariances: |μ1 - μ2|² + Σ (√a_i - √b_i)²."""
    g = torch.Generator().manual_seed(1)
    for n, tolerance in [(50, 1e-12), (5, 1e-6)]:                    # 5 points in 8-d: rank 4
        mu, cov = score.statistics(torch.randn(n, 8, generator=g, dtype=torch.float64))
        assert 0 <= score.frechet_distance(mu, cov, mu, cov) < tolerance * cov.trace()
    a, b = float64(1.0, 4.0, 9.0), float64(4.0, 4.0, 1.0)
    d = score.frechet_distance(torch.ones(3), a.diag(), torch.zeros(3), b.diag())
    assert d == pytest.approx(3 + (a.sqrt() - b.sqrt()).square().sum().item(), rel=1e-12)


def test_statistics_are_the_mean_and_the_unbiased_covariance_in_float64():
    """statistics(x) = (mean, Σ (x - mean)(x - mean)ᵀ / (N - 1)), in float64 from float32."""
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(2))
    mu, cov = score.statistics(x)
    centred = x.double() - x.double().mean(0)
    assert mu.dtype == cov.dtype == torch.float64 and cov.shape == (4, 4)
    torch.testing.assert_close(mu, x.double().mean(0))
    torch.testing.assert_close(cov, centred.T @ centred / 49)


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    """Fake MNIST of 200 training and 100 test squares, and the tiny classifier trained on it."""
    root = fake_mnist(str(tmp_path_factory.mktemp("score_data")), n_train=200, n_test=100)
    cache = str(tmp_path_factory.mktemp("score_cache"))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        net = score.classifier("mnist", root, cache, TINY_RECIPE)
    images, labels = fm.load_data("mnist", root, train=False)
    return dict(root=root, cache=cache, net=net, stderr=stderr.getvalue(), labels=labels,
                images=images.float() / 255, flags=["--data-dir", root, "--cache", cache])


@pytest.fixture
def tiny(monkeypatch):
    """score.main reads, or trains, the classifier of the tiny recipe."""
    monkeypatch.setattr(score, "RECIPE", TINY_RECIPE)


def run_score(samples, path, capsys, *flags):
    """tools/score.py in this process on samples saved to path: its one JSON line, as a dict."""
    torch.save(samples, path)
    score.main([str(path), *map(str, flags)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_the_classifier_learns_the_squares_and_says_so_when_it_trains(squares):
    """Training prints its test accuracy on stderr, one line: 100% on the squares."""
    assert squares["stderr"].count("\n") == 1 and "100.00% test accuracy" in squares["stderr"]
    (name,) = os.listdir(squares["cache"])
    assert name.startswith("mnist-") and name.endswith(".pt")


def test_real_images_score_below_noisy_ones_and_noise_far_above(squares, tmp_path, capsys, tiny):
    """fd: the test images themselves 0 < the floor (100 training images) < noisy << noise."""
    g = torch.Generator().manual_seed(0)
    real = squares["images"]
    noisy = (real + 0.3 * torch.randn(real.shape, generator=g)).clamp(0, 1)
    noise = torch.rand(real.shape, generator=g)
    results = [run_score(x, tmp_path / "s.pt", capsys, *squares["flags"])
               for x in (real, noisy, noise)]
    assert all(r.keys() == {"n", "fd", "fd_floor", "confidence", "coverage"} for r in results)
    floor = results[0]["fd_floor"]
    assert all(r["n"] == 100 and r["fd_floor"] == floor for r in results)   # the floor is n's
    fd_real, fd_noisy, fd_noise = [r["fd"] for r in results]
    assert fd_real < 1e-3 < floor < fd_noisy and 10 * fd_noisy < fd_noise


def test_confidence_and_coverage_of_one_class_two_classes_and_all_ten(squares, tmp_path, capsys,
                                                                      tiny):
    """Copies of one class: coverage 0; two: log 2 / log 10; ten of each: 1; confidence near 1."""
    images, labels = squares["images"], squares["labels"]
    one = run_score(images[labels == 7], tmp_path / "one.pt", capsys, *squares["flags"])
    two = run_score(images[labels < 2], tmp_path / "two.pt", capsys, *squares["flags"])
    ten = run_score(images, tmp_path / "ten.pt", capsys, *squares["flags"])
    assert one["n"] == 10 and one["coverage"] == 0
    assert two["coverage"] == pytest.approx(0.30103, abs=1e-4)
    assert ten["coverage"] == pytest.approx(1, abs=1e-4)
    assert min(one["confidence"], two["confidence"], ten["confidence"]) > 0.9


def test_right_class_is_the_share_of_samples_in_the_class_they_were_drawn_for(squares, tmp_path,
                                                                             capsys, tiny):
    """--class-cond: sample i asked for class i mod 10, as the test images come; --label K: all
    for K. Rolled by one image, no sample is in its class; without either flag, no right_class."""
    images, labels = squares["images"], squares["labels"]
    assert torch.equal(labels, torch.arange(100) % 10)
    flags = squares["flags"]
    ordered = run_score(images, tmp_path / "o.pt", capsys, *flags, "--class-cond")
    rolled = run_score(images.roll(1, 0), tmp_path / "r.pt", capsys, *flags, "--class-cond")
    sevens = run_score(images[labels == 7], tmp_path / "7.pt", capsys, *flags, "--label", 7)
    eights = run_score(images[labels == 7], tmp_path / "8.pt", capsys, *flags, "--label", 8)
    plain = run_score(images, tmp_path / "p.pt", capsys, *flags)
    assert (ordered["right_class"], rolled["right_class"]) == (1.0, 0.0)
    assert (sevens["right_class"], eights["right_class"]) == (1.0, 0.0)
    assert "right_class" not in plain


def test_a_second_call_reads_the_cached_classifier_instead_of_training(squares, monkeypatch):
    """With the cache file there, train is never called and the weights are those first trained."""
    def no_training(*args):
        raise AssertionError("trained again")
    monkeypatch.setattr(score, "train", no_training)
    net = score.classifier("mnist", squares["root"], squares["cache"], TINY_RECIPE)
    for a, b in zip(net.state_dict().values(), squares["net"].state_dict().values()):
        assert torch.equal(a, b)


def test_the_cache_sits_beside_the_data_and_a_changed_recipe_trains_into_another_file(
        squares, tmp_path, capsys, monkeypatch):
    """No --cache: DATA_DIR/score_classifier; the same recipe and data train the same weights;
    another recipe has another key, so it trains into a second file and leaves the first alone."""
    root = fake_mnist(str(tmp_path / "data"), n_train=200, n_test=100)   # the same squares
    torch.save(squares["images"], tmp_path / "s.pt")
    for recipe in [TINY_RECIPE, dict(TINY_RECIPE, epochs=1)]:
        monkeypatch.setattr(score, "RECIPE", recipe)
        score.main([str(tmp_path / "s.pt"), "--data-dir", root])
        assert "test accuracy" in capsys.readouterr().err           # it trained
    (name,) = os.listdir(squares["cache"])
    files = os.listdir(tmp_path / "data" / "score_classifier")
    assert len(files) == 2 and name in files
    again = load(tmp_path / "data" / "score_classifier" / name)
    for a, b in zip(again.values(), load(os.path.join(squares["cache"], name)).values()):
        assert torch.equal(a, b)


def test_fashion_mnist_gets_its_own_classifier(squares, tmp_path, capsys, tiny):
    """--dataset fashion-mnist reads FashionMNIST/raw and caches fashion-mnist-<key>.pt."""
    root = fake_mnist(str(tmp_path), "FashionMNIST", n_train=200, n_test=100)
    result = run_score(squares["images"], tmp_path / "s.pt", capsys, "--data-dir", root,
                       "--dataset", "fashion-mnist")
    assert result["n"] == 100 and result["coverage"] == pytest.approx(1, abs=1e-4)
    (name,) = os.listdir(tmp_path / "score_classifier")
    assert name == "fashion-" + os.listdir(squares["cache"])[0]     # the same recipe's key


def bad_score_inputs(squares, tmp):
    """what → (arguments, words of its error line); a samples file for each broken rule."""
    good = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    contents = {"good": good, "3d": good[:, 0], "rgb": good.expand(4, 3, 28, 28).clone(),
                "32x32": torch.rand(4, 1, 32, 32), "above 1": good * 2, "below 0": -good,
                "nan": good.masked_fill(good > 0.5, float("nan")),
                "inf": good.masked_fill(good > 0.5, float("inf")),
                "bytes": (good * 255).to(torch.uint8), "one": good[:1], "none": good[:0],
                "dict": {"samples": good}, "object": argparse.Namespace(samples=good)}
    for name, value in contents.items():
        torch.save(value, tmp / f"{name}.pt")
    (tmp / "text.pt").write_text("not a tensor")
    (tmp / "a file").write_text("")
    data = ["--data-dir", squares["root"], "--cache", squares["cache"]]
    return {
        "missing file": ([tmp / "nothing.pt", *data], "No such file"),
        "a folder": ([tmp, *data], "cannot read"),
        "not a torch file": ([tmp / "text.pt", *data], "not a tensor file"),
        "a dict": ([tmp / "dict.pt", *data], "holds a dict"),
        "a pickled object": ([tmp / "object.pt", *data], "not a tensor file"),
        "three dimensions": ([tmp / "3d.pt", *data], "(N, C, H, W)"),
        "three channels": ([tmp / "rgb.pt", *data], "channels"),
        "32x32 images": ([tmp / "32x32.pt", *data], "(1, 28, 28)"),
        "values above 1": ([tmp / "above 1.pt", *data], "[0, 1]"),
        "values below 0": ([tmp / "below 0.pt", *data], "[0, 1]"),
        "NaN": ([tmp / "nan.pt", *data], "[0, 1]"),
        "infinity": ([tmp / "inf.pt", *data], "[0, 1]"),
        "bytes, not floats": ([tmp / "bytes.pt", *data], "[0, 1]"),
        "one sample": ([tmp / "one.pt", *data], "2 samples"),
        "no samples": ([tmp / "none.pt", *data], "2 samples"),
        "no samples file": (data, "required"),
        "unknown data set": ([tmp / "good.pt", *data, "--dataset", "svhn"], "invalid choice"),
        "unknown flag": ([tmp / "good.pt", *data, "--width", 8], "unrecognized arguments"),
        "cache under a file": ([tmp / "good.pt", *data, "--cache", tmp / "a file" / "c"],
                               "cannot create"),
    }


def test_bad_input_gives_one_error_line_and_exit_code_2(squares, tmp_path, capsys, tiny):
    """Every bad input, in this process: exit code 2 and one line, "error: " and what is wrong."""
    for what, (args, words) in bad_score_inputs(squares, tmp_path).items():
        with pytest.raises(SystemExit) as raised:
            score.main(list(map(str, args)))
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert raised.value.code == 2 and captured.out == "", what
        assert len(lines) == 1 and lines[0].startswith("error: "), (what, lines)
        assert words in lines[0], (what, lines)


def score_cli(args):
    return subprocess.run([sys.executable, SCORE, *map(str, args)], capture_output=True,
                          text=True, env=OFFLINE, timeout=300)


def test_the_script_gives_one_error_line_and_no_traceback(squares, tmp_path):
    """As a command, in parallel: a data set that is not there (the line says where its files
    go), a file torch cannot read, an unknown data set."""
    cases = bad_score_inputs(squares, tmp_path)
    empty = tmp_path / "empty"
    cases = {"data set unavailable": ([tmp_path / "good.pt", "--data-dir", empty],
                                      str(empty / "MNIST" / "raw")),
             "not a torch file": cases["not a torch file"],
             "unknown data set": cases["unknown data set"]}
    with ThreadPoolExecutor(os.cpu_count()) as pool:                  # each mostly imports torch
        results = pool.map(score_cli, [args for args, _ in cases.values()])
    for (what, (_, words)), result in zip(cases.items(), results):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and result.stdout == "", (what, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (what, result.stderr)
        assert words in lines[0], (what, lines)
