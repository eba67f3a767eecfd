"""The command line (python -m metricloss_kernels): usage and exit codes, the eval command against evaluate(), bad
input reported in one line."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import metricloss_kernels as mlk
from metricloss_kernels import __main__ as cli


def _run(*argv):
    return subprocess.run([sys.executable, "-m", "metricloss_kernels", *argv], capture_output=True, text=True,
                          timeout=300, check=False)


def _saved(tmp_path, seed=3, n=53, d=8, classes=6):
    """Embeddings in a .npy file and labels in a .pt file: (x, y, x_path, y_path)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)
    np.save(tmp_path / f"x{seed}.npy", x.numpy())
    torch.save(y, tmp_path / f"y{seed}.pt")
    return x, y, str(tmp_path / f"x{seed}.npy"), str(tmp_path / f"y{seed}.pt")


def _printed(out: str):
    """(header, {name: value}) of eval's output."""
    header, *lines = out.strip().splitlines()
    return header, {name: float(value) for name, value in (line.split() for line in lines)}


def _assert_printed(printed: dict, expected: dict):
    assert list(printed) == list(expected)
    for name, value in expected.items():
        assert abs(printed[name] - 100 * value) < 0.006, name


def test_no_command_and_unknown_command():
    none = _run()
    assert none.returncode == 2 and none.stderr.startswith("usage:") and not none.stdout
    unknown = _run("nonsense")
    assert unknown.returncode == 2 and not unknown.stdout
    assert unknown.stderr.splitlines() == [(
        "python -m metricloss_kernels: unknown command 'nonsense' (commands: demo, eval, backends, tournament, bench, "
        "claims; --help for usage)")]


def test_help_and_backends(capsys):
    assert cli.main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage:")
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "chunked" in out and "triton" in out


def test_eval_matches_evaluate(tmp_path, capsys):
    x, y, xp, yp = _saved(tmp_path)
    assert cli.main(["eval", xp, yp, "--ks", "1", "4"]) == 0
    header, printed = _printed(capsys.readouterr().out)
    assert header == "queries [53, 8] float32, leave-one-out (each query searched among the others), metric cosine"
    _assert_printed(printed, mlk.evaluate(x, y, ks=(1, 4)))


def test_eval_include_exclude_max_k(tmp_path, capsys):
    x, y, xp, yp = _saved(tmp_path)
    argv = ["eval", xp, yp, "--include", "NMI", "recall@16", "mean_average_precision_at_r", "range_accuracy",
            "--exclude", "range_accuracy", "--max-k", "20", "--metric", "euclidean"]
    assert cli.main(argv) == 0
    _, printed = _printed(capsys.readouterr().out)
    _assert_printed(printed, mlk.evaluate(x, y, max_k=20, metric="euclidean", include=("nmi", "recall@16", "map@r")))
    assert cli.main(["eval", xp, yp, "--exclude", "nmi", "closest_center_accuracy"]) == 0
    _, printed = _printed(capsys.readouterr().out)
    _assert_printed(printed, mlk.evaluate(x, y, exclude=("nmi", "closest_center_accuracy")))


def test_eval_casts_embeddings_and_squeezes_labels(tmp_path, capsys):
    x, y, _, _ = _saved(tmp_path)
    ref, ref_y, _, _ = _saved(tmp_path, seed=4, n=71)
    np.save(tmp_path / "x64.npy", x.double().numpy())            # float64 queries, [N, 1] labels
    torch.save(y[:, None], tmp_path / "y_column.pt")
    argv = ["eval", str(tmp_path / "x64.npy"), str(tmp_path / "y_column.pt"), "--ks", "1", "8"]
    assert cli.main(argv) == 0                                    # alone: float32
    header, printed = _printed(capsys.readouterr().out)
    assert header.startswith("queries [53, 8] float32, leave-one-out")
    _assert_printed(printed, mlk.evaluate(x, y, ks=(1, 8)))
    # a float32 reference: the float64 queries are searched in float32
    assert cli.main([*argv, "--reference", str(tmp_path / "x4.npy"), str(tmp_path / "y4.pt")]) == 0
    header, printed = _printed(capsys.readouterr().out)
    assert header == "queries [53, 8] float32, 71 references, metric cosine"
    _assert_printed(printed, mlk.evaluate(x, y, ref, ref_y, ks=(1, 8)))
    # a float64 reference: float32 queries are searched in float64
    np.save(tmp_path / "ref64.npy", ref.double().numpy())
    assert cli.main(["eval", str(tmp_path / "x3.npy"), str(tmp_path / "y3.pt"), "--reference",
                     str(tmp_path / "ref64.npy"), str(tmp_path / "y4.pt")]) == 0
    header, printed = _printed(capsys.readouterr().out)
    assert header == "queries [53, 8] float64, 71 references, metric cosine"
    _assert_printed(printed, mlk.evaluate(x.double(), y, ref.double(), ref_y))


@pytest.mark.parametrize("case", ["missing file", "not a tensor", "shape", "metric name", "option"])
def test_eval_bad_input_is_one_line(tmp_path, capsys, case):
    _, y, xp, yp = _saved(tmp_path)
    torch.save({"x": 1}, tmp_path / "dict.pt")
    torch.save(y[:-1], tmp_path / "short.pt")
    argv, expected = {
        "missing file": ([str(tmp_path / "nope.npy"), yp], f"EMBEDDINGS {tmp_path / 'nope.npy'}: cannot read"),
        "not a tensor": ([xp, str(tmp_path / "dict.pt")], f"LABELS {tmp_path / 'dict.pt'}: must hold a single tensor"),
        "shape": ([xp, str(tmp_path / "short.pt")], "labels must have shape [53]"),
        "metric name": ([xp, yp, "--include", "recall"], "include: unknown metric 'recall'"),
        "option": ([xp, yp, "--max-k", "many"], "argument --max-k: invalid int value: 'many'"),
    }[case]
    if case == "option":
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["eval", *argv])
        code = exit_info.value.code
    else:
        code = cli.main(["eval", *argv])
    err = capsys.readouterr().err
    assert code != 0 and len(err.splitlines()) == 1
    assert err.startswith("python -m metricloss_kernels eval: error: ") and expected in err


def test_debug_keeps_the_traceback(tmp_path):
    _, _, xp, _ = _saved(tmp_path)
    quiet = _run("eval", xp, xp)                         # float labels
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    assert quiet.stderr.splitlines() == [("python -m metricloss_kernels eval: error: labels must be an integer "
                                          "tensor, got dtype torch.float32 (--debug for the traceback)")]
    loud = _run("--debug", "eval", xp, xp)
    assert loud.returncode == 1 and "Traceback" in loud.stderr and loud.stderr.rstrip().endswith(
        "TypeError: labels must be an integer tensor, got dtype torch.float32")


def test_progress_bar_is_optional(monkeypatch):
    stages = [["recall@1"], ["nmi"]]
    assert list(cli._progress(stages, True)) == stages
    monkeypatch.setitem(sys.modules, "tqdm", None)       # tqdm not installed: no bar, same stages
    assert cli._progress(stages, True) is stages
