"""Command line: `python -m metricloss_kernels {demo, eval, backends, tournament, bench, claims}`. The applications
behind demo, tournament, bench and claims live in `metricloss_kernels.experiments`."""
import argparse
import importlib
import sys

APPLICATIONS = ("demo", "tournament", "bench", "claims")


def _load(path: str):
    """A tensor from a .npy file or a torch.save'd tensor (.pt)."""
    import numpy as np
    import torch

    if path.endswith(".npy"):
        return torch.from_numpy(np.load(path))
    value = torch.load(path, weights_only=True)
    if not torch.is_tensor(value):
        raise ValueError(f"{path} must hold a single tensor, got {type(value).__name__}")
    return value


def evaluate_files(argv):
    """Prints every metric of mlk.evaluate (x100) for embeddings and labels stored in files."""
    from .metrics import evaluate

    parser = argparse.ArgumentParser(prog="python -m metricloss_kernels eval",
                                     description="Retrieval metrics of saved embeddings (.npy or .pt tensors).")
    parser.add_argument("embeddings", help="[Q, D] float tensor")
    parser.add_argument("labels", help="[Q] integer tensor")
    parser.add_argument("--reference", nargs=2, metavar=("EMBEDDINGS", "LABELS"),
                        help="search this set (default: the queries themselves, each query's own row excluded)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--metric", default="cosine", choices=("cosine", "dot", "euclidean"))
    args = parser.parse_args(argv)
    reference = [_load(p) for p in args.reference] if args.reference else [None, None]
    results = evaluate(_load(args.embeddings), _load(args.labels), *reference, ks=tuple(args.ks),
                       metric=args.metric)
    for name, value in results.items():
        print(f"{name:26s}{100 * value:8.2f}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("--help", [])
    if command in APPLICATIONS:
        module = importlib.import_module(f".experiments.{command}", __package__)
        return module.main(rest)
    if command == "eval":
        return evaluate_files(rest)
    if command == "backends":
        from . import backends
        for name, (ok, why) in backends().items():
            print(f"{name:10} {'yes' if ok else 'no ':3}  {why}")
        return 0
    print("usage: python -m metricloss_kernels {demo [--loss NAME] [--epochs N], "
          "eval EMBEDDINGS LABELS [--reference E L] [--ks K ...], backends, "
          "tournament [--quick] [--out DIR], bench [--quick] [--out DIR], "
          "claims {exp_triplet,mpa,polytope,all} [--quick] [--out DIR]}  (COMMAND --help for the options)")
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
