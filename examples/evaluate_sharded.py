"""Retrieval evaluation of a gallery sharded over the ranks: every rank holds its own queries and its own slice of
the gallery (as after a DDP run, each rank having embedded its part of the data), and no rank gathers them.

    torchrun --nproc_per_node=2 examples/evaluate_sharded.py                     # CPU, gloo
    torchrun --nproc_per_node=4 examples/evaluate_sharded.py --gallery 1000000   # a larger gallery
    torchrun --nproc_per_node=2 examples/evaluate_sharded.py --check             # + one process on the union

`mlk.knn(..., process_group=)` returns each rank's queries' neighbours in the union of the shards (global indices:
the ranks' rows concatenated in rank order); `mlk.evaluate(..., process_group=)` returns the metrics of the union on
every rank. The data are synthetic: Gaussian clusters, one per class; the shards have unequal sizes on purpose.
With --check, rank 0 also gathers everything (small sizes only) and compares with one process.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import metricloss_kernels as mlk  # noqa: E402


def shard(rank, world, rows, classes, dim, seed):
    """This rank's embeddings [n_r, D] and labels [n_r]: n_r differs between ranks (rank r holds a share
    proportional to r + 1); the class centres are the same on every rank."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    share = [rows * (r + 1) // (world * (world + 1) // 2) for r in range(world)]
    g = torch.Generator().manual_seed(seed * 1_000 + rank)
    labels = torch.randint(0, classes, (share[rank],), generator=g)
    return centres[labels] + 1.5 * torch.randn(share[rank], dim, generator=g), labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gallery", type=int, default=100_000, help="reference rows over all ranks")
    parser.add_argument("--queries", type=int, default=2_000, help="query rows over all ranks")
    parser.add_argument("--classes", type=int, default=1_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--check", action="store_true", help="compare with one process on the union (rank 0)")
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")
    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    queries, query_labels = shard(rank, world, args.queries, args.classes, args.dim, seed=1)
    gallery, gallery_labels = shard(rank, world, args.gallery, args.classes, args.dim, seed=100)

    _, indices = mlk.knn(queries, gallery, k=5, process_group=group)  # global indices into the union
    metrics = mlk.evaluate(queries, query_labels, gallery, gallery_labels, ks=(1, 5, 10), process_group=group)
    print(f"rank {rank}: {len(queries)} queries, {len(gallery)} gallery rows; first neighbours "
          f"{indices[0].tolist() if len(indices) else []}", flush=True)
    if rank == 0:
        print("metrics of the union:", {name: round(value, 4) for name, value in metrics.items()}, flush=True)

    if args.check:  # everything gathered on every rank: for a small check only
        parts = [[None] * world for _ in range(4)]
        for out, mine in zip(parts, (queries, query_labels, gallery, gallery_labels)):
            dist.all_gather_object(out, mine, group=group)
        union = [torch.cat(p) for p in parts]
        if rank == 0:
            single = mlk.evaluate(*union, ks=(1, 5, 10))
            worst = max(abs(single[name] - value) for name, value in metrics.items())
            print(f"one process on the union: largest difference {worst:.2e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
