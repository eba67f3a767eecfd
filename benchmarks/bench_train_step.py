"""A training step, eager vs torch.compile: a small MLP embedding network + a loss module of the library, forward,
backward and an SGD step, on CPU; steps per second.

What is compiled: `torch.compile(Step(net, loss), fullgraph=True)`, Step.forward = loss(net(x), labels), so that one
graph holds the network, the loss and (through AOTAutograd) their backward; `.backward()` and the optimiser step run
as usual. Eager and compiled copies start from the same weights and see the same batches; the first compiled step
(the compilation) is timed alone as `compile_s`; then rounds of `--steps` steps of each, in a rotating order after a
warm-up round (metricloss_kernels/experiments/harness.py, so both see the same machine load). The JSON keeps every
round; the summary is the median over rounds.

    python benchmarks/bench_train_step.py --threads 2                      # default grid -> results/train_step_cpu.json
    python benchmarks/bench_train_step.py --cases proxy_anchor-chunked --steps 5 --rounds 2 --output /tmp/x.json
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import metricloss_kernels as mlk  # noqa: E402
from metricloss_kernels.experiments import harness  # noqa: E402

# case -> (module factory (num_classes, embedding_size, backend), backend)
CASES = {
    "proxy_anchor-reference": (lambda c, d, b: mlk.ProxyAnchorLoss(c, d, backend=b), "reference"),
    "proxy_anchor-chunked": (lambda c, d, b: mlk.ProxyAnchorLoss(c, d, backend=b), "chunked"),
    "soft_triple-reference": (lambda c, d, b: mlk.SoftTripleLoss(c, d, backend=b), "reference"),
    "soft_triple-chunked": (lambda c, d, b: mlk.SoftTripleLoss(c, d, backend=b), "chunked"),
    "arcface-chunked": (lambda c, d, b: mlk.ArcFaceLoss(c, d, backend=b), "chunked"),
    "multi_similarity": (lambda c, d, b: mlk.MultiSimilarityLoss(), "reference"),
    "triplet-semi-hard": (lambda c, d, b: mlk.TripletMarginLoss(mining="semi-hard"), "reference"),
}


class Step(torch.nn.Module):
    """loss(net(x), labels): what one training step differentiates."""

    def __init__(self, net, loss):
        super().__init__()
        self.net, self.loss = net, loss

    def forward(self, x, labels):
        return self.loss(self.net(x), labels)


def build(case, args):
    factory, backend = CASES[case]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(args.input_dim, args.hidden), torch.nn.ReLU(),
                              torch.nn.Linear(args.hidden, args.hidden), torch.nn.ReLU(),
                              torch.nn.Linear(args.hidden, args.embedding_size))
    return Step(net, factory(args.classes, args.embedding_size, backend))


def batches(args, count, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(args.batch, args.input_dim, generator=g),
             torch.randint(0, args.classes, (args.batch,), generator=g)) for _ in range(count)]


def train(model, optimiser, data):
    for x, labels in data:
        optimiser.zero_grad(set_to_none=True)
        model(x, labels).backward()
        optimiser.step()


def run_case(case, args):
    torch._dynamo.reset()  # each case compiles from scratch, without the previous cases' guards
    eager = build(case, args)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)
    optimisers = {"eager": torch.optim.SGD(eager.parameters(), lr=1e-3),
                  "compiled": torch.optim.SGD(compiled_module.parameters(), lr=1e-3)}
    models = {"eager": eager, "compiled": compiled}
    t0 = time.perf_counter()
    train(compiled, optimisers["compiled"], batches(args, 1, seed=1))  # compiles the forward and backward graphs
    compile_s = time.perf_counter() - t0
    data = batches(args, args.steps, seed=2)
    seconds = harness.time_interleaved({name: lambda name=name: train(models[name], optimisers[name], data)
                                        for name in models}, args.rounds)
    rates = {name: [args.steps / t for t in ts] for name, ts in seconds.items()}
    # Same weights, same batches: the two copies must still agree (a compiled step that is fast but wrong is not).
    x, labels = data[0]
    with torch.no_grad():
        diff = (eager(x, labels) - compiled(x, labels)).abs().item()
    return {"case": case, "compile_s": compile_s, "steps_per_s": rates,
            "median_steps_per_s": {name: statistics.median(r) for name, r in rates.items()},
            "speedup_median": statistics.median(c / e for c, e in zip(rates["compiled"], rates["eager"])),
            "loss_difference_after_training": diff}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="*", choices=sorted(CASES), help="default: all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--input-dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--embedding-size", type=int, default=128)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50, help="steps per round and model")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "train_step_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for case in args.cases or list(CASES):
        load = harness.load_average()
        row = run_case(case, args)
        row["loadavg_1min"] = [load, harness.load_average()]
        results.append(row)
        med = row["median_steps_per_s"]
        print(f"{case:24s} eager {med['eager']:7.1f} steps/s  compiled {med['compiled']:7.1f} steps/s  "
              f"(x{row['speedup_median']:.2f}, compile {row['compile_s']:.1f} s)", flush=True)
    out = {
        "benchmark": "training step (MLP + loss, forward + backward + SGD), eager vs torch.compile(fullgraph=True)",
        **harness.machine_info("cpu"),
        "config": {k: v for k, v in vars(args).items() if k not in ("cases", "output")},
        "notes": "steps_per_s: one value per round (eager and compiled interleaved); medians over rounds; "
                 "compile_s: the first compiled step, compilation included; loadavg_1min before/after the case.",
        "results": results,
    }
    harness.write_json(args.output, out)


if __name__ == "__main__":
    main()
