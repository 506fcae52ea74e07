"""The PyTorch MNIST reference (benchmarks/mnist_torch.py): its cross init is a true cross init."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mnist_torch.py"


@pytest.fixture(scope="module")
def mnist_torch():
    spec = importlib.util.spec_from_file_location("mnist_torch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n", [2, 3, 10])
def test_cross_init_gives_no_model_its_own_init(mnist_torch, n):
    # distinct inits per model; a roll of a random permutation kept some model's own init in
    # ~63% of draws at n=10
    ps = mnist_torch.init(n, (5, 4, 3), torch.Generator().manual_seed(0))
    for seed in range(200):
        cross = mnist_torch.cross_init(ps, seed)
        for j in range(n):
            # model j got some other model's init, all of its layers from that one model
            donors = [i for i in range(n)
                      if all(torch.equal(c[j], p[i]) for c, p in zip(cross, ps))]
            assert len(donors) == 1 and donors[0] != j
