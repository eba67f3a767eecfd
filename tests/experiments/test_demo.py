"""The demo trains on seen digits and must improve retrieval on the unseen ones; the CLI entry points run."""
import subprocess
import sys

import torch

from metricloss_kernels.experiments import demo


def test_split_is_class_disjoint_and_oriented():
    x_tr, y_tr, x_te, y_te = demo.load_digits_split()
    assert x_tr.shape[1] == x_te.shape[1] == 64
    assert set(y_tr.tolist()) == set(range(demo.TRAIN_CLASSES)) and set(y_te.tolist()) == set(range(5))
    assert len(x_tr) == demo.ORIENTATIONS * (len(x_tr) // demo.ORIENTATIONS)
    # orientation 4 is the mirror image of orientation 0
    n = len(x_tr) // demo.ORIENTATIONS
    torch.testing.assert_close(x_tr[4 * n:5 * n].view(-1, 8, 8), x_tr[:n].view(-1, 8, 8).flip(-1))


def test_random_shift_moves_images_by_at_most_one_pixel():
    x = torch.zeros(1, 64)
    x[0, 27] = 1.0  # pixel (3, 3)
    shifted = demo.random_shift(x.repeat(50, 1), torch.Generator().manual_seed(0))
    rows, cols = shifted.nonzero()[:, 1].div(8, rounding_mode="floor"), shifted.nonzero()[:, 1] % 8
    assert shifted.sum() == 50 and rows.sub(3).abs().max() <= 1 and cols.sub(3).abs().max() <= 1
    assert len(set(shifted.nonzero()[:, 1].tolist())) > 1


def test_short_training_improves_unseen_class_retrieval():
    result = demo.run("proxy_anchor", epochs=3, out=lambda *_: None)
    assert result["after"]["map@r"] > result["before"]["map@r"] + 0.1
    assert result["after"]["recall@1"] > result["before"]["recall@1"]


def test_cli_backends_and_usage():
    out = subprocess.run([sys.executable, "-m", "metricloss_kernels", "backends"], capture_output=True, text=True,
                         check=True).stdout
    assert "reference" in out and "chunked" in out and "triton" in out
    bad = subprocess.run([sys.executable, "-m", "metricloss_kernels", "nonsense"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stdout


def test_cli_eval_matches_evaluate(tmp_path):
    import numpy as np

    import metricloss_kernels as mlk
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(50, 8, generator=g), torch.randint(0, 5, (50,), generator=g)
    np.save(tmp_path / "x.npy", x.numpy())
    torch.save(y, tmp_path / "y.pt")
    out = subprocess.run([sys.executable, "-m", "metricloss_kernels", "eval", str(tmp_path / "x.npy"),
                          str(tmp_path / "y.pt"), "--ks", "1", "4"], capture_output=True, text=True, check=True)
    printed = dict(line.split() for line in out.stdout.strip().splitlines())
    expected = mlk.evaluate(x, y, ks=(1, 4))
    assert set(printed) == set(expected)
    for name, value in expected.items():
        assert abs(float(printed[name]) - 100 * value) < 0.006
