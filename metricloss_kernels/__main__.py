"""Command line: `python -m metricloss_kernels [--debug] {demo, eval, backends, tournament, bench, claims}`. The
applications behind demo, tournament, bench and claims live in `metricloss_kernels.experiments`.

A bad input (file, shape, option) ends with one line on stderr naming it and a non-zero exit status; `--debug`
(anywhere on the line) keeps the traceback instead."""
import argparse
import importlib
import sys

APPLICATIONS = ("demo", "tournament", "bench", "claims")
COMMANDS = ("demo", "eval", "backends", "tournament", "bench", "claims")
PROG = "python -m metricloss_kernels"
USAGE = (f"usage: {PROG} [--debug] COMMAND ...  (COMMAND --help for its options)\n"
         "  demo [--loss NAME] [--epochs N]          train on digits, retrieval before/after\n"
         "  eval EMBEDDINGS LABELS [--reference E L] [--ks K ...] [--include M ...] [--exclude M ...] [--max-k N]\n"
         "                                           retrieval and clustering metrics of saved embeddings\n"
         "  backends                                 which backends run here, and why not\n"
         "  tournament [--quick] [--out DIR]         the fixed-validation comparison of the losses\n"
         "  bench [--quick] [--out DIR]              the benchmark grid\n"
         "  claims {exp_triplet,mpa,polytope,all}    the papers' claims in miniature")


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad option reported in one line (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _load(path: str, name: str):
    """A tensor from a .npy file or a torch.save'd tensor (.pt); a ValueError naming ``name`` and the file if not."""
    import numpy as np
    import torch

    try:
        value = torch.from_numpy(np.load(path)) if path.endswith(".npy") else torch.load(path, weights_only=True)
    except Exception as error:  # whatever the reader raises: missing file, not a tensor file, a pickle refused
        raise ValueError(f"{name} {path}: cannot read a tensor ({error})") from error
    if not torch.is_tensor(value):
        raise ValueError(f"{name} {path}: must hold a single tensor, got {type(value).__name__}")
    return value


def _inputs(args):
    """(embeddings, labels, reference, reference_labels) from the files: the embeddings in float32, or in the
    reference's dtype when that is float32 or float64 (evaluate needs one dtype); [N, 1] labels squeezed to [N]."""
    import torch

    def labels(path, name):
        y = _load(path, name)
        return y[:, 0] if y.dim() == 2 and y.shape[1] == 1 else y

    x, y = _load(args.embeddings, "EMBEDDINGS"), labels(args.labels, "LABELS")
    ref, ref_y = None, None
    if args.reference:
        ref, ref_y = _load(args.reference[0], "--reference EMBEDDINGS"), labels(args.reference[1], "--reference LABELS")
    dtype = ref.dtype if ref is not None and ref.dtype in (torch.float32, torch.float64) else torch.float32
    return x.to(dtype), y, None if ref is None else ref.to(dtype), ref_y


def _progress(stages, enabled: bool):
    """stages, with a progress bar on a terminal when tqdm (the 'apps' extra) is installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return stages
    return tqdm(stages, desc="eval", unit="stage", disable=None if enabled else True, leave=False, file=sys.stderr)


def evaluate_files(argv):
    """Prints a header line and the selected metrics of mlk.evaluate (x100) for embeddings and labels in files."""
    from .metrics import _UNRANKED, evaluate, select_metrics

    parser = _Parser(prog=f"{PROG} eval", description="Retrieval and clustering metrics of saved embeddings (.npy "
                     "or torch.save'd .pt tensors).")
    parser.add_argument("embeddings", help="[Q, D] tensor (cast to float32, or to the reference's float dtype)")
    parser.add_argument("labels", help="[Q] (or [Q, 1]) integer tensor")
    parser.add_argument("--reference", nargs=2, metavar=("EMBEDDINGS", "LABELS"),
                        help="search this set (default: the queries themselves, each query's own row excluded)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="k of the per-k metrics")
    parser.add_argument("--metric", default="cosine", choices=("cosine", "dot", "euclidean"))
    parser.add_argument("--include", nargs="+", metavar="METRIC",
                        help="only these metrics (evaluate's names, e.g. recall@16 map@r nmi, or PML's)")
    parser.add_argument("--exclude", nargs="+", default=(), metavar="METRIC", help="skip these (e.g. nmi)")
    parser.add_argument("--max-k", type=int, default=1024,
                        help="most neighbours fetched per query (map@r and r_precision are lower bounds above it)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    x, y, ref, ref_y = _inputs(args)
    names = select_metrics(tuple(args.ks), args.include, args.exclude)
    searched = (f"{len(ref)} references" if ref is not None else
                "leave-one-out (each query searched among the others)")
    print(f"queries {list(x.shape)} {str(x.dtype).removeprefix('torch.')}, {searched}, metric {args.metric}")
    # the long parts one at a time, for the progress bar: the neighbour search, the k-means of nmi, the centroids
    stages = [[n for n in names if n not in _UNRANKED], [n for n in names if n == "nmi"],
              [n for n in names if n in _UNRANKED and n != "nmi"]]
    results = {}
    for stage in _progress([s for s in stages if s], not args.no_progress):
        results.update(evaluate(x, y, ref, ref_y, ks=tuple(args.ks), metric=args.metric, max_k=args.max_k,
                                include=stage))
    for name in names:
        print(f"{name:26s}{100 * results[name]:8.2f}")
    return 0


def _backends(argv):
    from . import backends

    _Parser(prog=f"{PROG} backends", description="Which backends run here, and why not.").parse_args(argv)
    for name, (ok, why) in backends().items():
        print(f"{name:10} {'yes' if ok else 'no ':3}  {why}")
    return 0


def _run(command: str, argv) -> int:
    if command in APPLICATIONS:
        return importlib.import_module(f".experiments.{command}", __package__).main(argv)
    return {"eval": evaluate_files, "backends": _backends}[command](argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command in ("-h", "--help"):
        print(USAGE)
        return 0
    if command not in COMMANDS:
        print(f"{PROG}: unknown command {command!r} (commands: {', '.join(COMMANDS)}; --help for usage)",
              file=sys.stderr)
        return 2
    try:
        return _run(command, rest)
    except Exception as error:  # bad input: one line naming it; --debug keeps the traceback
        if debug:
            raise
        print(f"{PROG} {command}: error: {str(error) or type(error).__name__} (--debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
