"""Class-sharded training: a DistributedDataParallel backbone under a loss whose proxies are split over the ranks.

    torchrun --nproc_per_node=2 examples/train_sharded.py                  # CPU, gloo
    torchrun --nproc_per_node=8 examples/train_sharded.py --classes 1000000  # GPUs, NCCL (one per rank)

Each rank holds the proxies of its classes only (`loss.class_range`) and a slice of every batch; the loss returns,
on every rank, the value of the whole batch. The backbone's gradient is the single-process one after DDP's average
(the loss gives each rank W x its rows' gradient), and each rank's proxies get exactly their rows of it, so one
optimizer over both is plain data-parallel training. The data are synthetic: Gaussian clusters, one per class,
seen through a fixed random linear map. At the end the proxies are gathered into an unsharded state_dict on rank 0
(`distributed.gather_state_dict`), which `distributed.shard_state_dict` re-shards for any number of ranks.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import metricloss_kernels as mlk  # noqa: E402
from metricloss_kernels import distributed  # noqa: E402

LOSSES = {"arcface": mlk.ArcFaceLoss, "cosface": mlk.CosFaceLoss, "proxy_nca": mlk.ProxyNCALoss,
          "proxy_anchor": mlk.ProxyAnchorLoss, "soft_triple": mlk.SoftTripleLoss}


def synthetic_batch(step, batch, classes, inputs, seed=0):
    """The whole batch of one step (every rank draws the same and keeps its slice): labels uniform over the classes,
    inputs = the class's centre (a hash of its index) + noise, through a fixed random linear map."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    labels = torch.randint(0, classes, (batch,), generator=g)
    centres = torch.stack([torch.randn(inputs, generator=torch.Generator().manual_seed(seed + int(c) + 1))
                           for c in labels])
    return centres + 0.3 * torch.randn(batch, inputs, generator=g), labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loss", choices=sorted(LOSSES), default="arcface")
    parser.add_argument("--classes", type=int, default=1001)
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--sample-rate", type=float, default=1.0, help="PartialFC class sampling (row-wise losses)")
    parser.add_argument("--checkpoint", default=None, help="where rank 0 saves the gathered state_dict")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same backbone on every rank (DDP also broadcasts rank 0's)

    inputs = 32
    backbone = torch.nn.Sequential(torch.nn.Linear(inputs, 128), torch.nn.ReLU(),
                                   torch.nn.Linear(128, args.dim)).to(device)
    model = torch.nn.parallel.DistributedDataParallel(backbone, device_ids=[device.index] if cuda else None)
    extra = {} if args.loss in ("proxy_anchor",) else {"sample_rate": args.sample_rate}
    if args.loss == "soft_triple":
        extra["centers_per_class"] = 2
    loss_fn = LOSSES[args.loss](args.classes, args.dim, process_group=dist.group.WORLD, **extra).to(device)
    optimizer = torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=args.lr, momentum=0.9)
    if rank == 0:
        print(f"{world} ranks, {args.loss}, {args.classes} classes; rank 0 holds classes {loss_fn.class_range} "
              f"({tuple(loss_fn.proxies.shape)} proxies), batch {args.batch} per rank", flush=True)

    for step in range(args.steps):
        x, y = synthetic_batch(step, args.batch * world, args.classes, inputs)
        rows = slice(rank * args.batch, (rank + 1) * args.batch)
        loss = loss_fn(model(x[rows].to(device)), y[rows].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)

    state = distributed.gather_state_dict(loss_fn)
    if rank == 0:
        print(f"gathered proxies {tuple(state['proxies'].shape)}", flush=True)
        if args.checkpoint:
            torch.save({"backbone": backbone.state_dict(), "loss": state}, args.checkpoint)
            print(f"saved {args.checkpoint}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
