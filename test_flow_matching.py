"""Tests for flow_matching.py, in the script's section order. Most check an identity of flow matching
numerically on a case whose answer is known in closed form; the last section runs the command line.
Run: python -m pytest -q test_flow_matching.py"""
import math
import os
import signal
import subprocess
import sys

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
    net = randomize(fm.VelocityNet(channels=shape[0], width=8))
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
    with C = E||u_marg||² - E||u||² = -E Var(u | x_t)."""
    xt, t, u = path_samples(400_000, seed=1)
    u_marg = marginal_velocity(xt, t)
    c = ((u_marg ** 2).sum(1).mean() - (u ** 2).sum(1).mean()).item()
    fields = [torch.zeros_like(xt), 2 * xt.flip(1) - 1, torch.tanh(xt) * t[:, None]]
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
    share = torch.bincount(dist.argmin(1), minlength=3) / len(x1)
    torch.testing.assert_close(share, torch.full((3,), 1 / 3, dtype=share.dtype), atol=0.03, rtol=0)


# --- 4. The conditional flow matching loss -------------------------------------------------------

def test_cfm_loss_is_the_mean_squared_error_to_the_target():
    torch.manual_seed(0)
    net = randomize(fm.VelocityNet(width=8))
    x0, x1, t = torch.randn(3, 1, 28, 28), torch.randn(3, 1, 28, 28), torch.rand(3)
    xt, u = fm.ot_path(x0, x1, t, SIGMA)
    expected = ((net(xt, t) - u) ** 2).mean()
    torch.testing.assert_close(fm.cfm_loss(net, x0, x1, t, SIGMA), expected)


# --- 6. Samplers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("solver,order", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
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


def test_integrate_backwards_undoes_forwards():
    v = lambda x, t: torch.sin(x) + t
    x0 = torch.randn(5, dtype=torch.float64)
    x1, _ = fm.integrate(v, x0, 50, "rk4")
    back, _ = fm.integrate(v, x1, 50, "rk4", t0=1.0, t1=0.0)
    torch.testing.assert_close(back, x0, atol=1e-7, rtol=0)


# --- 7. Training ---------------------------------------------------------------------------------

def test_training_lowers_the_loss_on_a_tiny_data_set():
    """Two 8x8 images, a pattern and its negative: the zero field scores E||u||² / D = 2, and a net that
    learns where x_t is heading does far better."""
    torch.manual_seed(0)
    pattern = (torch.rand(1, 1, 8, 8) > 0.5).to(torch.uint8) * 255
    images = torch.cat([pattern, 255 - pattern])
    net = fm.VelocityNet(width=8)
    ema = fm.copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    args = fm.argparse.Namespace(sigma_min=0.0, ema_decay=0.99, bf16=False)
    losses = [fm.train_step(net, ema, opt, fm.draw_batch(images, 32), 3e-3, step, args) for step in range(150)]
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


# --- 8. Command line, end to end -----------------------------------------------------------------

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
    return fake_mnist(str(tmp_path_factory.mktemp("data")))


TINY = ["--width", "8", "--batch-size", "8", "--log-every", "1", "--device", "cpu"]
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
    assert {"model", "ema", "optimizer", "config", "rng"} <= ckpt.keys()
    assert ckpt["config"]["channels"] == 1 and ckpt["config"]["size"] == 28
    assert (run / "samples_000006.png").exists() and (run / "samples_000012.png").exists()
    assert not (run / "ckpt.pt.tmp").exists()


def test_sample_writes_a_grid_and_a_tensor_and_repeats_with_a_seed(run, tmp_path):
    result = cli("sample", "--ckpt", run / "ckpt.pt", "--solver", "rk4", "--steps", 3, "--n", 6,
                 "--out", tmp_path / "a.pt", "--device", "cpu")
    assert "12 NFE" in result.stdout
    cli("sample", "--ckpt", run / "ckpt.pt", "--steps", 3, "--n", 6, "--out", tmp_path / "b.pt")
    cli("sample", "--ckpt", run / "ckpt.pt", "--steps", 3, "--n", 6, "--out", tmp_path / "c.pt", "--seed", 1)
    result = cli("sample", "--ckpt", run / "ckpt.pt", "--solver", "euler", "--steps", 3, "--n", 4,
                 "--out", tmp_path / "grid.png")
    assert "3 NFE" in result.stdout and (tmp_path / "grid.png").exists()
    a, b, c = load(tmp_path / "a.pt"), load(tmp_path / "b.pt"), load(tmp_path / "c.pt")
    assert a.shape == (6, 1, 28, 28) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_resume_after_ctrl_c_gives_the_same_weights_as_an_uninterrupted_run(data, tmp_path):
    """Ctrl-C saves a checkpoint; resuming it with the same flags ends bit-identical to one long run."""
    flags = ["--data-dir", data, "--steps", 300, "--save-every", 1000, *TINY]
    cli("train", "--out", tmp_path / "whole", *flags)
    command = [sys.executable, os.path.join(HERE, "flow_matching.py"), "train", "--out", tmp_path / "cut", *flags]
    proc = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, text=True, env=OFFLINE)
    for line in proc.stdout:
        if line.startswith("step") and int(line.split()[1]) >= 20:
            proc.send_signal(signal.SIGINT)
            break
    assert "on a stop signal" in proc.communicate(timeout=120)[0] and proc.returncode == 0
    assert 20 <= load(tmp_path / "cut" / "ckpt.pt")["step"] < 300
    cli("train", "--out", tmp_path / "cut", "--resume", *flags)
    whole, cut = load(tmp_path / "whole" / "ckpt.pt"), load(tmp_path / "cut" / "ckpt.pt")
    assert cut["step"] == whole["step"] == 300
    for key in ["model", "ema"]:
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


def bad_inputs(run, data, tmp):
    not_ckpt, corrupt, a_file = tmp / "tensor.pt", tmp / "corrupt.pt", tmp / "file"
    torch.save(torch.zeros(3), not_ckpt)
    corrupt.write_bytes(b"not a checkpoint at all")
    a_file.write_text("")
    ckpt = run / "ckpt.pt"
    empty = tmp / "empty"
    empty.mkdir()
    return {
        "missing checkpoint": ["sample", "--ckpt", tmp / "nothing.pt"],
        "corrupt checkpoint": ["sample", "--ckpt", corrupt],
        "not a checkpoint": ["sample", "--ckpt", not_ckpt],
        "unknown solver": ["sample", "--ckpt", ckpt, "--solver", "heun"],
        "zero steps": ["sample", "--ckpt", ckpt, "--steps", 0],
        "negative n": ["sample", "--ckpt", ckpt, "--n", -3],
        "unknown output type": ["sample", "--ckpt", ckpt, "--out", tmp / "s.jpg"],
        "unwritable output": ["sample", "--ckpt", ckpt, "--out", a_file / "s.png"],
        "zero batch size": ["train", "--data-dir", data, "--batch-size", 0],
        "negative learning rate": ["train", "--data-dir", data, "--lr", -1e-3],
        "text for a number": ["train", "--data-dir", data, "--steps", "many"],
        "unwritable run folder": ["train", "--data-dir", data, "--out", a_file / "run"],
        "data set unavailable": ["train", "--data-dir", empty, "--out", tmp / "r"],
        "resume without a checkpoint": ["train", "--data-dir", data, "--out", tmp / "new", "--resume"],
    }


def test_bad_input_gives_one_line_and_exit_code_2(run, data, tmp_path):
    for what, args in bad_inputs(run, data, tmp_path).items():
        result = cli(*args, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (what, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (what, result.stderr)
        if what == "data set unavailable":                            # it names the folder and the files
            assert str(tmp_path / "empty" / "MNIST" / "raw") in lines[0] and "t10k-labels-idx1-ubyte.gz" in lines[0]
