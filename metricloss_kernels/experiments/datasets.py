"""The small datasets of the demo and the tournament, with the deep-metric-learning protocol: the classes trained on,
the classes validated on and the classes tested on are disjoint.

- Oriented digits: scikit-learn's handwritten digits (1,797 8x8 images shipped inside scikit-learn), each digit in
  its 8 orientations (rotations by 90 degrees, mirrored or not), every orientation a class of its own. Training
  classes come from the digits 0-4, test classes from the unseen digits 5-9.
- Multi-centre: synthetic classes that are each a mixture of several well-separated modes (a latent Gaussian
  per mode, a fixed random non-linear map to the input, plus a nuisance subspace with more variance than the signal).
  A single point per class cannot represent such a class without folding the space; several proxies per class can.

Inputs are float32 [N, 64]; labels int64 [N]. Training labels are 0..C_train-1 (what the proxy losses index);
validation and test labels are the classes' own ids (only equality matters for retrieval).
"""
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

TRAIN_DIGITS, ORIENTATIONS = 5, 8
# Test orientations of the unseen digits: 0 and 90 degrees. A set holding two orientations 180 degrees apart would
# make classes identical up to handwriting (a 6 turned by 180 degrees is a 9).
TEST_ORIENTATIONS = (0, 1)
VALIDATION_FRACTION = 0.1  # of the training classes (the thesis's 90/10 split)
SPLIT_SEED = 0  # the validation classes are fixed: the same for every loss, seed and embedding size


# ------------------------------------------------------------------------------------------------------ digits
def random_shift(x, generator=None, max_shift=1):
    """x [N, 64] flattened 8x8 images -> each translated by up to `max_shift` pixels in each direction."""
    n = x.shape[0]
    padded = nn.functional.pad(x.view(n, 1, 8, 8), (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(8))[:, :, None].expand(n, 8, 8)
    cols = (dx[:, None] + torch.arange(8))[:, None, :].expand(n, 8, 8)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].reshape(n, 64)


def orient(x, t):
    """x [N, 64] flattened 8x8 images -> orientation t in 0..7 (rotation by 90t degrees, mirrored when t >= 4)."""
    img = x.view(-1, 8, 8)
    img = img.flip(-1) if t >= 4 else img
    return torch.rot90(img, t % 4, (1, 2)).reshape(-1, 64)


