"""CrossBatchMemory (metricloss_kernels/memory.py) against a float64 loop simulation of PML's ring: over several
steps with wrap-around, with every pair loss; its state, gradients and argument checks. (The comparison with PML's
own CrossBatchMemory is in test_pml_losses.py.)"""
import pytest
import torch
from test_exponential import exp_loop  # noqa: E402  (tests/ is on sys.path)
from test_reference_pair import (clustered_batch, contrastive_loop, lifted_loop, margin_loop,  # noqa: E402
                                 ms_loop, npairs_loop, triplet_loop)

import metricloss_kernels as mlk

MEMORY, N, D, C = 50, 23, 6, 5  # 23 rows a step: the third step wraps around inside the batch

# name -> (module, loop(x, y, ref), scale of the inputs)
LOSSES = {
    "contrastive": (lambda: mlk.ContrastiveLoss(0.8, 0.1), lambda x, y, ref: contrastive_loop(x, y, 0.8, 0.1, ref=ref),
                    1.0),
    "triplet_all": (lambda: mlk.TripletMarginLoss(0.2), lambda x, y, ref: triplet_loop(x, y, 0.2, "cosine", "all",
                                                                                        ref=ref), 1.0),
    "triplet_hard_euclidean": (lambda: mlk.TripletMarginLoss(0.3, "euclidean", "hard"),
                               lambda x, y, ref: triplet_loop(x, y, 0.3, "euclidean", "hard", ref=ref), 1.0),
    "lifted": (lambda: mlk.LiftedStructureLoss(1.5), lambda x, y, ref: lifted_loop(x, y, 1.5, ref=ref), 1.0),
    "npairs": (lambda: mlk.NPairsLoss(0.5), lambda x, y, ref: npairs_loop(x, y, 0.5, ref=ref), 0.3),
    "multi_similarity": (lambda: mlk.MultiSimilarityLoss(1.0, 10.0, 0.3, 0.3),
                         lambda x, y, ref: ms_loop(x, y, 1.0, 10.0, 0.3, 0.3, ref=ref), 1.0),
    "margin": (lambda: mlk.MarginLoss(0.2, 0.9, generator=torch.Generator()),
               lambda x, y, ref: margin_loop(x, y, 0.2, 0.9, seed=3, ref=ref), 1.0),
    "exponential_triplet": (lambda: mlk.ExponentialTripletLoss(12),
                            lambda x, y, ref: exp_loop(x, y, 12, ref=ref), 1.0),
}


def batches(steps, n=N, seed=30):
    x, y = clustered_batch(steps * n, D, C, seed=seed)
    return [(x[i * n:(i + 1) * n], y[i * n:(i + 1) * n]) for i in range(steps)]


class LoopRing:
    """PML's ring by hand: a list of memory_size rows, filled in order from slot 0 and wrapping around."""

    def __init__(self, size):
        self.x, self.y, self.next, self.filled = [None] * size, [None] * size, 0, 0

    def push(self, x, y):
        """Enqueues the batch; returns (reference rows, their labels, each row's slot) as a loop's `ref`."""
        size = len(self.x)
        slots = [(self.next + i) % size for i in range(len(y))]
        for i, slot in enumerate(slots):
            self.x[slot], self.y[slot] = x[i].detach().clone(), int(y[i])
        self.next, self.filled = (self.next + len(y)) % size, min(self.filled + len(y), size)
        return torch.stack(self.x[:self.filled]), torch.tensor(self.y[:self.filled]), torch.tensor(slots)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_memory_matches_loop_over_steps(name):
    """Five steps of 23 rows through a memory of 50: the filling steps, a wrap-around inside a batch, full memory."""
    make, loop, scale = LOSSES[name]
    memory, ring = mlk.CrossBatchMemory(make(), D, memory_size=MEMORY).double(), LoopRing(MEMORY)
    for step, (x, y) in enumerate(batches(5)):
        x = x * scale
        if name == "margin":
            memory.loss.generator.manual_seed(3)
        expected = loop(x, y, ring.push(x, y))
        assert expected > 0
        got = memory(x, y)
        assert got.item() == pytest.approx(expected, rel=1e-6, abs=1e-12), f"step {step}"
    assert memory.queue_idx == 5 * N % MEMORY and memory.has_been_filled


def test_gradients_reach_the_current_batch_only():
    memory = mlk.CrossBatchMemory(mlk.ContrastiveLoss(), D, memory_size=MEMORY)
    (x0, y0), (x1, y1) = batches(2)
    x0, x1 = x0.float().requires_grad_(), x1.float().requires_grad_()
    memory(x0, y0)
    memory(x1, y1).backward()
    assert x0.grad is None and x1.grad.abs().sum() > 0
    assert not memory.embedding_memory.requires_grad
    # the same gradient as the functional loss with the memory as a constant reference
    x = x1.detach().clone().requires_grad_()
    mlk.functional.contrastive_loss(x, y1, ref_emb=memory.embedding_memory[:2 * N].clone(),
                                    ref_labels=memory.label_memory[:2 * N], ref_self=torch.arange(N, 2 * N)).backward()
    torch.testing.assert_close(x1.grad, x.grad)


def test_state_dict_and_reset_queue():
    """The ring (buffers and position) round-trips through the state_dict; reset_queue empties it: the next call is
    the loss of its batch alone."""
    steps = batches(4)
    memory = mlk.CrossBatchMemory(mlk.MultiSimilarityLoss(), D, memory_size=MEMORY).double()
    for x, y in steps[:3]:
        memory(x, y)
    state = memory.state_dict()
    assert {"embedding_memory", "label_memory", "_extra_state"} <= set(state)
    restored = mlk.CrossBatchMemory(mlk.MultiSimilarityLoss(), D, memory_size=MEMORY).double()
    restored.load_state_dict(state)
    assert (restored.queue_idx, restored.has_been_filled) == (memory.queue_idx, memory.has_been_filled)
    x, y = steps[3]
    assert torch.equal(restored(x, y), memory(x, y))
    memory.reset_queue()
    assert (memory.queue_idx, memory.has_been_filled) == (0, False)
    assert memory(x, y).item() == pytest.approx(mlk.functional.multi_similarity_loss(x, y).item(), rel=1e-12)


def test_memory_takes_the_batch_dtype_and_device():
    memory = mlk.CrossBatchMemory(mlk.ContrastiveLoss(), D, memory_size=MEMORY)
    x, y = batches(1)[0]
    assert memory(x, y).dtype == torch.float64
    assert memory.embedding_memory.dtype == torch.float64
    assert torch.equal(memory.embedding_memory[:N], x)


def test_arguments_are_checked():
    with pytest.raises(TypeError, match="loss must be a pair loss"):
        mlk.CrossBatchMemory(mlk.ProxyAnchorLoss(5, D), D)
    with pytest.raises(ValueError, match="memory_size"):
        mlk.CrossBatchMemory(mlk.ContrastiveLoss(), D, memory_size=0)
    with pytest.raises(ValueError, match="embedding_size"):
        mlk.CrossBatchMemory(mlk.ContrastiveLoss(), 0)
    memory = mlk.CrossBatchMemory(mlk.ContrastiveLoss(), D, memory_size=10)
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match="does not fit in memory_size = 10"):
        memory(x, y)
    with pytest.raises(ValueError, match="width embedding_size = 6"):
        memory(x[:5, :4], y[:5])
    with pytest.raises(ValueError, match="labels"):
        memory(x[:5], y[:4])
    assert memory.queue_idx == 0  # nothing enqueued by a refused call
