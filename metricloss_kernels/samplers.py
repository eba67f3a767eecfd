"""Batch samplers for metric learning: `MPerClassSampler`, m samples per class in every batch (the batches of the
pair losses need positives), with pytorch-metric-learning's semantics, deterministic epochs and DistributedDataParallel
support.

    sampler = MPerClassSampler(dataset_labels, m=4, batch_size=128)   # 32 classes x 4 samples per batch
    loader = DataLoader(dataset, batch_size=128, sampler=sampler)     # batch_size must be the sampler's
    for epoch in range(epochs):
        sampler.set_epoch(epoch)                                       # optional: epochs count themselves
        for x, y in loader: ...
"""
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from . import _validation as V


def _replicas(num_replicas, rank) -> tuple:
    """(num_replicas, rank), each defaulting to torch.distributed's world size and rank when it is initialised (1
    and 0 when not); ValueError unless 0 <= rank < num_replicas."""
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    V.positive_int(num_replicas, "num_replicas")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be an integer in [0, num_replicas = {num_replicas}), got {rank!r}")
    return num_replicas, rank


class MPerClassSampler(Sampler):
    """Indices in runs of `batch_size` that hold `batch_size // m` distinct classes x `m` samples each: the classes
    of a run drawn uniformly without replacement, the samples of a class without replacement, or with replacement
    for a class with fewer than `m` samples (pytorch-metric-learning's MPerClassSampler).

    Args:
        labels: [N] integer class labels of the dataset (a tensor, NumPy array or sequence).
        m: samples per class and batch.
        batch_size: the DataLoader's batch size (per process), a multiple of m with batch_size <= m * (number of
            classes); None: every run holds every class (runs of m * number of classes).
        length_before_new_iter: indices per epoch (over all processes), rounded down to whole runs (at least one
            run when batch_size is None, where a run may be longer).
        num_replicas, rank: DistributedDataParallel's processes and this one's (default: torch.distributed's world
            size and rank when it is initialised, else 1 and 0). Each process gets len(self) = the epoch's runs
            divided by num_replicas (whole runs) x batch_size indices: every num_replicas-th run of the
            one-process epoch, starting at its rank, so the processes' batches differ.
        seed: with the epoch, fixes the draws: the same (seed, epoch) gives the same indices on every process.

    Epochs: each iteration uses the current epoch, then moves to the next, so that successive epochs differ with or
    without `set_epoch(e)` (which sets the epoch of the next iteration, as DistributedSampler's does). Unlike PML's
    class, the draws come from a torch.Generator seeded by (seed, epoch), not NumPy's global random state, and
    len(self) is always the number of indices an iteration yields.
    """

    def __init__(self, labels, m, batch_size=None, length_before_new_iter=100000, num_replicas=None, rank=None,
                 seed=0):
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.numel() == 0 or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be a non-empty 1-D sequence of integer class labels, got shape "
                             f"{tuple(labels.shape)} dtype {labels.dtype}")
        self.m = V.positive_int(m, "m")
        _, inverse, counts = torch.unique(labels.cpu(), return_inverse=True, return_counts=True)
        # the dataset's indices grouped by class: class c's are _order[_starts[c]:_starts[c] + _counts[c]]
        self._order, self._counts = torch.argsort(inverse, stable=True), counts
        self._starts = counts.cumsum(0) - counts
        num_classes = len(counts)
        if batch_size is None:
            run = m * num_classes
        else:
            run = V.positive_int(batch_size, "batch_size")
            if batch_size % m:
                raise ValueError(f"batch_size must be a multiple of m = {m}, got {batch_size}")
            if batch_size > m * num_classes:
                raise ValueError(f"batch_size must be at most m x the number of classes = {m} x {num_classes}, "
                                 f"got {batch_size}")
        V.positive_int(length_before_new_iter, "length_before_new_iter")
        if batch_size is not None and length_before_new_iter < batch_size:
            raise ValueError(f"length_before_new_iter must be at least batch_size = {batch_size}, got "
                             f"{length_before_new_iter}")
        self.num_replicas, self.rank = _replicas(num_replicas, rank)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self._run = run
        self._runs = max(1, length_before_new_iter // run) if batch_size is None else length_before_new_iter // run
        if self._runs < self.num_replicas:
            raise ValueError(f"length_before_new_iter = {length_before_new_iter} gives {self._runs} runs of {run} "
                             f"indices, fewer than num_replicas = {self.num_replicas}")

    def __len__(self) -> int:
        return self._runs // self.num_replicas * self._run

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next iteration (DistributedSampler's method; every process must set the same)."""
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        # Every process draws the whole epoch alike (vectorised: cheap) and keeps every num_replicas-th run.
        k, c = self._run // self.m, len(self._counts)
        if k * k <= c:  # Floyd's k steps (of O(k) comparisons per run)
            classes = _distinct(torch.full((self._runs,), c), k, g).flatten()
        else:  # cheaper as a random order of all the classes per run
            classes = torch.rand(self._runs, c, generator=g).argsort(1)[:, :k].flatten()
        counts = self._counts[classes]
        members = _distinct(counts.clamp(min=self.m), self.m, g)
        drawn = (torch.rand(members.shape, generator=g, dtype=torch.float64) * counts[:, None]).long()
        members = torch.where((counts < self.m)[:, None], drawn, members)  # with replacement
        index = self._order[self._starts[classes][:, None] + members].view(self._runs, self._run)
        runs = self._runs // self.num_replicas * self.num_replicas
        return iter(index[self.rank:runs:self.num_replicas].flatten().tolist())


def _distinct(n: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """[P, k]: for each population size n_p >= k of n [P], k distinct integers drawn uniformly from [0, n_p) (a
    uniform k-subset: Floyd's algorithm, k steps vectorised over P), in random order."""
    picks = n.new_empty(len(n), k)
    for i in range(k):
        j = n - k + i
        t = (torch.rand(len(n), generator=g, dtype=torch.float64) * (j + 1)).long()  # uniform in [0, j]
        picks[:, i] = torch.where((picks[:, :i] == t[:, None]).any(1), j, t)
    return picks.gather(1, torch.rand(len(n), k, generator=g).argsort(1))
