"""Tests for flow_matching.py, in the script's section order. Most check an identity of flow matching
numerically on a case whose answer is known in closed form; the last section runs the command line.
Run: python -m pytest -q test_flow_matching.py"""
import math
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import flow_matching as fm

HERE = os.path.dirname(os.path.abspath(__file__))


def randomize(model, seed=0):
    """Give the zero-initialised layers random weights, so the output depends on every input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# --- 1. Time embedding ---------------------------------------------------------------------------

def test_time_embedding_varies_slowly_and_quickly_across_the_unit_interval():
    """Some features change across all of [0, 1] (coarse), others tell apart times 1e-3 apart (fine)."""
    t = torch.tensor([0.0, 0.5, 0.5005, 1.0])
    e = fm.time_embedding(t, 64)
    assert e.shape == (4, 64)
    assert (e[0] - e[3]).norm() > 4                  # the ends of the path look different
    slow = e[:, [0, 32]]                             # sin and cos at 1 rad per unit t
    assert (slow[0] - slow[3]).norm() > 0.9          # |(sin 1, cos 1) - (0, 1)| = 0.96
    assert (e[1] - e[2]).abs().max() > 0.3           # the fastest features separate Δt = 5e-4


# --- 2. Velocity network -------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_network_output_has_the_input_shape_and_depends_on_t(shape):
    torch.manual_seed(0)
    net = randomize(fm.VelocityNet(channels=shape[0], widths=[8, 16, 16, 16]))
    x = torch.randn(2, *shape)
    v0, v1 = net(x, torch.zeros(2)), net(x, torch.full((2,), 0.7))
    assert v0.shape == x.shape
    assert (v0 - v1).abs().mean() > 1e-3 * v0.abs().mean()


# --- 3. The OT probability path ------------------------------------------------------------------

SIGMA = 0.1


def test_path_endpoints():
    """x_0 = x0 (noise) and x_1 = x1 + σ_min x0 (data, blurred by σ_min)."""
    x0, x1 = torch.randn(5, 3), torch.randn(5, 3)
    xt, _ = fm.ot_path(x0, x1, torch.zeros(5), SIGMA)
    torch.testing.assert_close(xt, x0)
    xt, _ = fm.ot_path(x0, x1, torch.ones(5), SIGMA)
    torch.testing.assert_close(xt, x1 + SIGMA * x0)


def test_target_is_the_time_derivative_of_the_path():
    """u = d/dt x_t, by forward-mode autodiff in t (Lipman et al. eq. 21-22)."""
    x0, x1, t = torch.randn(4, 6), torch.randn(4, 6), torch.rand(4)
    _, u = fm.ot_path(x0, x1, t, SIGMA)
    _, dxt_dt = torch.func.jvp(lambda s: fm.ot_path(x0, x1, s, SIGMA)[0], (t,), (torch.ones(4),))
    torch.testing.assert_close(u, dxt_dt)


def test_path_given_x1_is_gaussian_with_mean_t_x1_and_std_sigma_t():
    """p_t(x | x1) = N(t x1, σ_t² I) with σ_t = 1 - (1 - σ_min) t, by Monte Carlo over x0."""
    torch.manual_seed(0)
    n, x1 = 200_000, torch.tensor([2.0, -1.0])
    for t in [0.0, 0.3, 0.8, 1.0]:
        xt, _ = fm.ot_path(torch.randn(n, 2), x1.expand(n, 2), torch.full((n,), t), SIGMA)
        sigma_t = 1 - (1 - SIGMA) * t
        torch.testing.assert_close(xt.mean(0), t * x1, atol=5 * sigma_t / n ** 0.5, rtol=0)
        torch.testing.assert_close(xt.std(0), torch.full((2,), sigma_t), atol=0.01 * sigma_t, rtol=0)


# --- 3b. Marginalisation: L_FM = L_CFM + C -------------------------------------------------------
# For data made of K points the marginal velocity has a closed form: the conditional velocities
# u(x | x1_k) weighted by the posterior p(x1_k | x_t = x) ∝ N(x; t x1_k, σ_t² I) (Lemma 1 of seed 000,
# Theorem 1 of Lipman et al.).

POINTS = torch.tensor([[2.0, 0.0], [-1.0, 1.5], [-1.0, -1.5]])


def marginal_velocity(x, t, sigma_min=SIGMA, points=POINTS):
    t = t.view(-1, 1, 1)
    sigma_t = 1 - (1 - sigma_min) * t
    log_w = -((x[:, None] - t * points) ** 2).sum(-1, keepdim=True) / (2 * sigma_t ** 2)
    x0 = (x[:, None] - t * points) / sigma_t                          # the noise that leads to x via x1_k
    u = points - (1 - sigma_min) * x0                                 # u(x | x1_k)
    return (log_w.softmax(1) * u).sum(1)


def path_samples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = POINTS[torch.randint(len(POINTS), (n,), generator=g)]
    x0, t = torch.randn(n, 2, generator=g), torch.rand(n, generator=g)
    xt, u = fm.ot_path(x0, x1, t, SIGMA)
    return xt, t, u


def test_marginal_velocity_has_the_lowest_cfm_loss():
    """The minimiser of L_CFM is the marginal velocity: perturbing it raises the loss by E||δ||²."""
    xt, t, u = path_samples(400_000)
    best = marginal_velocity(xt, t)
    loss = lambda v: ((v - u) ** 2).sum(1).mean().item()
    for delta in [0.1 * torch.ones(2), 0.1 * best, 0.2 * torch.sin(3 * xt)]:
        worse = best + delta
        assert loss(worse) > loss(best)
        assert loss(worse) - loss(best) == pytest.approx((delta ** 2).sum(-1).mean().item(), rel=0.1)


def test_fm_and_cfm_losses_differ_by_the_same_constant_for_any_field():
    """Theorem 1 of seed 000 (Theorem 2 of Lipman et al.): L_FM(v) - L_CFM(v) = C for every v,
    with C = E||u_marg||² - E||u||² = -E Var(u | x_t). (For v = 0 it holds by C's definition, so v ≠ 0 here.)"""
    xt, t, u = path_samples(400_000, seed=1)
    u_marg = marginal_velocity(xt, t)
    c = ((u_marg ** 2).sum(1).mean() - (u ** 2).sum(1).mean()).item()
    fields = [torch.full_like(xt, 3.0), 2 * xt.flip(1) - 1, torch.tanh(xt) * t[:, None]]
    for v in fields:
        l_fm = ((v - u_marg) ** 2).sum(1).mean().item()
        l_cfm = ((v - u) ** 2).sum(1).mean().item()
        assert l_fm - l_cfm == pytest.approx(c, abs=0.03)
    assert c < -0.5                                                   # a real gap, not 0 = 0


def test_integrating_the_marginal_velocity_lands_on_the_data():
    """Solving dx/dt = u_t(x) from N(0, I) reaches p_1 = the data blurred by σ_min, each point equally often."""
    torch.manual_seed(0)
    sigma_min = 0.01
    x0 = torch.randn(3000, 2, dtype=torch.float64)
    v = lambda x, t: marginal_velocity(x, torch.full((len(x),), t, dtype=x.dtype), sigma_min, POINTS.double())
    x1, nfe = fm.integrate(v, x0, 100, "rk4")
    dist = torch.cdist(x1, POINTS.double())
    assert nfe == 400
    assert dist.min(1).values.max() < 6 * sigma_min                   # every sample ends on a data point
    spread = (x1 - POINTS.double()[dist.argmin(1)]).std().item()      # ... blurred by N(0, σ_min² I)
    assert spread == pytest.approx(sigma_min, rel=0.05)
    share = torch.bincount(dist.argmin(1), minlength=3) / len(x1)
    torch.testing.assert_close(share, torch.full((3,), 1 / 3, dtype=share.dtype), atol=0.03, rtol=0)


# --- 4. The conditional flow matching loss -------------------------------------------------------

def test_cfm_loss_is_the_mean_squared_error_to_the_target():
    torch.manual_seed(0)
    net = randomize(fm.VelocityNet(widths=[8, 16, 16]))
    x0, x1, t = torch.randn(3, 1, 28, 28), torch.randn(3, 1, 28, 28), torch.rand(3)
    xt, u = fm.ot_path(x0, x1, t, SIGMA)
    expected = ((net(xt, t) - u) ** 2).mean()
    torch.testing.assert_close(fm.cfm_loss(net, x0, x1, t, SIGMA), expected)


# --- 6. Samplers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("solver,order", [("euler", 1), ("rk4", 4)])
def test_solvers_converge_at_their_order(solver, order):
    """dx/dt = x cos t has x(1) = x(0) e^{sin 1}; halving h divides the error by 2^order."""
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    exact = x0 * math.exp(math.sin(1.0))
    steps = [4, 8, 16, 32]
    errors = []
    for n in steps:
        x1, nfe = fm.integrate(lambda x, t: x * math.cos(t), x0, n, solver)
        assert nfe == n * fm.SOLVERS[solver][1]
        errors.append((x1 - exact).abs().max().item())
    slope = -(math.log(errors[-1]) - math.log(errors[0])) / (math.log(steps[-1]) - math.log(steps[0]))
    assert slope == pytest.approx(order, abs=0.3)


@pytest.mark.parametrize("solver,t0,t1", [("euler", 0.0, 1.0), ("rk4", 0.0, 1.0), ("rk4", 1.0, 0.0)])
def test_step_boundaries_follow_the_grid_and_end_at_t1(solver, t0, t1):
    """Steps start at t = s - a sin(2πs) / 2π, s = i / n (Euler a = 0: equal steps; RK4 a = 1/2), and end on t1."""
    starts = []
    def v(x, t):
        starts.append(t)
        return torch.ones_like(x)                                     # dx/dt = 1: x(t1) = x(t0) + t1 - t0
    n, a = 40, fm.SOLVERS[solver][2]
    x1, _ = fm.integrate(v, torch.zeros(1, dtype=torch.float64), n, solver, t0=t0, t1=t1)
    s = torch.arange(n + 1, dtype=torch.float64) / n
    grid = t0 + (t1 - t0) * (s - a * torch.sin(2 * math.pi * s) / (2 * math.pi))
    used = torch.tensor(starts[::fm.SOLVERS[solver][1]] + [t1], dtype=torch.float64)  # where integrate's steps start, then t1
    torch.testing.assert_close(used, grid)
    torch.testing.assert_close(x1, torch.tensor([t1 - t0], dtype=torch.float64))
    lengths = (used[1:] - used[:-1]).abs()
    assert a == (0.5 if solver == "rk4" else 0.0)
    assert lengths[0] / lengths[n // 2] == pytest.approx((1 - a) / (1 + a), rel=0.01)  # RK4: a third at the ends


def test_integrate_backwards_undoes_forwards():
    v = lambda x, t: torch.sin(x) + t
    x0 = torch.randn(5, dtype=torch.float64)
    x1, _ = fm.integrate(v, x0, 50, "rk4")
    back, _ = fm.integrate(v, x1, 50, "rk4", t0=1.0, t1=0.0)
    torch.testing.assert_close(back, x0, atol=1e-7, rtol=0)


class LabelEcho(torch.nn.Module):
    """A 'network' whose velocity is its label, 3 being the null label."""
    classes = 3

    def forward(self, x, t, y):
        return torch.zeros_like(x) + y.view(-1, 1).float()


@pytest.mark.parametrize("w, expected", [(0.0, 3.0), (1.0, 1.0), (2.0, -1.0)])
def test_guidance_mixes_label_and_null_velocities(w, expected):
    """v = v_null + w (v_y - v_null): w = 0 is the null label's field, w = 1 the label's, and w > 1
    pushes past the label, away from the null field (here v_y = 1, v_null = 3)."""
    v = fm.velocity_field(LabelEcho(), torch.tensor([1, 1]), w)
    assert torch.equal(v(torch.zeros(2, 5), 0.3), torch.full((2, 5), expected))


class Shifted(LabelEcho):
    """LabelEcho plus 10, standing in for the early network (the guide) of autoguidance."""
    def forward(self, x, t, y):
        return super().forward(x, t, y) + 10


@pytest.mark.parametrize("w, expected", [(0.0, 11.0), (1.0, 1.0), (2.0, -9.0)])
def test_autoguidance_mixes_the_network_and_its_guide(w, expected):
    """v = v_guide + w (v - v_guide), here v = 1 and v_guide = 11; with classifier-free guidance at 2 as
    well, each network is first guided by its own null label: v = 1 + 2 (1 - 3) = -1, v_guide = 9."""
    y, x = torch.tensor([1, 1]), torch.zeros(2, 5)
    v = fm.velocity_field(LabelEcho(), y, 1.0, Shifted(), w)
    assert torch.equal(v(x, 0.3), torch.full((2, 5), expected))
    both = fm.velocity_field(LabelEcho(), y, 2.0, Shifted(), w)
    assert torch.equal(both(x, 0.3), torch.full((2, 5), 9 + w * (-1 - 9)))


# --- 7. Likelihood --------------------------------------------------------------------------------

def gaussian_marginal_field(mu, s):
    """The exact marginal velocity when the data are N(μ, s² I) and σ_min = 0: x_t ~ N(t μ, σ_t² I)
    with σ_t² = (1 - t)² + t² s², and v(x, t) = μ + (σ_t'/σ_t) (x - t μ), σ_t σ_t' = t s² - (1 - t)."""
    return lambda x, t: mu + (t * s ** 2 - (1 - t)) / ((1 - t) ** 2 + t ** 2 * s ** 2) * (x - t * mu)


def test_log_likelihood_of_a_gaussian_data_set_matches_the_closed_form():
    """The flow of the exact field carries N(0, I) to N(μ, s² I); the continuity equation must give
    that density's log at any point, with the exact divergence and, on average, with Hutchinson's."""
    mu, s = torch.tensor([1.0, -2.0, 0.5]), 0.3
    x1 = mu + s * torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    truth = torch.distributions.Normal(mu, s).log_prob(x1).sum(1)
    v = gaussian_marginal_field(mu, s)
    exact, nfe = fm.log_likelihood(v, x1, 50, "rk4", exact=True)
    assert nfe == 200
    torch.testing.assert_close(exact, truth, atol=1e-3, rtol=0)
    torch.manual_seed(0)
    hutchinson, _ = fm.log_likelihood(v, x1.repeat(400, 1), 20, "rk4")
    torch.testing.assert_close(hutchinson.view(400, 5).mean(0), truth, atol=0.05, rtol=0)


def test_hutchinson_divergence_is_unbiased():
    """E_ε[εᵀ J ε] = tr J for Rademacher ε, on a nonlinear field whose Jacobian is not diagonal."""
    torch.manual_seed(0)
    w = torch.randn(4, 4)
    v = lambda x, t: torch.tanh(x @ w) * (1 + t)
    x = torch.randn(1, 4).repeat(20_000, 1)
    _, exact = fm.divergence(v, x[:1], 0.5)
    noise = torch.randint(0, 2, x.shape).float() * 2 - 1
    _, estimates = fm.divergence(v, x, 0.5, noise)
    assert abs(estimates.mean() - exact[0]) < 4 * estimates.std() / math.sqrt(len(x))
    assert estimates.std() > 0.01                                     # it is an estimate, not the trace


def test_bits_per_dim_of_a_standard_normal_over_8_bit_pixels():
    """The zero field leaves N(0, I) in place. A pixel k dequantised to x = (k + U - 1/2) / 127.5 - 1
    then costs E[-log N(x)] + ln 127.5 nats: ½ ln 2π + ½ (c² + 1 / (12 · 127.5²)) + ln 127.5 with
    c = k / 127.5 - 1."""
    torch.manual_seed(0)
    k = torch.tensor([0, 40, 128, 255]).repeat(20_000)
    pixels = k.view(-1, 1, 1, 1).to(torch.uint8)
    bpd, _ = fm.bits_per_dim(pixels, lambda x: fm.log_likelihood(lambda x, t: 0 * x, x, 1, "euler"))
    c = k.double() / 127.5 - 1
    expected = (0.5 * math.log(2 * math.pi) + 0.5 * (c ** 2 + 1 / (12 * 127.5 ** 2)) + math.log(127.5)) / math.log(2)
    torch.testing.assert_close(bpd.double().view(-1, 4).mean(0), expected.view(-1, 4).mean(0), atol=1e-4, rtol=0)


# --- 8. Training ---------------------------------------------------------------------------------

def test_training_lowers_the_loss_on_a_tiny_data_set():
    """Two 8x8 images, a pattern and its negative: the zero field scores E||u||² / D = 2, and a net that
    learns where x_t is heading does far better."""
    torch.manual_seed(0)
    pattern = (torch.rand(1, 1, 8, 8) > 0.5).to(torch.uint8) * 255
    images = torch.cat([pattern, 255 - pattern])
    net = fm.VelocityNet(widths=[8, 16, 16])
    ema = fm.copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    args = fm.argparse.Namespace(sigma_min=0.0, bf16=False, class_cond=False)
    losses = [fm.train_step(net, ema, opt, fm.draw_batch(images, torch.zeros(2, dtype=torch.long), 32), 3e-3, step, args) for step in range(150)]
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20


def test_learning_rate_warms_up_then_decays_to_zero():
    assert fm.learning_rate(1.0, 0, 0.0, warmup=10) == pytest.approx(0.1)
    assert fm.learning_rate(1.0, 50, 0.5, warmup=10) == pytest.approx(0.5)
    assert fm.learning_rate(1.0, 99, 1.0, warmup=10) == 0.0


def test_ema_follows_the_weights_with_its_decay():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = b.weight.detach().clone()
    fm.ema_update(b, a, step=10_000, decay=0.9)
    torch.testing.assert_close(b.weight, 0.9 * before + 0.1 * a.weight.detach())


def test_labels_are_dropped_per_sample_at_the_requested_rate():
    torch.manual_seed(0)
    images, labels = torch.zeros(100, 1, 2, 2, dtype=torch.uint8), torch.arange(100) % 10
    _, _, _, y = fm.draw_batch(images, labels, 50_000, classes=10, p_drop=0.1)
    dropped = y == 10
    assert abs(dropped.float().mean() - 0.1) < 0.005
    assert (y[~dropped] < 10).all()
    for batch in y[:1000].view(-1, 100):                              # within each batch of 100, not all-or-none
        assert 0 < (batch == 10).sum() < 100


def test_cifar10_batches_are_flipped_left_to_right_half_the_time():
    torch.manual_seed(0)
    image = torch.arange(4, dtype=torch.uint8).view(1, 1, 1, 4).expand(1, 3, 4, 4)
    _, x1, _, _ = fm.draw_batch(image, torch.zeros(1, dtype=torch.long), 4000, flip=True)
    flipped = x1[:, 0, 0, 0] > x1[:, 0, 0, -1]
    assert abs(flipped.float().mean() - 0.5) < 0.03
    torch.testing.assert_close(x1[flipped], fm.to_model_scale(image.flip(-1)).expand(int(flipped.sum()), 3, 4, 4))


# --- 9. Command line, end to end -----------------------------------------------------------------

def write_idx(path, array):
    """torchvision's on-disk MNIST format: a magic number (3 = unsigned bytes, then the number of
    dimensions), each dimension as a big-endian int32, then the bytes."""
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, array.dim()]))
        for size in array.shape:
            f.write(size.to_bytes(4, "big"))
        f.write(array.to(torch.uint8).numpy().tobytes())


