"""Cross-batch memory (Wang et al., "Cross-Batch Memory for Embedding Learning"; pytorch-metric-learning's
CrossBatchMemory): the pair losses compare each batch with the embeddings of the last batches, held in a ring.
docs/pair_reference.md describes the workflow."""
import torch
from torch import nn

from . import _validation as V
from .losses import _PairLoss


class CrossBatchMemory(nn.Module):
    """`memory = CrossBatchMemory(loss, embedding_size, memory_size=1024)`; `memory(embeddings [N, D], labels [N])`
    -> scalar tensor. `loss` is any pair loss of the library (ContrastiveLoss, TripletMarginLoss,
    LiftedStructureLoss, NPairsLoss, MultiSimilarityLoss, MarginLoss, ExponentialTripletLoss).

    Each call (PML's semantics) first enqueues the batch, detached, into a FIFO ring of `memory_size` rows (the
    oldest rows are overwritten, wrapping around), then returns the loss with the batch as the anchors and every
    filled slot as the candidates, each embedding's own slot left out of its pairs (the `ref_self` of
    `functional`). Gradients reach the current batch only: the memory holds no graph.

    State: the buffers `embedding_memory` [memory_size, embedding_size] and `label_memory` [memory_size] (PML's
    names; the embeddings follow the dtype and device of the batch, as in PML), and the ring position `queue_idx`
    and `has_been_filled` (Python values: no device read per call; saved in the state_dict as extra state).
    `reset_queue()` empties the memory. Over the loss's process group each rank keeps a ring of its own rows and the
    candidates are the rings of every rank (all ranks pass batches of the same size).
    """

    def __init__(self, loss, embedding_size, memory_size=1024):
        super().__init__()
        if not isinstance(loss, _PairLoss):
            raise TypeError(f"loss must be a pair loss of metricloss_kernels (e.g. ContrastiveLoss, "
                            f"MultiSimilarityLoss), got {type(loss).__name__}")
        self.loss = loss
        self.embedding_size = V.positive_int(embedding_size, "embedding_size")
        self.memory_size = V.positive_int(memory_size, "memory_size")
        self.register_buffer("embedding_memory", torch.zeros(memory_size, embedding_size))
        self.register_buffer("label_memory", torch.zeros(memory_size, dtype=torch.long))
        self.queue_idx, self.has_been_filled = 0, False

    def reset_queue(self) -> None:
        """Empties the memory (the next call sees its own batch only)."""
        self.embedding_memory.zero_()
        self.label_memory.zero_()
        self.queue_idx, self.has_been_filled = 0, False

    def get_extra_state(self):
        return {"queue_idx": self.queue_idx, "has_been_filled": self.has_been_filled}

    def set_extra_state(self, state):
        self.queue_idx, self.has_been_filled = int(state["queue_idx"]), bool(state["has_been_filled"])

    def forward(self, embeddings, labels):
        V.embeddings(embeddings)
        n = embeddings.shape[0]
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must have width embedding_size = {self.embedding_size}, "
                             f"got shape {tuple(embeddings.shape)}")
        if n > self.memory_size:
            raise ValueError(f"embeddings: a batch of {n} rows does not fit in memory_size = {self.memory_size}")
        labels = V.labels(labels, n, embeddings.device)
        if self.embedding_memory.dtype != embeddings.dtype or self.embedding_memory.device != embeddings.device:
            self.embedding_memory = self.embedding_memory.to(embeddings)
            self.label_memory = self.label_memory.to(embeddings.device)
        slots = torch.arange(self.queue_idx, self.queue_idx + n, device=embeddings.device) % self.memory_size
        self.embedding_memory[slots] = embeddings.detach()
        self.label_memory[slots] = labels
        start, self.queue_idx = self.queue_idx, (self.queue_idx + n) % self.memory_size
        self.has_been_filled = self.has_been_filled or self.queue_idx <= start
        filled = self.memory_size if self.has_been_filled else self.queue_idx
        return self.loss.compute(embeddings, labels, ref_emb=self.embedding_memory[:filled],
                                 ref_labels=self.label_memory[:filled], ref_self=slots)

    def extra_repr(self):
        return f"embedding_size={self.embedding_size}, memory_size={self.memory_size}"
