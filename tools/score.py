"""Score samples of flow_matching.py with a small classifier of the data set: one JSON line.

    python tools/score.py samples.pt --dataset mnist --data-dir data
    python tools/score.py samples.pt --class-cond     # sample i was drawn for class i mod 10

samples.pt holds a float tensor (N, C, H, W) in [0, 1], as `flow_matching.py sample --out X.pt`
writes it. Printed: n; fd, the Fréchet distance between the classifier's penultimate features of
the samples and of the test images (FID with a network of the data set itself; lower is better);
fd_floor, the same for n training images: what perfect samples score, as fd is biased upwards at
small n; confidence, the mean largest softmax probability; coverage, the entropy of the predicted
classes over log 10 (1: all ten equally often); with --class-cond or --label, right_class, the share
of samples that the classifier puts in the class they were drawn for. The classifier trains
(seeded) when first needed, printing its test accuracy to stderr, and is cached in
DATA_DIR/score_classifier (or --cache) under a hash of RECIPE: a changed recipe trains anew
instead of reading stale weights.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flow_matching  # noqa: E402  (the repository root is on the path only from the line above)

# Everything that shapes the weights. Change "version" when the code that uses it changes.
RECIPE = {
    "version": 1,
    "widths": [16, 32],     # blocks of two 3x3 convolutions and a 2x2 max pool
    "features": 128,        # the penultimate layer, whose features the Fréchet distance compares
    "epochs": 6,
    "batch_size": 128,
    "lr": 3e-3,             # AdamW's peak rate under a one-cycle schedule
    "seed": 0,
    "rotate": 10.0,         # augmentation: up to this many degrees,
    "scale": 0.1,           # this much larger or smaller,
    "shift": 2.0,           # and this many pixels either way
}
CHANNELS_LAST = torch.channels_last  # (N, H, W, C) in memory: faster convolutions on the CPU

def build(recipe, channels, size):
    """The CNN: conv blocks, then a linear layer to the features, then one to the logits."""
    layers = []
    for width in recipe["widths"]:
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
        size //= 2
    layers += [nn.Flatten(), nn.Linear(channels * size * size, recipe["features"]), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(recipe["features"], 10))

def augment(x, recipe, generator):
    """Small random rotations, scalings and shifts of each image: features that generalise."""
    n = len(x)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(recipe["rotate"])
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * recipe["scale"]
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * recipe["shift"] * 2 / x.shape[-1]
    cos = torch.cos(angle) / scale
    sin = torch.sin(angle) / scale
    rows = [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)]
    grid = F.affine_grid(torch.stack(rows, 1), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)

def train(images, labels, recipe):
    """AdamW with a one-cycle learning rate; the seed fixes the initial weights and the batches."""
    torch.manual_seed(recipe["seed"])
    generator = torch.Generator().manual_seed(recipe["seed"])
    net = build(recipe, images.shape[1], images.shape[-1]).to(memory_format=CHANNELS_LAST)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe["lr"])
    total = recipe["epochs"] * math.ceil(len(images) / recipe["batch_size"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, recipe["lr"], total_steps=total)
    for _ in range(recipe["epochs"]):
        for batch in torch.randperm(len(images), generator=generator).split(recipe["batch_size"]):
            x = augment(images[batch].float() / 255, recipe, generator)
            loss = F.cross_entropy(net(x.contiguous(memory_format=CHANNELS_LAST)), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    return net.eval()

@torch.no_grad()
def embed(net, pixels):
    """Penultimate features (float64) and class probabilities of images in [0, 1]."""
    features = []
    for x in pixels.split(500):
        features.append(net[:-1](x.float().contiguous(memory_format=CHANNELS_LAST)))
    features = torch.cat(features)
    return features.double(), net[-1](features).softmax(1)

def classifier(dataset, data_dir, cache_dir, recipe=RECIPE):
    """The trained classifier of `dataset`: read from the cache, or trained and written there."""
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    folder = cache_dir or os.path.join(data_dir, "score_classifier")
    path = os.path.join(folder, f"{dataset}-{key}.pt")
    test_images, test_labels = flow_matching.load_data(dataset, data_dir, train=False)
    net = build(recipe, test_images.shape[1], test_images.shape[-1]).eval()
    if os.path.exists(path):
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.to(memory_format=CHANNELS_LAST)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        flow_matching.die(f"cannot create the classifier cache {folder}: {e.strerror}")
    start = time.perf_counter()
    net = train(*flow_matching.load_data(dataset, data_dir, train=True), recipe)
    accuracy = (embed(net, test_images / 255)[1].argmax(1) == test_labels).float().mean()
    print(f"trained the {dataset} classifier in {time.perf_counter() - start:.0f} s: "
          f"{accuracy:.2%} test accuracy; cached in {path}", file=sys.stderr)
    torch.save(net.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)                     # never a half-written file under the name
    return net

def statistics(features):
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    features = features.double()
    return features.mean(0), torch.cov(features.T)

def frechet_distance(mu1, cov1, mu2, cov2):
    """|μ1 - μ2|² + tr Σ1 + tr Σ2 - 2 tr (Σ1 Σ2)^½ between Gaussians, computed in float64.

    tr (Σ1 Σ2)^½ = tr (Σ1^½ Σ2 Σ1^½)^½: the two matrices are similar, and the second is symmetric,
    so symmetric eigendecompositions give it exactly even when Σ1 and Σ2 do not commute."""
    mu1, cov1, mu2, cov2 = (t.double() for t in (mu1, cov1, mu2, cov2))
    values, vectors = torch.linalg.eigh(cov1)
    root = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    middle = root @ cov2 @ root
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    d = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * cross
    return max(d.item(), 0.0)                           # rounding can take a 0 a hair below

def read_samples(path):
    """The samples tensor; one error line for a file that is not (N >= 2, C, H, W) in [0, 1]."""
    try:
        x = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        flow_matching.die(f"cannot read {path}: {e.strerror}")
    except Exception:
        flow_matching.die(f"{path} is not a tensor file written by torch.save")
    if not isinstance(x, torch.Tensor):
        flow_matching.die(f"{path} holds a {type(x).__name__}, not a tensor of images")
    if x.dim() != 4:
        flow_matching.die(f"{path} holds a tensor of shape {tuple(x.shape)}, not (N, C, H, W)")
    if len(x) < 2:
        flow_matching.die(f"{path} holds {len(x)} images: the scores need at least 2 samples")
    if not x.is_floating_point() or not x.isfinite().all():
        flow_matching.die(f"{path} must hold finite floating-point values in [0, 1]")
    if x.min() < 0 or x.max() > 1:
        flow_matching.die(f"{path} holds values from {x.min():g} to {x.max():g}, not in [0, 1]")
    return x.float()

def score(net, samples, test_images, train_images, asked=None):
    """The JSON line's figures; the floor's real images are a seeded choice of training images.
    asked: the class each sample was drawn for, if any."""
    features, probabilities = embed(net, samples)
    real = statistics(embed(net, test_images / 255)[0])
    order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))
    floor = embed(net, train_images[order[:len(samples)]] / 255)[0]
    share = torch.bincount(probabilities.argmax(1), minlength=10).double() / len(samples)
    entropy = (share * share.clamp(min=1e-12).reciprocal().log()).sum() / math.log(10)
    scores = {"n": len(samples),
              "fd": round(frechet_distance(*statistics(features), *real), 3),
              "fd_floor": round(frechet_distance(*statistics(floor), *real), 3),
              "confidence": round(probabilities.max(1).values.mean().item(), 4),
              "coverage": round(entropy.item(), 4)}
    if asked is not None:
        right = probabilities.argmax(1) == asked
        scores["right_class"] = round(right.double().mean().item(), 4)
    return scores

def main(argv=None):
    """Check the samples before any work, then score them: one JSON line on stdout."""
    p = flow_matching.Parser(description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="a .pt file holding a float tensor (N, C, H, W) in [0, 1]")
    p.add_argument("--dataset", default="mnist", choices=sorted(flow_matching.DATASETS),
                   help="the data set the samples imitate (default mnist)")
    p.add_argument("--data-dir", default="./data", help="folder the data set is read from")
    p.add_argument("--cache", help="folder of the classifier (default: DATA_DIR/score_classifier)")
    p.add_argument("--class-cond", action="store_true", help="sample i was drawn for class i mod "
                   "10, as `sample` draws a class-conditional model without --label")
    p.add_argument("--label", type=int, choices=range(10), metavar="K",
                   help="every sample was drawn for class K, as `sample --label K` draws them")
    args = p.parse_args(argv)
    samples = read_samples(args.samples)
    asked = None
    if args.label is not None:
        asked = torch.full((len(samples),), args.label)
    elif args.class_cond:
        asked = torch.arange(len(samples)) % 10
    test_images, _ = flow_matching.load_data(args.dataset, args.data_dir, train=False)
    if samples.shape[1:] != test_images.shape[1:]:
        flow_matching.die(f"{args.samples} holds images of (channels, height, width) "
                          f"{tuple(samples.shape[1:])}, not {tuple(test_images.shape[1:])}")
    train_images, _ = flow_matching.load_data(args.dataset, args.data_dir, train=True)
    net = classifier(args.dataset, args.data_dir, args.cache, RECIPE)
    print(json.dumps(score(net, samples, test_images, train_images, asked)))

if __name__ == "__main__":
    main()
