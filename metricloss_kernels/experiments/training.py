"""Training with the tournament's protocol: one loss, one embedding size, one seed (tournament.py, claims.py).

The seed fixes the network's initialisation, the batch order and the augmentation, so that every loss sees the
same ones; the network is evaluated on the validation classes after every epoch and the best epoch's network is
tested on the test classes.
"""
import copy
import math
import os
import platform
import statistics
import time
from typing import NamedTuple

import torch

from ..metrics import evaluate, map_at_r, recall_at_k
from ..retrieval import knn
from ..samplers import MPerClassSampler
from . import zoo

RECALL_KS = (1, 2, 4, 8)


def embed(net, x):
    """net(x) without autograd, in eval mode (restored afterwards)."""
    mode = net.training
    net.eval()
    with torch.no_grad():
        out = net(x)
    net.train(mode)
    return out


def validation_scores(net, x, y):
    """(recall@1, MAP@R) of leave-one-out cosine retrieval among the validation classes (every validation class
    has several samples), without evaluate()'s clustering metrics."""
    num_relevant = (y[:, None] == y).sum(1) - 1
    _, idx = knn(embed(net, x), None, k=int(num_relevant.max()))
    relevance = y[idx] == y[:, None]
    return float(recall_at_k(relevance, num_relevant, 1).mean()), float(map_at_r(relevance, num_relevant).mean())


class Run(NamedTuple):
    val_recall: list  # validation R@1 before training (index 0) and after every epoch
    val_map_r: list
    best_epoch: int  # 0 when no epoch beat the untrained network or training diverged at once
    test: dict  # evaluate() of the selected network on the test classes
    seconds: float
    diverged_at: int | None  # epoch whose loss became non-finite (training stopped there)
    test_embeddings: torch.Tensor | None


def initial_network(task, dim, seed) -> torch.nn.Module:
    """task.net(dim) as train_run initialises it for `seed`: the same network for every loss."""
    torch.manual_seed(seed)
    return task.net(dim)


def test_metrics(net, task, embeddings=None) -> dict:
    """evaluate() of the network's test embeddings (or of the given ones) among the test classes."""
    embeddings = embed(net, task.x_test) if embeddings is None else embeddings
    return evaluate(embeddings, task.y_test, ks=(*RECALL_KS, 10))


def train_run(task, loss_name, dim, seed, epochs, batch_size=128, per_class=4, lr=1e-3, overrides=None,
              keep_embeddings=False, on_epoch=None, select=True) -> Run:
    """Trains task.net(dim) with the loss `loss_name` for `epochs` epochs and selects the epoch of best validation
    R@1 (then MAP@R; the last epoch when not `select`). An epoch is as many samples as the training set, in batches
    of `per_class` samples of batch_size // per_class distinct classes (MPerClassSampler; batch_size is capped at
    per_class x the training classes). The seed fixes the network's initialisation, the batches and the
    augmentation, so every loss sees the same ones."""
    start = time.perf_counter()
    net = initial_network(task, dim, seed)  # built before the loss: the same initial network for every loss
    loss_fn = zoo.make_loss(loss_name, task.num_train_classes, dim, **(overrides or {}))
    opt = zoo.optimizer(net, loss_fn, lr)
    g = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, per_class * task.num_train_classes)
    sampler = MPerClassSampler(task.y_train, per_class, batch_size, len(task.y_train), seed=seed)
    scores = [validation_scores(net, task.x_val, task.y_val)]
    best_epoch, best_state, diverged_at = 0, copy.deepcopy(net.state_dict()), None
    for epoch in range(1, epochs + 1):
        for idx in torch.tensor(list(sampler)).view(-1, batch_size):
            loss = loss_fn(net(task.augment(task.x_train[idx], g)), task.y_train[idx])
            if not torch.isfinite(loss):
                diverged_at = epoch
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
        if diverged_at is not None:
            break
        scores.append(validation_scores(net, task.x_val, task.y_val))
        if scores[-1] > scores[best_epoch] or not select:
            best_epoch, best_state = epoch, copy.deepcopy(net.state_dict())
        if on_epoch is not None:
            on_epoch(epoch, scores[-1][0])
    net.load_state_dict(best_state)
    test_embeddings = embed(net, task.x_test)
    test = test_metrics(net, task, test_embeddings)
    return Run([s[0] for s in scores], [s[1] for s in scores], best_epoch, test, time.perf_counter() - start,
               diverged_at, test_embeddings if keep_embeddings else None)


# ------------------------------------------------------------------------------------------------- statistics
def std(values):
    """Sample standard deviation (n - 1); 0 for a single value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std(rows):
    """Columns' mean and sample std over equal-length lists, NaN entries left out (NaN where nothing is left)."""
    means, stds = [], []
    for column in zip(*rows):
        values = [v for v in column if not math.isnan(v)]
        means.append(statistics.fmean(values) if values else math.nan)
        stds.append(std(values) if values else math.nan)
    return means, stds


def machine_summary():
    """One line on where a result was measured."""
    return (f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"{platform.python_implementation()} {platform.python_version()}; a shared machine")