def digits():
    """(x [1797, 64] pixels scaled to [0, 1], y [1797] digit labels 0-9)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target, dtype=torch.long)


def oriented(x, y):
    """Every image in its ORIENTATIONS orientations: (x [8M, 64], labels y * ORIENTATIONS + t)."""
    return (torch.cat([orient(x, t) for t in range(ORIENTATIONS)]),
            torch.cat([y * ORIENTATIONS + t for t in range(ORIENTATIONS)]))


def load_digits_split():
    """The demo's split: (x_train [M, 64], y_train [M] in [0, 40), x_test [T, 64], y_test [T] in [0, 5)): training on
    digits 0-4 in every orientation, testing on digits 5-9 upright, each translated once by up to a pixel."""
    x, y = digits()
    train = y < TRAIN_DIGITS
    x_train, y_train = oriented(x[train], y[train])
    x_test = random_shift(x[~train], torch.Generator().manual_seed(1234))
    return x_train, y_train, x_test, y[~train] - TRAIN_DIGITS


def digits_net(dim: int) -> nn.Module:
    """A small CNN: [N, 64] flattened 8x8 images -> [N, dim]."""
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64 * 16, dim))


# ------------------------------------------------------------------------------------------------ multi-centre
def multi_centre(num_classes, modes=4, per_mode=20, seed=0, input_dim=64, latent_dim=8, mode_spread=1.0,
                 noise=0.4, nuisance=1.0):
    """Synthetic multi-modal classes: (x [num_classes * modes * per_mode, input_dim], y [...] in [0, num_classes)).

    Class c has a centre a_c ~ N(0, I) in a latent space of `latent_dim` dimensions and `modes` mode centres
    a_c + mode_spread * b_{c,m}, b ~ N(0, I); a sample is a mode centre plus N(0, noise^2 I). The latent point goes
    through a fixed random map tanh(A z) to half of the input dimensions; the other half is nuisance N(0, nuisance^2)
    that the embedding must learn to ignore; a fixed random rotation mixes the two halves. The maps depend on
    nothing but the dimensions (the same for every seed), so classes drawn with different seeds come from one
    distribution: that is what makes the test classes (another seed) learnable from the training classes."""
    maps = torch.Generator().manual_seed(12345)
    signal_dim = input_dim // 2
    a = torch.randn(latent_dim, signal_dim, generator=maps) * (2.0 / latent_dim) ** 0.5
    rotation, _ = torch.linalg.qr(torch.randn(input_dim, input_dim, generator=maps))

    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, 1, latent_dim, generator=g)
    mode_centres = centres + mode_spread * torch.randn(num_classes, modes, latent_dim, generator=g)
    z = mode_centres[:, :, None, :] + noise * torch.randn(num_classes, modes, per_mode, latent_dim, generator=g)
    z = z.reshape(-1, latent_dim)
    x = torch.cat([torch.tanh(z @ a), nuisance * torch.randn(z.shape[0], input_dim - signal_dim, generator=g)], 1)
    y = torch.arange(num_classes).repeat_interleave(modes * per_mode)
    return x @ rotation, y


def mlp_net(dim: int, input_dim: int = 64, hidden: int = 128) -> nn.Module:
    """[N, input_dim] -> [N, dim]: two hidden ReLU layers."""
    return nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, dim))


# ------------------------------------------------------------------------------------------------------ splits
class Task(NamedTuple):
    """A class-disjoint train / validation / test split with its backbone and training augmentation."""
    name: str
    x_train: torch.Tensor  # [M, 64]
    y_train: torch.Tensor  # [M] in [0, num_train_classes)
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    net: Callable[[int], nn.Module]  # embedding size -> backbone
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # a training batch -> augmented batch

    @property
    def num_train_classes(self) -> int:
        return int(self.y_train.max()) + 1


def split_classes(labels, fraction=VALIDATION_FRACTION, seed=SPLIT_SEED):
    """The classes of `labels` split into (training classes, validation classes), sorted long tensors; the
    validation classes are round(fraction * C) (at least 2) classes drawn by a fixed generator."""
    classes = torch.unique(labels)
    num_val = max(2, round(fraction * len(classes)))
    if num_val >= len(classes) - 1:
        raise ValueError(f"labels must have more than {num_val + 1} classes to keep {num_val} for validation, "
                         f"got {len(classes)}")
    perm = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed))
    return classes[perm[num_val:]].sort().values, classes[perm[:num_val]].sort().values


def _train_val(x, y):
    """(x_train, y_train relabelled 0..C-1, x_val, y_val) from the training classes' data."""
    train_classes, val_classes = split_classes(y)
    is_val = torch.isin(y, val_classes)
    return x[~is_val], torch.searchsorted(train_classes, y[~is_val]), x[is_val], y[is_val]


def _jitter(x, generator, std=0.05):
    return x + std * torch.randn(x.shape, generator=generator)


def digits_task() -> Task:
    """Training and validation classes: digits 0-4 in 8 orientations (40 classes: 36 train, 4 validation); test
    classes: digits 5-9 in TEST_ORIENTATIONS (10 classes). Validation and test images are translated once by up to
    a pixel (fixed generators); training batches are translated afresh by up to a pixel (the augmentation)."""
    x, y = digits()
    seen = y < TRAIN_DIGITS
    x_tr, y_tr, x_val, y_val = _train_val(*oriented(x[seen], y[seen]))
    x_te, y_te = oriented(x[~seen], y[~seen])
    keep = torch.isin(y_te % ORIENTATIONS, torch.tensor(TEST_ORIENTATIONS))
    x_te, y_te = x_te[keep], y_te[keep]
    return Task("digits", x_tr, y_tr, random_shift(x_val, torch.Generator().manual_seed(1)), y_val,
                random_shift(x_te, torch.Generator().manual_seed(2)), y_te, digits_net, random_shift)


def multi_centre_task(classes=100, modes=4, per_mode=20) -> Task:
    """`classes` training classes (90/10 into training and validation) and `classes` test classes, every class a
    mixture of `modes` modes of `per_mode` samples; augmentation: Gaussian jitter (std 0.05) of the inputs."""
    x_tr, y_tr, x_val, y_val = _train_val(*multi_centre(classes, modes, per_mode, seed=0))
    x_te, y_te = multi_centre(classes, modes, per_mode, seed=1)
    return Task("multi_centre", x_tr, y_tr, x_val, y_val, x_te, y_te, mlp_net, _jitter)


TASKS = {"digits": digits_task, "multi_centre": multi_centre_task}