def fake_mnist(root, folder="MNIST", n_train=64, n_test=16):
    """Bright squares on black, the class saying where: a data set small enough to learn in seconds."""
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw, exist_ok=True)
    for split, n in [("train", n_train), ("t10k", n_test)]:
        labels = torch.arange(n) % 10
        images = torch.zeros(n, 28, 28)
        for i, k in enumerate(labels.tolist()):
            r, c = 2 + 8 * (k // 4), 2 + 6 * (k % 4)
            images[i, r:r + 8, c:c + 6] = 255
        write_idx(os.path.join(raw, f"{split}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{split}-labels-idx1-ubyte"), labels)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    fake_mnist(root, "FashionMNIST")                                  # Fashion-MNIST has MNIST's format
    return fake_mnist(root)


def fake_cifar10(root, n=20):
    """torchvision's on-disk CIFAR-10: pickled dicts of (N, 3072) bytes and labels in cifar-10-batches-py."""
    import pickle
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": torch.randint(0, 256, (n, 3072), generator=g, dtype=torch.uint8).numpy(), "labels": list(range(n))}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    return root


TINY = ["--widths", "8,8", "--batch-size", "8", "--device", "cpu"]
OFFLINE = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")  # no download


def cli(*args, check=True):
    result = subprocess.run([sys.executable, os.path.join(HERE, "flow_matching.py"), *map(str, args)],
                            capture_output=True, text=True, env=OFFLINE, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cli("train", "--data-dir", data, "--out", out, "--steps", 12, "--save-every", 6, *TINY)
    return out


def test_train_writes_a_checkpoint_and_sample_grids(run):
    ckpt = load(run / "ckpt.pt")
    assert ckpt["step"] == 12
    assert {"model", "ema", "optimizer", "config", "rng", "guide"} <= ckpt.keys()
    assert ckpt["config"]["channels"] == 1 and ckpt["config"]["size"] == 28
    assert (run / "samples_000006.png").exists() and (run / "samples_000012.png").exists()
    assert not (run / "ckpt.pt.tmp").exists()


def test_sample_writes_a_grid_and_a_tensor_and_repeats_with_a_seed(run, tmp_path):
    result = cli("sample", "--ckpt", run / "ckpt.pt", "--solver", "rk4", "--steps", 3, "--n", 6,
                 "--out", tmp_path / "a.pt", "--device", "cpu")
    assert "12 NFE, autoguidance 2" in result.stdout   # the run's guide is used by default
    cli("sample", "--ckpt", run / "ckpt.pt", "--steps", 3, "--n", 6, "--out", tmp_path / "b.pt")
    cli("sample", "--ckpt", run / "ckpt.pt", "--steps", 3, "--n", 6, "--out", tmp_path / "c.pt", "--seed", 1)
    result = cli("sample", "--ckpt", run / "ckpt.pt", "--solver", "euler", "--steps", 3, "--n", 4,
                 "--out", tmp_path / "grid.png")
    assert "3 NFE" in result.stdout and (tmp_path / "grid.png").exists()
    a, b, c = load(tmp_path / "a.pt"), load(tmp_path / "b.pt"), load(tmp_path / "c.pt")
    assert a.shape == (6, 1, 28, 28) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    result = cli("sample", "--ckpt", run / "ckpt.pt", "--steps", 3, "--n", 6, "--out", tmp_path / "off.pt", "--autoguidance", 1)
    assert "autoguidance" not in result.stdout and not torch.equal(a, load(tmp_path / "off.pt"))


@pytest.fixture(scope="module")
def cond_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cond")
    cli("train", "--data-dir", data, "--out", out, "--steps", 6, "--class-cond", *TINY)
    return out


def test_a_class_conditional_model_samples_one_class_or_a_row_per_class(cond_run, tmp_path):
    assert load(cond_run / "ckpt.pt")["config"]["classes"] == 10
    result = cli("sample", "--ckpt", cond_run / "ckpt.pt", "--label", 7, "--guidance", 2, "--n", 4, "--steps", 2,
                 "--out", tmp_path / "sevens.pt")
    assert "8 NFE" in result.stdout and load(tmp_path / "sevens.pt").shape == (4, 1, 28, 28)
    cli("sample", "--ckpt", cond_run / "ckpt.pt", "--n", 20, "--steps", 3, "--out", tmp_path / "rows.png",
        "--trajectory", tmp_path / "flow.png")
    from torchvision.io import read_image
    assert read_image(str(tmp_path / "rows.png")).shape[1:] == (2 + 10 * 30, 2 + 2 * 30)   # 10 rows of 2
    assert read_image(str(tmp_path / "flow.png")).shape[1:] == (2 + 8 * 30, 2 + 4 * 30)    # t = 0, 0.26, 0.74, 1


def test_likelihood_prints_bits_per_dim_and_the_nfe(run, data):
    result = cli("likelihood", "--ckpt", run / "ckpt.pt", "--data-dir", data, "--n", 8, "--steps", 2)
    bpd = float(result.stdout.split()[0])
    assert 0 < bpd < 100 and "8 NFE" in result.stdout and "8 mnist test images" in result.stdout


@pytest.fixture
def in_process(monkeypatch):
    """For fm.main in pytest's process: train's Ctrl-C handlers would replace pytest's."""
    monkeypatch.setattr(fm.signal, "signal", lambda *args: None)


def test_bfloat16_autocast_only_on_cpus_with_avx512_bf16(data, tmp_path, monkeypatch, capsys, in_process):
    """oneDNN's own bfloat16 check also passes AVX-512 CPUs that only emulate bfloat16, slower than float32."""
    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
        fm.main(["train", "--data-dir", data, "--out", str(tmp_path / str(native)), "--steps", "1", *TINY])
        assert ("with bfloat16 autocast" in capsys.readouterr().out) == native


def test_the_learning_rate_decays_over_the_minutes_when_they_run_out_before_the_steps(data, tmp_path, in_process):
    """With --minutes 0.1 and --steps 10⁶ the clock stops the run, so the last step's rate is near 0:
    below half of what the schedule over 10⁶ steps would give it at that step."""
    fm.main(["train", "--data-dir", data, "--out", str(tmp_path), "--minutes", "0.1", "--steps", "1000000", *TINY])
    ckpt = load(tmp_path / "ckpt.pt")
    last = ckpt["step"] - 1
    assert ckpt["optimizer"]["param_groups"][0]["lr"] < 0.5 * fm.learning_rate(2e-3, last, last / 1000000)


def test_the_guide_is_the_ema_after_the_step_that_starts_a_quarter_of_the_way_in(data, tmp_path, monkeypatch, in_process):
    """Of 8 steps, the third starts at progress 2/8 = 1/4: the guide is the EMA after 3 steps, not 2 or 4."""
    emas, update = [], fm.ema_update
    def recorded(ema, model, step):
        update(ema, model, step)
        emas.append({k: v.clone() for k, v in ema.state_dict().items()})
    monkeypatch.setattr(fm, "ema_update", recorded)
    fm.main(["train", "--data-dir", data, "--out", str(tmp_path), "--steps", "8", *TINY])
    guide = load(tmp_path / "ckpt.pt")["guide"]
    same = [all(torch.equal(guide[k], ema[k]) for k in guide) for ema in emas]
    assert same == [i == 2 for i in range(8)]


def test_fashion_mnist_trains_and_its_checkpoint_names_it(data, tmp_path):
    cli("train", "--dataset", "fashion-mnist", "--data-dir", data, "--out", tmp_path, "--steps", 2, *TINY)
    assert load(tmp_path / "ckpt.pt")["config"]["dataset"] == "fashion-mnist"


def test_cifar10_trains_in_colour_and_samples_at_its_size(tmp_path, monkeypatch, in_process):
    """In-process, so that the fake files can skip torchvision's checksums of the real ones."""
    import torchvision.datasets.cifar
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    root = fake_cifar10(str(tmp_path))
    fm.main(["train", "--dataset", "cifar10", "--data-dir", root, "--out", str(tmp_path / "run"), "--steps", "2", *TINY])
    assert load(tmp_path / "run" / "ckpt.pt")["config"] | dict(dataset="cifar10", channels=3, size=32) == \
        load(tmp_path / "run" / "ckpt.pt")["config"]
    fm.main(["sample", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--n", "3", "--steps", "1", "--out", str(tmp_path / "s.pt")])
    assert load(tmp_path / "s.pt").shape == (3, 3, 32, 32)


def torchrun(nproc, *args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(HERE, "flow_matching.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=OFFLINE, timeout=300)


def test_torchrun_with_two_processes_matches_one_process_with_the_same_global_batch(data, tmp_path):
    """Each process takes half of the global batch and DDP averages the gradients: the same step as one
    process on the whole batch, up to float32 rounding (in float32, as bfloat16 would round more)."""
    flags = ["--data-dir", data, "--steps", 4, *TINY, "--fp32"]
    result = torchrun(2, "train", "--out", tmp_path / "two", *flags)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("saved") == 1 and sorted(os.listdir(tmp_path / "two")) == ["ckpt.pt", "samples_000004.png"]
    cli("train", "--out", tmp_path / "one", *flags)
    one, two = load(tmp_path / "one" / "ckpt.pt"), load(tmp_path / "two" / "ckpt.pt")
    assert one.keys() == two.keys() and one["step"] == two["step"] == 4
    for key in ["model", "ema"]:
        for name, tensor in one[key].items():
            torch.testing.assert_close(two[key][name], tensor, atol=1e-5, rtol=0)
    cli("sample", "--ckpt", tmp_path / "two" / "ckpt.pt", "--n", 2, "--steps", 1, "--out", tmp_path / "s.pt")


def test_torchrun_with_a_batch_that_does_not_split_gives_one_error_line(data, tmp_path):
    result = torchrun(3, "train", "--data-dir", data, "--out", tmp_path, "--steps", 2, *TINY)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and errors == ["error: --batch-size 8 does not split evenly over 3 processes"]


def test_resume_after_ctrl_c_gives_the_same_weights_as_an_uninterrupted_run(data, tmp_path):
    """Ctrl-C saves a checkpoint; resuming it with the same flags ends bit-identical to one long run."""
    flags = ["--data-dir", data, "--steps", 300, "--save-every", 1000, *TINY]
    cli("train", "--out", tmp_path / "whole", *flags)
    command = [sys.executable, os.path.join(HERE, "flow_matching.py"), "train", "--out", tmp_path / "cut", *flags]
    proc = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, text=True, env=OFFLINE)
    for line in proc.stdout:
        if line.startswith("step"):                                   # the first log line, at step 100
            proc.send_signal(signal.SIGINT)
            break
    assert "on a stop signal" in proc.communicate(timeout=120)[0] and proc.returncode == 0
    assert 100 <= load(tmp_path / "cut" / "ckpt.pt")["step"] < 300
    cli("train", "--out", tmp_path / "cut", "--resume", *flags)
    whole, cut = load(tmp_path / "whole" / "ckpt.pt"), load(tmp_path / "cut" / "ckpt.pt")
    assert cut["step"] == whole["step"] == 300
    for key in ["model", "ema", "guide"]:                             # the guide was taken before the cut
        for name, tensor in whole[key].items():
            assert torch.equal(tensor, cut[key][name]), f"{key}.{name}"
    assert torch.equal(whole["rng"], cut["rng"])


def test_a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(data, tmp_path):
    result = cli("train", "--data-dir", data, "--out", tmp_path, "--steps", 50, "--save-every", 1,
                 "--lr", 1e30, *TINY, check=False)
    assert result.returncode == 2 and "the loss is" in result.stderr
    ckpt = load(tmp_path / "ckpt.pt")
    assert ckpt["step"] < 50
    assert all(torch.isfinite(p).all() for p in ckpt["model"].values())


def bad_inputs(run, cond_run, data, tmp):
    not_ckpt, corrupt, a_file = tmp / "tensor.pt", tmp / "corrupt.pt", tmp / "file"
    torch.save(torch.zeros(3), not_ckpt)
    corrupt.write_bytes(b"not a checkpoint at all")
    a_file.write_text("")
    ckpt = run / "ckpt.pt"
    empty, folder_png, clash, partial = tmp / "empty", tmp / "folder.png", tmp / "clash", tmp / "partial"
    for folder in (empty, folder_png, clash / "ckpt.pt", partial):
        folder.mkdir(parents=True)
    torch.save({k: v for k, v in load(ckpt).items() if k != "optimizer"}, partial / "ckpt.pt")
    torch.save({k: v for k, v in load(ckpt).items() if k != "guide"}, tmp / "unguided.pt")
    (tmp / "taken").mkdir()
    torch.save(load(ckpt), tmp / "taken" / "ckpt.pt")
    return {
        "missing checkpoint": ["sample", "--ckpt", tmp / "nothing.pt"],
        "corrupt checkpoint": ["sample", "--ckpt", corrupt],
        "not a checkpoint": ["sample", "--ckpt", not_ckpt],
        "unknown solver": ["sample", "--ckpt", ckpt, "--solver", "heun"],
        "label for an unconditional model": ["sample", "--ckpt", ckpt, "--label", 3],
        "guidance for an unconditional model": ["sample", "--ckpt", ckpt, "--guidance", 2],
        "label out of range": ["sample", "--ckpt", cond_run / "ckpt.pt", "--label", 10],
        "negative guidance": ["sample", "--ckpt", cond_run / "ckpt.pt", "--label", 1, "--guidance", -1],
        "autoguidance without a guide": ["sample", "--ckpt", tmp / "unguided.pt", "--autoguidance", 3],
        "negative autoguidance": ["sample", "--ckpt", ckpt, "--autoguidance", -1],
        "trajectory not a png": ["sample", "--ckpt", ckpt, "--trajectory", tmp / "flow.jpg"],
        "likelihood of a missing checkpoint": ["likelihood", "--ckpt", tmp / "nothing.pt"],
        "likelihood of one image, which has no standard error": ["likelihood", "--ckpt", ckpt, "--n", 1],
        "zero steps": ["sample", "--ckpt", ckpt, "--steps", 0],
        "negative n": ["sample", "--ckpt", ckpt, "--n", -3],
        "unknown output type": ["sample", "--ckpt", ckpt, "--out", tmp / "s.jpg"],
        "unwritable output": ["sample", "--ckpt", ckpt, "--out", a_file / "s.png"],
        "output is a folder": ["sample", "--ckpt", ckpt, "--out", folder_png],
        "seed beyond 64 bits": ["sample", "--ckpt", ckpt, "--seed", 2 ** 64],
        "widths not multiples of 8": ["train", "--data-dir", data, "--widths", "12,24"],
        "zero batch size": ["train", "--data-dir", data, "--batch-size", 0],
        "negative learning rate": ["train", "--data-dir", data, "--lr", -1e-3],
        "text for a number": ["train", "--data-dir", data, "--steps", "many"],
        "unwritable run folder": ["train", "--data-dir", data, "--out", a_file / "run"],
        "ckpt.pt is a folder": ["train", "--data-dir", data, "--out", clash],
        "resume without the optimizer state": ["train", "--data-dir", data, "--out", partial, "--resume", *TINY],
        "data set unavailable": ["train", "--data-dir", empty, "--out", tmp / "r"],
        "unknown data set": ["train", "--data-dir", data, "--dataset", "svhn"],
        "cifar10 unavailable": ["train", "--data-dir", empty, "--dataset", "cifar10", "--out", tmp / "c"],
        "resume with another data set": ["train", "--data-dir", data, "--out", run, "--resume", "--dataset", "fashion-mnist"],
        "a new run over an existing one": ["train", "--data-dir", data, "--out", tmp / "taken", "--steps", 1, *TINY],
        "resume without a checkpoint": ["train", "--data-dir", data, "--out", tmp / "new", "--resume"],
    }


def test_bad_input_gives_one_line_and_exit_code_2(run, cond_run, data, tmp_path):
    cases = bad_inputs(run, cond_run, data, tmp_path)
    with ThreadPoolExecutor(os.cpu_count()) as pool:                  # each case is mostly importing torch
        results = dict(zip(cases, pool.map(lambda args: cli(*args, check=False), cases.values())))
    for what, result in results.items():
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (what, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (what, result.stderr)
        if what == "data set unavailable":                            # it names the folder and the files
            assert str(tmp_path / "empty" / "MNIST" / "raw") in lines[0] and "t10k-labels-idx1-ubyte.gz" in lines[0]
