"""CPU contention: a loss's training step (forward + backward; SoftTriple, or ProxyAnchor with --loss proxy_anchor) on
the chunked and reference backends, on a quiet machine and under a controlled competing load, interleaved.

The load is one busy-loop process per core (`--load`, default the core count), started once and paused / resumed
with SIGSTOP / SIGCONT around each "loaded" call (microseconds, inside the timed region), so that the four
variants {chunked, reference} x {quiet, loaded} run in the harness's rotating order (metricloss_kernels.harness:
one warm-up round, then every round calls each variant once) and see the same background. The summary is, per
backend, the median seconds per step quiet and loaded and their ratio (the slowdown); the JSON keeps every round
and the machine facts. Other processes on the machine add load to both columns: read the ratios, not the times.

    # N=256, C=2e4, K=10:
    python benchmarks/bench_contention.py --threads 2 --output benchmarks/results/contention_cpu.json
    python benchmarks/bench_contention.py --loss proxy_anchor --output ...  # N=256, C=1e5, K=1
    python benchmarks/bench_contention.py --classes 500 --rounds 2 --output /tmp/contention.json       # a quick check
"""
import argparse
import multiprocessing
import os
import signal
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from metricloss_kernels import functional as F  # noqa: E402
from metricloss_kernels.experiments import harness  # noqa: E402

BACKENDS = ("chunked", "reference")


def _busy() -> None:
    while True:
        pass


class Load:
    """`count` busy-loop processes, created paused; `resume()` / `pause()` switch them on and off."""

    def __init__(self, count: int):
        ctx = multiprocessing.get_context("spawn")
        self.procs = [ctx.Process(target=_busy, daemon=True) for _ in range(count)]
        for p in self.procs:
            p.start()
        self.pause()

    def _signal(self, sig) -> None:
        for p in self.procs:
            os.kill(p.pid, sig)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def close(self) -> None:
        self._signal(signal.SIGCONT)
        for p in self.procs:
            p.terminate()
            p.join()


LOSSES = {"soft_triple": (20000, 10), "proxy_anchor": (100000, 1)}  # default classes, centers per class


def step(loss_name, backend, x, labels, proxies, k):
    """One loss forward + backward (the gradients of the embeddings and proxies)."""
    def run():
        if loss_name == "soft_triple":
            loss = F.soft_triple_loss(x, labels, proxies, centers_per_class=k, backend=backend)
        else:
            loss = F.proxy_anchor_loss(x, labels, proxies, backend=backend)
        torch.autograd.grad(loss, (x, proxies))
    return run


def loaded(fn, load):
    def run():
        load.resume()
        try:
            fn()
        finally:
            load.pause()
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", choices=sorted(LOSSES), default="soft_triple")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=None, help="default: 2e4 (SoftTriple), 1e5 (ProxyAnchor)")
    parser.add_argument("--centers", type=int, default=None, help="SoftTriple's K (default 10)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--load", type=int, default=os.cpu_count(), help="busy-loop processes (default: one a core)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    classes, centers = LOSSES[args.loss]
    args.classes = args.classes or classes
    args.centers = centers if args.loss == "proxy_anchor" else args.centers or centers

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.dim, generator=g).requires_grad_()
    labels = torch.randint(0, args.classes, (args.batch,), generator=g)
    proxies = torch.randn(args.classes * args.centers, args.dim, generator=g).requires_grad_()
    load = Load(args.load)
    try:
        runs = {}
        for backend in BACKENDS:
            fn = step(args.loss, backend, x, labels, proxies, args.centers)
            runs[f"{backend}/quiet"], runs[f"{backend}/loaded"] = fn, loaded(fn, load)
        times = harness.time_interleaved(runs, args.rounds)
    finally:
        load.close()

    summary = {}
    for backend in BACKENDS:
        quiet, busy = (statistics.median(times[f"{backend}/{phase}"]) for phase in ("quiet", "loaded"))
        summary[backend] = {"quiet_s": quiet, "loaded_s": busy, "slowdown": busy / quiet}
    result = {"machine": harness.machine_info("cpu"), "args": vars(args), "seconds": times, "summary": summary}
    harness.write_json(args.output, result)
    for backend, s in summary.items():
        print(f"{backend:>9}: quiet {s['quiet_s']:.3f} s, loaded {s['loaded_s']:.3f} s, slowdown {s['slowdown']:.2f}x")


if __name__ == "__main__":
    main()
