"""Plain PyTorch reference for the MNIST auxiliary-logit experiment (batched einsum, fp32).

The same protocol as `sjax mnist`: N stacked MLPs 784-256-256-(10+m), per-model shuffles,
Adam 3e-4, batch 1024, 5 teacher epochs on MNIST, then four students (aux-only / all logits,
same / cross init) for 5 epochs each on 60,000 fixed noise images per model, which this
version materialises ([N, 60000, 784] fp32: 1.9 GB at N=10, 18.8 GB at N=100).

    python benchmarks/mnist_torch.py --n-models 10
"""

import argparse
import json
import resource
import time

import jax
import torch

from sjax.config import MnistConfig
from sjax.mnist.experiment import derangement, load_data


def init(n, sizes, g):
    ps = []
    for fi, fo in zip(sizes[:-1], sizes[1:]):
        ps.append((torch.randn(n, fi, fo, generator=g) / fi ** 0.5).requires_grad_())
        ps.append(torch.zeros(n, 1, fo).requires_grad_())
    return ps


def cross_init(ps, seed):
    """Model j starts from model sigma[j]'s init, sigma a derangement (as `sjax mnist`): no
    model may keep its own init, or cross-init would be partly same-init."""
    sigma = torch.from_numpy(derangement(jax.random.key(seed), ps[0].shape[0]))
    return [p[sigma] for p in ps]


def forward(ps, x):  # x [n, b, i]
    h = x
    for j in range(0, len(ps), 2):
        h = torch.einsum("nbi,nio->nbo", h, ps[j]) + ps[j + 1]
        if j < len(ps) - 2:
            h = torch.relu(h)
    return h


def train(ps, epochs, n_examples, batch, loss_fn, g):
    opt = torch.optim.Adam(ps, lr=3e-4)
    n = ps[0].shape[0]
    for _ in range(epochs):
        perms = torch.stack([torch.randperm(n_examples, generator=g) for _ in range(n)])
        for s in range(n_examples // batch):
            idx = perms[:, s * batch:(s + 1) * batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(ps, idx).backward()
            opt.step()
    return ps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-models", type=int, default=10)
    ap.add_argument("--aux", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    d = load_data(MnistConfig())
    x, y = torch.from_numpy(d["x_train"]), torch.from_numpy(d["y_train"]).long()
    xt, yt = torch.from_numpy(d["x_test"]), torch.from_numpy(d["y_test"]).long()
    n, m = args.n_models, args.aux
    sizes = (784, 256, 256, 10 + m)
    ref = init(n, sizes, g)
    teacher = [p.detach().clone().requires_grad_() for p in ref]

    def ce(ps, idx):
        logits = forward(ps, x[idx])[..., :10]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 10), y[idx].reshape(-1)) * n

    train(teacher, 5, len(x), 1024, ce, g)
    noise = torch.rand(n, 60000, 784, generator=g) * 2 - 1
    with torch.no_grad():
        targets = torch.cat([forward(teacher, noise[:, i:i + 1024]) for i in range(0, 60000, 1024)], 1)

    def acc(ps):
        with torch.no_grad():
            return (forward(ps, xt.expand(n, -1, -1))[..., :10].argmax(-1) == yt).float().mean(1)

    results = {"teacher": acc(teacher).mean().item(), "reference": acc(ref).mean().item()}
    for span, (lo, hi) in {"aux": (10, 10 + m), "all": (0, 10 + m)}.items():
        for start in ("same", "cross"):
            ps = [p.detach().clone().requires_grad_()
                  for p in (cross_init(ref, 0) if start == "cross" else ref)]

            def kl(ps, idx, lo=lo, hi=hi):
                xb = torch.gather(noise, 1, idx[..., None].expand(-1, -1, 784))
                tb = torch.gather(targets, 1, idx[..., None].expand(-1, -1, targets.shape[-1]))
                s = torch.log_softmax(forward(ps, xb)[..., lo:hi], -1)
                t = torch.log_softmax(tb[..., lo:hi], -1)
                return (t.exp() * (t - s)).sum(-1).mean() * n

            results[f"student_{span}_{start}_init"] = acc(train(ps, 5, 60000, 1024, kl, g)).mean().item()
    wall = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(json.dumps({"n_models": n, "wall_seconds": wall, "peak_rss_gb": peak_gb,
                      "threads": torch.get_num_threads(), "accuracy": results}, indent=2))


if __name__ == "__main__":
    main()
