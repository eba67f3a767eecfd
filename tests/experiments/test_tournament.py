"""The tournament (metricloss_kernels/experiments/tournament.py, training.py, tournament_report.py) and its datasets:
ranking and summary math on hand-made tables, class-disjoint splits, the fairness of the training protocol, and
the command on a tiny configuration."""
import csv
import json
import math
import sys

import pytest
import torch

from metricloss_kernels.experiments import _plots, datasets, tournament, tournament_report, training, zoo


def tiny_task(name="tiny", seed_test=1):
    """12 training classes (10 train, 2 validation) and 6 test classes of 2 modes x 8 samples."""
    x_tr, y_tr, x_val, y_val = datasets._train_val(*datasets.multi_centre(12, modes=2, per_mode=8, seed=0))
    x_te, y_te = datasets.multi_centre(6, modes=2, per_mode=8, seed=seed_test)
    return datasets.Task(name, x_tr, y_tr, x_val, y_val, x_te, y_te, lambda d: datasets.mlp_net(d, hidden=16),
                         datasets._jitter)


# ------------------------------------------------------------------------------------------- ranking / summary
def test_rank_orders_ties_share_their_mean_rank_and_nan_is_last():
    ranks = tournament.rank({"a": 0.9, "b": 0.8, "c": 0.9, "d": math.nan, "e": 0.1})
    assert ranks == {"a": 1.5, "c": 1.5, "b": 3.0, "e": 4.0, "d": 5.0}
    assert tournament.rank({"x": 0.5, "y": 0.5, "z": 0.5}) == {"x": 2.0, "y": 2.0, "z": 2.0}


def test_summary_is_the_thesis_total_average_and_std_of_ranks():
    rankings = [{"a": 1, "b": 2, "c": 3}, {"a": 2, "b": 1, "c": 3}, {"a": 1, "b": 3, "c": 2}]
    metrics = [{loss: {"recall@1": r / 10, "map@r": 0.5, "ndcg@10": 0.25} for loss, r in ranks.items()}
               for ranks in rankings]
    rows = tournament.summarize(rankings, metrics)
    assert [row["loss"] for row in rows] == ["a", "b", "c"]  # totals 4, 6, 8
    a, b, c = rows
    assert (a["total"], b["total"], c["total"]) == (4, 6, 8)
    assert a["average"] == pytest.approx(4 / 3) and c["average"] == pytest.approx(8 / 3)
    assert a["std"] == pytest.approx(math.sqrt(((1 - 4 / 3) ** 2 * 2 + (2 - 4 / 3) ** 2) / 2))  # sample std
    assert b["recall@1_mean"] == pytest.approx(0.2) and b["recall@1_std"] == pytest.approx(0.1)
    assert a["map@r_std"] == 0 and a["experiments"] == 3
    table = tournament_report.summary_table(rows).splitlines()
    assert table[0].startswith("| loss | total ranking | average ranking | std | R@1")
    assert table[2] == "| a | 4 | 1.33 | 0.58 | 13.33 ± 5.77 | 50.00 ± 0.00 | 25.00 ± 0.00 |"


# ------------------------------------------------------------------------------------------------------ splits
def test_split_classes_is_fixed_disjoint_and_ninety_ten():
    labels = torch.arange(40).repeat(3)
    train, val = datasets.split_classes(labels)
    again = datasets.split_classes(labels[torch.randperm(len(labels))])
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert len(val) == 4 and len(train) == 36
    assert set(train.tolist()).isdisjoint(val.tolist()) and set(train.tolist()) | set(val.tolist()) == set(range(40))
    with pytest.raises(ValueError, match="labels"):
        datasets.split_classes(torch.arange(3))


