"""Helpers shared by the test files."""
import torch


def make_batch(n=37, d=40, c=9, seed=0, dtype=torch.float64):
    """Random embeddings [n, d] and labels [n] in [0, c); the last sample gets a class of its own."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    y[-1] = c
    return x, y
