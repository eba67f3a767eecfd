"""Demo: train an embedding on scikit-learn's handwritten digits (shipped inside scikit-learn, 1,797 8x8 images)
with the deep-metric-learning protocol: classes seen in training and evaluated classes are disjoint.

Training classes: digits 0-4, each in its 8 orientations (rotations by 90 degrees, mirrored or not), every
orientation a class of its own: 40 classes, so the embedding must keep more than 5 directions. Training batches
are translated by up to a pixel. Evaluation: retrieval among the digits 5-9 (never seen in any orientation), each
translated once by up to a pixel, so that raw pixel geometry is not enough."""
import argparse
import time

import torch
from torch import nn

from . import losses as L
from .metrics import evaluate

TRAIN_DIGITS, ORIENTATIONS, EMBEDDING = 5, 8, 32
TRAIN_CLASSES = TRAIN_DIGITS * ORIENTATIONS


def _loss_factories():
    c, d = TRAIN_CLASSES, EMBEDDING
    return {
        "proxy_anchor": lambda: L.ProxyAnchorLoss(c, d),
        "proxy_nca": lambda: L.ProxyNCALoss(c, d, scale=8.0),
        "soft_triple": lambda: L.SoftTripleLoss(c, d, centers_per_class=3),
        "mpa": lambda: L.MPALoss(c, d, centers_per_class=3),
        "mpa_dw": lambda: L.MPALoss(c, d, centers_per_class=3, variant="dw"),
        "mpa_ap": lambda: L.MPALoss(c, d, centers_per_class=3, variant="ap"),
        "arcface": lambda: L.ArcFaceLoss(c, d, scale=16.0),
        "cosface": lambda: L.CosFaceLoss(c, d, scale=16.0),
        "l2_softmax": lambda: L.L2SoftmaxLoss(c, d),
        "polytope": lambda: L.RegularPolytopeLoss(c, "orthoplex"),
        "proxy_repel": lambda: L.ProxyRepelLoss(c, d),
        "contrastive": lambda: L.ContrastiveLoss(),
        "triplet": lambda: L.TripletMarginLoss(mining="semi-hard"),
        "lifted": lambda: L.LiftedStructureLoss(),
        "npairs": lambda: L.NPairsLoss(),
        "margin": lambda: L.MarginLoss(),
        "multi_similarity": lambda: L.MultiSimilarityLoss(),
        "exp_triplet": lambda: L.ExponentialTripletLoss(c),
        "composite": lambda: L.WeightedSumLoss(
            {"exp": L.ExponentialTripletLoss(c), "center": L.CenterLoss(c, d, margin=0.1),
             "class": L.L2SoftmaxLoss(c, d)}, weights={"exp": 1.0, "center": 0.1, "class": 1.0}),
    }


LOSSES = tuple(_loss_factories())


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


def load_digits_split():
    """(x_train [M, 64], y_train [M] in [0, 40), x_test [T, 64], y_test [T] in [0, 5)); pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    train = y < TRAIN_DIGITS
    x_train = torch.cat([orient(x[train], t) for t in range(ORIENTATIONS)])
    y_train = torch.cat([y[train] * ORIENTATIONS + t for t in range(ORIENTATIONS)])
    x_test = random_shift(x[~train], torch.Generator().manual_seed(1234))
    return x_train, y_train, x_test, y[~train] - TRAIN_DIGITS


def embedding_net(dim: int) -> nn.Module:
    """A small CNN: [N, 64] flattened 8x8 images -> [N, dim]."""
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64 * 16, dim))


REPORT = (("recall@1", "R@1"), ("recall@2", "R@2"), ("recall@4", "R@4"), ("recall@8", "R@8"),
          ("map@r", "MAP@R"), ("ndcg@10", "nDCG@10"))


def _scores(net, x, y):
    with torch.no_grad():
        net.eval()
        out = evaluate(net(x), y, ks=(1, 2, 4, 8, 10))
        net.train()
    return out


def run(loss_name="proxy_anchor", epochs=15, batch_size=128, lr=1e-3, seed=0, out=print):
    """Trains, then prints and returns {"before": metrics, "after": metrics} on the unseen digits."""
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits_split()
    loss_fn = _loss_factories()[loss_name]()
    net = embedding_net(getattr(loss_fn, "embedding_size", EMBEDDING))
    before = _scores(net, x_te, y_te)
    # proxies learn faster than the network, as in the ProxyAnchor authors' recipe
    groups = [{"params": net.parameters(), "lr": lr}]
    if any(p.requires_grad for p in loss_fn.parameters()):
        groups.append({"params": [p for p in loss_fn.parameters() if p.requires_grad], "lr": lr * 10})
    opt = torch.optim.Adam(groups)

    from tqdm import tqdm

    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"training {loss_name}", unit="epoch")
    for _ in bar:
        perm = torch.randperm(len(x_tr))
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            loss = loss_fn(net(random_shift(x_tr[idx])), y_tr[idx])  # learn shift invariance
            opt.zero_grad()
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    after = _scores(net, x_te, y_te)

    out(f"\n{loss_name}: retrieval among unseen digits 5-9 ({len(x_te)} queries, leave-one-out), "
        f"{epochs} epochs in {time.perf_counter() - start:.1f} s:")
    out(f"{'':8}" + "".join(f"{short:>9}" for _, short in REPORT))
    for name, res in (("before", before), ("after", after)):
        out(f"{name:8}" + "".join(f"{100 * res[key]:9.2f}" for key, _ in REPORT))
    return {"before": before, "after": after}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m metricloss_kernels demo", description=__doc__)
    parser.add_argument("--loss", default="proxy_anchor", choices=LOSSES)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(args.loss, args.epochs, args.batch_size, args.lr, args.seed)
