"""The demo trains on seen digits and must improve retrieval on the unseen ones (the CLI: tests/test_cli.py)."""
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
