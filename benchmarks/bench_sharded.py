"""Class-sharded vs replicated proxies: per-rank peak memory, bytes communicated and step time of one training step
(forward + backward of ArcFace, chunked backend, fp32) at W = 1 and W = 2 ranks (spawned, gloo on 127.0.0.1).

Implementations, per rank: "single" (W = 1: every class, the whole batch), "sharded" (`process_group=`: C / W
classes, the batch gathered inside the loss), "replicated" (every class on every rank: the embeddings all-gathered
through `distributed.gather_rows`, the loss on the whole batch, the proxies' gradient all-reduced as DDP would) and
"pml_replicated" (pytorch-metric-learning's DistributedLossWrapper around its ArcFaceLoss, the gradient of its
weights all-reduced; when installed).

Memory: "peak_step_bytes" = the harness's torch-allocation peak of one step beyond what is live before it (the
proxies' gradient included), "weights_bytes" = the proxies this rank holds; the maximum over the ranks. Bytes: every
collective of a step, from its tensors' shapes (`distributed.CommunicationLog`; for PML the all-gathers its wrapper
makes and the gradient's all-reduce), as payload (the bytes handed to the collectives) and as the bytes a rank
sends with ring algorithms. Step times only with --rounds > 0 (interleaved rounds,
metricloss_kernels/experiments/harness.py):

    python benchmarks/bench_sharded.py --out benchmarks/results/sharded_cpu.json              # memory and bytes
    python benchmarks/bench_sharded.py --rounds 5 --out sharded_cpu_timed.json               # + step times
    python benchmarks/bench_sharded.py --classes 1000 --batch 16 --dim 32 --out /tmp/s.json   # a quick check
"""
import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import metricloss_kernels as mlk  # noqa: E402
from metricloss_kernels import distributed  # noqa: E402
from metricloss_kernels.experiments import harness  # noqa: E402


def _pml():
    try:
        from pytorch_metric_learning import losses
        from pytorch_metric_learning.utils.distributed import DistributedLossWrapper
    except ImportError:
        return None
    return losses.ArcFaceLoss, DistributedLossWrapper


def make_step(impl, classes, dim, batch, group):
    """(step(): one forward + backward, reset(): the gradients dropped, the proxies, outside(): notes in the active
    CommunicationLog the collectives the step makes that it cannot see, PML's)."""
    world = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, dim, generator=g, requires_grad=True)
    y = torch.randint(0, classes, (batch,), generator=g)
    outside = lambda: None  # noqa: E731
    if impl in ("single", "sharded"):
        loss = mlk.ArcFaceLoss(classes, dim, backend="chunked", process_group=group if impl == "sharded" else None)
        run = lambda: loss(x, y)  # noqa: E731
        params = [loss.proxies]
    elif impl == "replicated":
        loss = mlk.ArcFaceLoss(classes, dim, backend="chunked")
        params = [loss.proxies]

        def run():
            ys = torch.empty(world * batch, dtype=y.dtype)
            dist.all_gather_into_tensor(ys, y, group=group)
            distributed.note_collective("all_gather", y, group)
            return loss(distributed.gather_rows(x, group, float(world)), ys)
    else:
        arcface, wrapper = _pml()
        inner = arcface(classes, dim)
        loss = wrapper(inner)
        params = [inner.W]
        run = lambda: loss(x, y)  # noqa: E731

        def outside():  # PML's gather of the embeddings and the labels
            distributed.note_collective("all_gather", x, group)
            distributed.note_collective("all_gather", y, group)

    def step():
        run().backward()
        if impl in ("replicated", "pml_replicated"):  # DDP's all-reduce of the replicated proxies' gradient
            for p in params:
                dist.all_reduce(p.grad, group=group)
                distributed.note_collective("all_reduce", p.grad, group)

    def reset():
        x.grad = None
        for p in params:
            p.grad = None

    return step, reset, params, outside


def measure(rank, world, group, args, impls):
    """Every implementation of this world (its gloo group, None for one process) at every C: the rows, maxima over
    the ranks."""
    rows = []
    for classes in args.classes:
        steps = {impl: make_step(impl, classes, args.dim, args.batch, group) for impl in impls}
        for impl, (step, reset, params, outside) in steps.items():
            reset()
            step()  # warm-up (and the allocations of a first call)
            reset()
            peak = harness.peak_torch_bytes(step)
            reset()
            with distributed.CommunicationLog() as log:
                step()
                outside()
            weights = sum(p.numel() * p.element_size() for p in params)
            peak, weights = harness.max_over_ranks([peak, weights], group)
            rows.append(dict(impl=impl, world=world, classes=classes, batch_per_rank=args.batch, dim=args.dim,
                             peak_step_bytes=int(peak), weights_bytes=int(weights),
                             payload_bytes=log.payload_bytes(), sent_bytes=log.sent_bytes(),
                             collectives=[[op, list(shape), str(dtype), w] for op, shape, dtype, w in log.records]))
        if args.rounds:
            times = harness.time_interleaved({impl: s[0] for impl, s in steps.items()}, args.rounds)
            for row in rows[-len(steps):]:
                row["median_step_s"] = harness.max_over_ranks([statistics.median(times[row["impl"]])], group)[0]
        del steps
    return rows


def table(rows):
    mib = 2 ** 20
    lines = ["| impl | W | C | peak step MiB | proxies MiB | payload KiB | sent KiB | median step s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        step_s = f"{r['median_step_s']:.3f}" if "median_step_s" in r else "-"
        lines.append(f"| {r['impl']} | {r['world']} | {r['classes']} | {r['peak_step_bytes'] / mib:.1f} | "
                     f"{r['weights_bytes'] / mib:.1f} | {r['payload_bytes'] / 1024:.1f} | "
                     f"{r['sent_bytes'] / 1024:.1f} | {step_s} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", nargs="+", type=int, default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64, help="rows per rank (default: %(default)s)")
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds per world (default 0: no timing)")
    parser.add_argument("--no-pml", action="store_true", help="leave out pytorch-metric-learning's wrapper")
    parser.add_argument("--out", required=True, help="results JSON")
    args = parser.parse_args(argv)

    rows = []
    for world in args.worlds:
        impls = ["single"] if world == 1 else ["sharded", "replicated"] + (
            [] if args.no_pml or _pml() is None else ["pml_replicated"])
        rows += harness.run_world(measure, world, args.threads, args, impls)
        print(table(rows), flush=True)
    info = harness.machine_info("cpu")
    info["torch_threads"] = args.threads
    harness.write_json(args.out, {"machine": info, "arguments": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
