"""Demo: train an embedding on scikit-learn's handwritten digits (shipped inside scikit-learn, 1,797 8x8 images)
with the deep-metric-learning protocol: classes seen in training and evaluated classes are disjoint.

Training classes: digits 0-4, each in its 8 orientations (rotations by 90 degrees, mirrored or not), every
orientation a class of its own: 40 classes, so the embedding must keep more than 5 directions. Training batches
are translated by up to a pixel. Evaluation: retrieval among the digits 5-9 (never seen in any orientation), each
translated once by up to a pixel, so that raw pixel geometry is not enough."""
import argparse
import time

import torch

from ..metrics import evaluate
from ..samplers import MPerClassSampler
from . import zoo
from .datasets import ORIENTATIONS, TRAIN_DIGITS, load_digits_split, random_shift
from .datasets import digits_net as embedding_net

EMBEDDING = 32
PER_CLASS = 4  # samples of a class in a batch
TRAIN_CLASSES = TRAIN_DIGITS * ORIENTATIONS
LOSSES = zoo.LOSSES


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
    loss_fn = zoo.make_loss(loss_name, TRAIN_CLASSES, EMBEDDING)
    net = embedding_net(getattr(loss_fn, "embedding_size", EMBEDDING))
    before = _scores(net, x_te, y_te)
    opt = zoo.optimizer(net, loss_fn, lr)

    from tqdm import tqdm

    start = time.perf_counter()
    sampler = MPerClassSampler(y_tr, PER_CLASS, batch_size, len(y_tr), seed=seed)
    bar = tqdm(range(epochs), desc=f"training {loss_name}", unit="epoch")
    for _ in bar:
        for idx in torch.tensor(list(sampler)).view(-1, batch_size):
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