def test_digits_task_classes_are_disjoint():
    task = datasets.digits_task()
    num_seen = datasets.TRAIN_DIGITS * datasets.ORIENTATIONS
    train_ids, val_ids = datasets.split_classes(torch.arange(num_seen))
    assert task.num_train_classes == len(train_ids) == 36
    assert set(task.y_val.tolist()) == set(val_ids.tolist())  # validation keeps the original class ids
    test_ids = set(task.y_test.tolist())
    assert min(test_ids) >= num_seen  # digits 5-9 only
    assert {c % datasets.ORIENTATIONS for c in test_ids} == set(datasets.TEST_ORIENTATIONS) and len(test_ids) == 10
    _, y_seen = datasets.oriented(*(t[datasets.digits()[1] < datasets.TRAIN_DIGITS] for t in datasets.digits()))
    assert len(task.y_train) == int(torch.isin(y_seen, train_ids).sum())
    assert len(task.y_val) == int(torch.isin(y_seen, val_ids).sum())


def test_multi_centre_classes_are_mixtures_and_test_classes_are_new():
    x, y = datasets.multi_centre(5, modes=3, per_mode=10, seed=0)
    x2, _ = datasets.multi_centre(5, modes=3, per_mode=10, seed=1)
    assert x.shape == (150, 64) and torch.equal(torch.bincount(y), torch.full((5,), 30))
    assert not torch.allclose(x, x2)  # another seed draws other classes
    task = datasets.multi_centre_task(classes=20, modes=2, per_mode=5)
    assert task.num_train_classes == 18 and len(torch.unique(task.y_val)) == 2
    assert set(torch.unique(task.y_train).tolist()) == set(range(18))


# ---------------------------------------------------------------------------------------------------- training
def test_train_run_is_fair_deterministic_and_selects_the_best_validation_epoch():
    task = tiny_task()
    a = training.train_run(task, "proxy_anchor", 8, seed=3, epochs=3, batch_size=16)
    b = training.train_run(task, "triplet", 8, seed=3, epochs=3, batch_size=16)
    again = training.train_run(task, "proxy_anchor", 8, seed=3, epochs=3, batch_size=16)
    assert len(a.val_recall) == len(a.val_map_r) == 4
    assert a.val_recall[0] == b.val_recall[0]  # the same initial network for every loss
    assert a.val_recall == again.val_recall and a.test == again.test
    scores = list(zip(a.val_recall, a.val_map_r))
    assert scores[a.best_epoch] == max(scores[1:] + [scores[0]])
    assert 0 <= a.test["recall@1"] <= 1 and a.diverged_at is None
    last = training.train_run(task, "proxy_anchor", 8, seed=3, epochs=3, batch_size=16, select=False)
    assert last.best_epoch == 3


class _NaNAfterOneStep(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, embeddings, labels):
        self.calls += 1
        return embeddings.pow(2).mean() * (math.nan if self.calls > 1 else 1.0)


def test_train_run_batches_come_from_the_m_per_class_sampler(monkeypatch):
    """An epoch of train_run is an epoch of MPerClassSampler (per_class samples of each class in a batch), a new
    one every epoch."""
    epochs = []

    class Spy(training.MPerClassSampler):
        def __iter__(self):
            epochs.append(torch.tensor(list(super().__iter__())))
            return iter(epochs[-1].tolist())

    monkeypatch.setattr(training, "MPerClassSampler", Spy)
    task = tiny_task()
    training.train_run(task, "proxy_anchor", 8, seed=3, epochs=2, batch_size=16)
    assert len(epochs) == 2 and not torch.equal(epochs[0], epochs[1])
    for batch in epochs[0].view(-1, 16):
        counts = torch.bincount(task.y_train[batch])
        assert sorted(counts[counts > 0].tolist()) == [4] * 4


def test_a_diverging_loss_stops_its_run_and_keeps_the_best_epoch_before(monkeypatch):
    monkeypatch.setattr(zoo, "make_loss", lambda *a, **k: _NaNAfterOneStep())
    task = tiny_task()
    run = training.train_run(task, "anything", 8, seed=0, epochs=3, batch_size=16)
    assert run.diverged_at == 1 and run.best_epoch == 0 and len(run.val_recall) == 1
    # epoch 0 is the network every loss starts from: the tournament's "untrained" baseline
    assert run.test == training.test_metrics(training.initial_network(task, 8, 0), task)


