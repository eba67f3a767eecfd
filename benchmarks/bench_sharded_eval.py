"""Sharded retrieval evaluation: per-rank peak memory and bytes communicated by `mlk.knn(..., process_group=)` at
W = 1, 2, 4 ranks (spawned, gloo on 127.0.0.1) against the single-process search of the same union.

Every world searches the same union (rows drawn in fixed chunks, so the data do not depend on W): Q queries and R
reference rows, fp32, D = 128, cosine, k = 10, split evenly over the ranks. Per rank, the maximum over the ranks:
"shard_bytes" = the reference rows it holds, "peak_bytes" = the harness's torch-allocation peak of the search beyond
what is live before it, "payload_bytes" / "sent_bytes" = every collective of the search from its tensors' shapes
(`distributed.CommunicationLog`: the bytes handed to the collectives, and the bytes a rank sends with ring
algorithms). Memory and bytes are deterministic; no time is taken (a shared machine measures none):

    python benchmarks/bench_sharded_eval.py --out benchmarks/results/sharded_eval_cpu.json
    python benchmarks/bench_sharded_eval.py --references 10000 --queries 256 --out /tmp/e.json   # a quick check
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import metricloss_kernels as mlk  # noqa: E402
from metricloss_kernels import distributed  # noqa: E402
from metricloss_kernels.experiments import harness  # noqa: E402

CHUNK = 10_000  # rows drawn per generator seed


def rows(start, stop, dim, seed):
    """Rows [start, stop) of a fixed random set (drawn CHUNK rows per seed, so any split gives the same rows)."""
    first = start // CHUNK
    parts = [torch.randn(CHUNK, dim, generator=torch.Generator().manual_seed(seed * 100_003 + c))
             for c in range(first, (stop + CHUNK - 1) // CHUNK)]
    return torch.cat(parts)[start - first * CHUNK:stop - first * CHUNK] if parts else torch.empty(0, dim)


def search(rank, world, group, references, args):
    """This rank's row: the peak and the collectives of one sharded search of its queries in its shard."""
    def share(n):
        return n * rank // world, n * (rank + 1) // world

    queries = rows(*share(args.queries), args.dim, seed=1)
    shard = rows(*share(references), args.dim, seed=2)
    with distributed.CommunicationLog() as log:
        peak = harness.peak_torch_bytes(lambda: mlk.knn(queries, shard, args.k, process_group=group))
    return {"world": world, "references": references, "queries": args.queries, "dim": args.dim, "k": args.k,
            "dtype": "float32", "metric": "cosine", "peak_bytes": peak,
            "shard_bytes": shard.numel() * shard.element_size(), "union_bytes": references * args.dim * 4,
            "payload_bytes": log.payload_bytes(), "sent_bytes": log.sent_bytes(),
            "collectives": [[op, list(shape), str(dtype), w] for op, shape, dtype, w in log.records]}


def measure(rank, world, group, args):
    """The search at every reference count in this world (its gloo group, None for one process): the rows, maxima
    over the ranks."""
    out = []
    for references in args.references:
        row = search(rank, world, group, references, args)
        peak, shard = harness.max_over_ranks([row["peak_bytes"], row["shard_bytes"]], group)
        row["peak_bytes"], row["shard_bytes"] = int(peak), int(shard)
        out.append(row)
    return out


def table(results):
    mib = 2 ** 20
    lines = ["| W | R | shard MiB | peak MiB | payload KiB | sent KiB | sent B per query |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['world']} | {r['references']} | {r['shard_bytes'] / mib:.1f} | "
                     f"{r['peak_bytes'] / mib:.1f} | {r['payload_bytes'] / 1024:.1f} | {r['sent_bytes'] / 1024:.1f} | "
                     f"{r['sent_bytes'] / (r['queries'] / r['world']):.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--references", nargs="+", type=int, default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1024, help="queries over all ranks (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default: %(default)s)")
    parser.add_argument("--out", required=True, help="results JSON")
    args = parser.parse_args(argv)

    results = []
    for world in args.worlds:
        results += harness.run_world(measure, world, args.threads, args)
        print(table(results), flush=True)
    info = harness.machine_info("cpu")
    info["torch_threads"] = args.threads
    harness.write_json(args.out, {"machine": info, "arguments": vars(args), "rows": results})


if __name__ == "__main__":
    main()
