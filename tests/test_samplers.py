"""MPerClassSampler: the composition of every batch against its definition and against pytorch-metric-learning's
sampler (same length, same composition), deterministic epochs, DistributedDataParallel's split, bad arguments."""
import collections

import pytest
import torch
import torch.distributed as dist

import metricloss_kernels as mlk

# 12 classes of 1..12 samples, shuffled: classes with fewer than m samples are drawn with replacement
SIZES = torch.arange(1, 13)
LABELS = (torch.arange(12) * 7 + 3).repeat_interleave(SIZES)[torch.randperm(78, generator=torch.Generator()
                                                                            .manual_seed(0))]


def runs(sampler, labels, run):
    """The sampler's indices as runs [R, run], with a check of the composition of each run: run // m distinct
    classes x m samples, each sample of its class, distinct within its class when the class has >= m samples."""
    index = torch.tensor(list(sampler))
    assert len(index) == len(sampler) and len(index) % run == 0
    index = index.view(-1, run)
    m = sampler.m
    for r in index:
        groups = r.view(-1, m)
        group_labels = labels[groups]
        assert (group_labels == group_labels[:, :1]).all()  # a group is m samples of one class
        assert len(set(group_labels[:, 0].tolist())) == run // m  # of distinct classes
        for g, y in zip(groups, group_labels[:, 0]):
            size = int((labels == y).sum())
            assert len(set(g.tolist())) == min(m, size) or size < m  # no repeat unless the class is too small
    return index


def composition(batches, labels, m):
    """What a sampler's batches must share with PML's: (number of batches, the multiset of class-group sizes of every
    batch, whether a small class's group repeats a sample)."""
    sizes = {tuple(sorted(collections.Counter(labels[b].tolist()).values())) for b in batches}
    small = {int(y) for y in labels.unique() if (labels == y).sum() < m}
    repeats = any(len(set(b[labels[b] == y].tolist())) < m for b in batches for y in small if (labels[b] == y).any())
    return len(batches), sizes, repeats


@pytest.mark.parametrize("m,batch_size,length", [(4, 16, 1000), (2, 24, 999), (3, None, 500), (5, None, 10)])
def test_batches_as_pmls(m, batch_size, length):
    """Same length and batch composition as pytorch-metric-learning's MPerClassSampler (whose draws come from
    NumPy's global state: the draws themselves differ)."""
    samplers = pytest.importorskip("pytorch_metric_learning.samplers")
    ours = mlk.MPerClassSampler(LABELS, m, batch_size, length)
    theirs = samplers.MPerClassSampler(LABELS, m, batch_size, length)
    run = batch_size or m * 12
    batches = runs(ours, LABELS, run)
    theirs_index = torch.tensor(list(theirs))
    if len(theirs) == len(theirs_index):  # PML reports its length, not the longer single run it yields, at length 10
        assert len(ours) == len(theirs)
    assert composition(batches, LABELS, m) == composition(theirs_index.view(-1, run), LABELS, m)
    if batch_size is None:
        assert all(len(set(LABELS[b].tolist())) == 12 for b in batches)  # a run holds every class


@pytest.mark.parametrize("batch_size", [4, 8], ids=["floyd", "permutation"])  # the two ways classes are drawn
def test_classes_and_samples_are_drawn_uniformly(batch_size):
    """Over many runs every class is drawn equally often, and so is every sample of a class: Pearson's chi-square
    statistics of the counts below their 0.9999 quantiles (25.7 for 5 degrees of freedom, 64.6 for 29), where a
    bias of 5% in one count would give about 100."""
    labels = torch.arange(6).repeat_interleave(5)
    index = torch.tensor(list(mlk.MPerClassSampler(labels, 2, batch_size, 60000)))
    for counts, quantile in ((torch.bincount(labels[index], minlength=6), 25.7),
                             (torch.bincount(index, minlength=30), 64.6)):
        expected = counts.double().mean()
        assert ((counts - expected) ** 2 / expected).sum() < quantile


def test_epochs_are_deterministic():
    """The same (seed, epoch) gives the same indices; each iteration moves to the next epoch, which set_epoch
    sets; another seed draws other indices."""
    a, b = mlk.MPerClassSampler(LABELS, 4, 16, 400), mlk.MPerClassSampler(LABELS, 4, 16, 400)
    first, second = list(a), list(a)
    assert first != second
    b.set_epoch(1)
    assert list(b) == second
    b.set_epoch(0)
    assert list(b) == first
    assert list(mlk.MPerClassSampler(LABELS, 4, 16, 400, seed=1)) != first


@pytest.mark.parametrize("batch_size,length", [(16, 1000), (None, 700)])
def test_replicas_split_the_epoch_in_whole_batches(batch_size, length):
    """Each of 3 processes gets its runs of the one-process epoch (every third), whole runs, len / 3 of them."""
    run = batch_size or 4 * 12
    whole = runs(mlk.MPerClassSampler(LABELS, 4, batch_size, length, seed=5), LABELS, run)
    parts = [runs(mlk.MPerClassSampler(LABELS, 4, batch_size, length, num_replicas=3, rank=r, seed=5), LABELS, run)
             for r in range(3)]
    assert all(len(p) == len(whole) // 3 for p in parts)
    for r, part in enumerate(parts):
        assert torch.equal(part, whole[r:len(whole) // 3 * 3:3])
    assert not torch.equal(parts[0], parts[1])


def test_replicas_default_to_torch_distributed(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 2)
    sampler = mlk.MPerClassSampler(LABELS, 4, 16, 1000)
    assert (sampler.num_replicas, sampler.rank) == (4, 2) and len(sampler) == 1000 // 16 // 4 * 16


def test_data_loader():
    """The sampler drives a DataLoader whose batch size is the sampler's: every batch is m per class."""
    dataset = torch.utils.data.TensorDataset(torch.randn(78, 3), LABELS)
    sampler = mlk.MPerClassSampler(LABELS, 4, 16, 160)
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=16, sampler=sampler))
    assert len(batches) == 10
    assert all(sorted(collections.Counter(y.tolist()).values()) == [4] * 4 for _, y in batches)


@pytest.mark.parametrize("kwargs,match", [
    (dict(labels=torch.zeros(0, dtype=torch.long)), "labels"),
    (dict(labels=torch.zeros(4, 2, dtype=torch.long)), "labels"),
    (dict(labels=torch.rand(8)), "labels"),
    (dict(m=0), "m must"),
    (dict(batch_size=18), "multiple of m"),
    (dict(batch_size=52), "at most"),
    (dict(batch_size=16, length_before_new_iter=8), "length_before_new_iter"),
    (dict(num_replicas=0), "num_replicas"),
    (dict(num_replicas=2, rank=2), "rank"),
    (dict(batch_size=16, length_before_new_iter=40, num_replicas=3), "fewer than num_replicas"),
    (dict(seed=1.5), "seed"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    arguments = {"labels": LABELS, "m": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        mlk.MPerClassSampler(**arguments)