# ----------------------------------------------------------------------------------------------------- command
def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="losses"):
        tournament.check_config(tournament.QUICK._replace(losses=("polytope", "mpa")))
    with pytest.raises(ValueError, match="losses"):
        tournament.check_config(tournament.QUICK._replace(losses=("mpa", "mpa")))
    with pytest.raises(ValueError, match="datasets"):
        tournament.check_config(tournament.QUICK._replace(datasets=("imagenet",)))
    with pytest.raises(ValueError, match="batch_size"):
        tournament.check_config(tournament.QUICK._replace(batch_size=30))


@pytest.fixture
def tiny_tasks(monkeypatch):
    monkeypatch.setattr(datasets, "TASKS", {"tiny_a": lambda: tiny_task("tiny_a"),
                                            "tiny_b": lambda: tiny_task("tiny_b", seed_test=2)})


def test_command_writes_consistent_tables(tiny_tasks, tmp_path, capsys):
    out = tmp_path / "t"
    assert tournament.main(["--datasets", "tiny_a", "tiny_b", "--losses", "proxy_anchor", "triplet", "contrastive",
                            "--dims", "4", "8", "--seeds", "0", "--epochs", "2", "--out", str(out), "--no-plots",
                            "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    for data in results["datasets"].values():
        for dim in (4, 8):
            ranks = [r["rank"] for r in data["runs"] if r["dim"] == dim]
            assert sum(ranks) == 6.0 and all(1 <= r <= 3 for r in ranks)  # a ranking of 3 losses (ties averaged)
        totals = {row["loss"]: row["total"] for row in data["summary"]}
        for loss, total in totals.items():
            assert total == sum(r["rank"] for r in data["runs"] if r["loss"] == loss)
    all_totals = {row["loss"]: row["total"] for row in results["summary_all"]}
    assert all_totals == {loss: sum(d["summary"][[r["loss"] for r in d["summary"]].index(loss)]["total"]
                                    for d in results["datasets"].values()) for loss in all_totals}
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == 2 * 2 * 3 and {r["dataset"] for r in rows} == {"tiny_a", "tiny_b"}
    summary = (out / "summary.md").read_text()
    assert "## tiny_a" in summary and "## All experiments" in summary and "total ranking" in summary
    assert summary.count("Untrained network") == 2
    assert [(u["dim"], u["seed"]) for u in results["datasets"]["tiny_a"]["untrained"]] == [(4, 0), (8, 0)]


def test_plots_are_written(tiny_tasks, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "p"
    tournament.main(["--datasets", "tiny_a", "--losses", "proxy_anchor", "triplet", "--dims", "4", "--seeds", "0",
                     "1", "--epochs", "1", "--out", str(out), "--no-progress", "--project", "triplet",
                     "proxy_anchor"])
    for name in ("recall_at_k_tiny_a.png", "validation_r1_tiny_a.png", "embeddings_tiny_a.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 150_000


def test_missing_matplotlib_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r"pip install 'metricloss_kernels\[apps\]'"):
        _plots.require_matplotlib()


def test_search_picks_values_of_its_space_on_the_validation_classes(tiny_tasks, tmp_path):
    out = tmp_path / "s"
    tournament.main(["--datasets", "tiny_a", "--losses", "proxy_anchor", "triplet", "--dims", "4", "--seeds", "0",
                     "--epochs", "2", "--search", "--out", str(out), "--no-plots", "--no-progress"])
    chosen = json.loads((out / "results.json").read_text())["datasets"]["tiny_a"]["overrides"]
    for loss in ("proxy_anchor", "triplet"):
        (arg, value), = chosen[loss].items()
        assert value in tournament.SEARCH_SPACE[loss][arg]
    assert "Hyper-parameters chosen on the validation classes" in (out / "summary.md").read_text()
