"""Sharded losses over torch.distributed: the class partition, the collectives with their gradient conventions,
PartialFC-style class sampling, byte counting and the checkpoint helpers. The losses compose these (fused.py for the
proxy losses, reference/pair.py for the pair losses) through one object per call: `LOCAL` (one process: every
method is the identity, nothing is communicated) or a `Shard` (built by `agree`).

Setting. A process group of W ranks. Rank r passes its local batch x_r [n, D] and y_r [n] (global labels; the
same n on every rank) and, for a proxy loss, the proxies of its classes [start_r, stop_r): contiguous, in rank
order; modules use `class_range` (the first C mod W ranks hold one class more). X = cat_r x_r [N = W n, D], Y
likewise.

Value. Every rank returns the same value: the single-process loss on (X, Y) with the concatenated proxies.

Gradient convention.
  - proxies (and L2-softmax's bias): each rank's get exactly their rows of the single-process gradient;
  - embeddings: the gradient returned for a rank's local rows is W times the single-process gradient of those rows,
    so that a backbone wrapped in DistributedDataParallel, which averages gradients over the W ranks, receives
    exactly the single-process gradient (without DDP: divide by W, e.g. scale the loss by 1/W);
  - replicated loss parameters (MarginLoss's learnable beta): every rank gets the whole single-process gradient.
  Do not wrap a sharded loss module in DDP: its shards differ between ranks and its replicated parameters are
  already summed.

How. Each rank computes its share of the loss's terms from the gathered batch (the terms of its classes, or the
rows of its anchors); what every rank then computes from all-reduced pieces is replicated, so the upstream gradient
of a collective's output is the same on every rank. Hence the four differentiable collectives:
  gather_rows      all-gather along rows;      backward: reduce-scatter (sum) of every rank's gradient, x scale
  psum             all-reduce (sum);           backward: identity
  gather_stack     all-gather into [W, ...];   backward: this rank's slice
  replicated       identity;                   backward: all-reduce (sum)
They run on torch's functional collectives, which torch.compile traces into the graph.

Communication per step of a class-sharded loss (4-byte floats, the bytes each rank sends with ring algorithms):
forward all-gathers of the sizes (6 int64), the labels (8n) and the embeddings (4nD), each times (W - 1), plus [N]
or scalar pieces (row LSEs, target logits, sums); backward one reduce-scatter of dX, 4ND (W - 1) / W. O(N D),
independent of C. ProxyRepelLoss is the exception: its repel term couples every pair of proxies and all-gathers
them (O(C D)). `CommunicationLog` counts every collective of a step.
"""
import contextlib
import math

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from ._validation import require

# ------------------------------------------------------------------------------------------------ class partition


def class_range(num_classes: int, rank: int, world_size: int) -> tuple:
    """Classes [start, stop) of `rank` among `world_size` ranks: contiguous, the first num_classes mod world_size
    ranks one class more."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def group_rank(group) -> tuple:
    """(world size, rank) of this process in `group`."""
    return dist.get_world_size(group), dist.get_rank(group)


def check_group(group) -> None:
    """`process_group` is None or a ProcessGroup (TypeError otherwise)."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD) or None, got {type(group).__name__}")


def module_class_range(num_classes: int, group) -> tuple:
    """The class range of this process for a module over `group` ((0, num_classes) without a group); ValueError
    when the group has more ranks than there are classes."""
    check_group(group)
    if group is None:
        return 0, num_classes
    world, rank = group_rank(group)
    if num_classes < world:
        raise ValueError(f"num_classes must be at least the number of ranks of process_group ({world}) so that "
                         f"every rank holds a class, got {num_classes}")
    return class_range(num_classes, rank, world)


# ------------------------------------------------------------------------------------------- byte counting
_LOG = None


class CommunicationLog:
    """Context manager recording every collective of this module that runs inside it (eager mode):
    `.records` = [(op, shape, dtype, world size)], `.payload_bytes()` = bytes of the tensors handed to the
    collectives, `.sent_bytes()` = bytes this rank sends with ring algorithms (all-gather: (W - 1) x its input;
    reduce-scatter: (W - 1) / W x its input; all-reduce: 2 (W - 1) / W x its input; all-to-all of equal splits:
    (W - 1) / W x its input)."""

    _SENT = {"all_gather": lambda w: w - 1, "reduce_scatter": lambda w: (w - 1) / w,
             "all_reduce": lambda w: 2 * (w - 1) / w, "all_to_all": lambda w: (w - 1) / w}

    def __init__(self):
        self.records = []

    def __enter__(self):
        global _LOG
        self._outer, _LOG = _LOG, self
        return self

    def __exit__(self, *exc):
        global _LOG
        _LOG = self._outer

    @staticmethod
    def _bytes(shape, dtype):
        return math.prod(shape) * dtype.itemsize

    def payload_bytes(self) -> int:
        return sum(self._bytes(shape, dtype) for _, shape, dtype, _ in self.records)

    def sent_bytes(self) -> float:
        return sum(self._SENT[op](w) * self._bytes(shape, dtype) for op, shape, dtype, w in self.records)


def note_collective(op: str, t: torch.Tensor, group) -> None:
    """Records in the active CommunicationLog, if any, a collective `op` ("all_gather", "reduce_scatter",
    "all_reduce", "all_to_all") of the tensor `t` that code outside this module makes (e.g. DDP's all-reduce of a
    gradient)."""
    if _LOG is not None:
        _LOG.records.append((op, tuple(t.shape), t.dtype, dist.get_world_size(group)))


def _all_gather(t, group):
    note_collective("all_gather", t, group)
    return funcol.all_gather_single(t.contiguous(), 0, group)


def _reduce_scatter(t, group):
    note_collective("reduce_scatter", t, group)
    return funcol.reduce_scatter_single(t.contiguous(), "sum", 0, group)


def _all_reduce(t, group, op="sum"):
    note_collective("all_reduce", t, group)
    return funcol.all_reduce(t.contiguous(), op, group)


def _all_to_all(t, group):
    """t [W, ...]: t[r] goes to rank r; returns [W, ...] with row r from rank r."""
    note_collective("all_to_all", t, group)
    return funcol.all_to_all_single(t.contiguous(), None, None, group)


# ---------------------------------------------------------------------------------- differentiable collectives
class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scale):
        ctx.group, ctx.scale = group, scale
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        out = _reduce_scatter(grad, ctx.group)
        return (out * ctx.scale if ctx.scale != 1 else out), None, None


class _PSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        return _all_reduce(t, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.rank = dist.get_rank(group)
        return _all_gather(t.unsqueeze(0), group)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank], None


class _Replicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


def gather_rows(x: torch.Tensor, group, scale: float = 1.0) -> torch.Tensor:
    """cat_r x_r along dim 0 ([W n, ...] from [n, ...], the same n on every rank). Backward: the sum over ranks of
    their gradients, this rank's rows, times `scale`."""
    return _GatherRows.apply(x, group, scale)


def psum(t: torch.Tensor, group) -> torch.Tensor:
    """sum_r t_r, on every rank. Backward: identity (for a replicated downstream computation)."""
    return _PSum.apply(t, group)


def gather_stack(t: torch.Tensor, group) -> torch.Tensor:
    """stack_r t_r, [W, ...], on every rank. Backward: this rank's slice (for a replicated downstream computation)."""
    return _GatherStack.apply(t, group)


def replicated(t: torch.Tensor, group) -> torch.Tensor:
    """t itself; backward: the gradient summed over ranks (a parameter replicated on every rank whose loss terms
    are split between the ranks)."""
    return _Replicated.apply(t, group)


# ------------------------------------------------------------------------------------------------ agreement
# One row per rank of the exchanged sizes: inputs valid (1/0), local rows n, width D, local classes, label min, max.
_OK, _ROWS, _WIDTH, _CLASSES, _YMIN, _YMAX = range(6)


def _group_device(group) -> torch.device:
    """The device of the tensors the group's backend exchanges (NCCL: the current CUDA device)."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_batch(embeddings, labels, group):
    """(X, Y): every rank's rows in rank order, without gradient (equal row counts; see `agree`)."""
    device = _group_device(group)
    y = _all_gather(labels.to(device), group).to(labels.device)
    return _all_gather(embeddings.to(device), group).to(embeddings.device), y


def _exchange(mine: torch.Tensor, group) -> torch.Tensor:
    return _all_gather(mine, group).view(dist.get_world_size(group), -1)


def _check_valid(info, group, error=None):
    """Every rank's local checks passed; otherwise a ValueError on every rank quoting the failing ranks' errors
    (relayed with one all_gather_object, on this error path only)."""
    def relay():
        messages = [None] * dist.get_world_size(group)
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group)
        return "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)

    require(info[:, _OK] == 1, "process_group: the inputs of a rank failed validation: ", relay)


def exchange_checks(group, values: torch.Tensor) -> torch.Tensor:
    """The exchange a sharded call starts with once its local checks passed (inside `agreement`): all-gathers this
    rank's six int64 `values` (values[0] = 1: checks passed; the rest the call's sizes) and returns every rank's
    as [W, 6], after a ValueError on every rank if some rank's local checks failed."""
    info = _exchange(values.to(_group_device(group)), group)
    _check_valid(info, group)
    return info


@contextlib.contextmanager
def agreement(group):
    """Wraps the local validation of a sharded call: a ValueError or TypeError raised inside is announced to the
    other ranks (in the exchange they make in `agree`), so that every rank raises instead of waiting for this one."""
    check_group(group)
    if group is None:
        yield
        return
    try:
        yield
    except (ValueError, TypeError) as error:
        info = _exchange(torch.zeros(6, dtype=torch.long, device=_group_device(group)), group)
        with contextlib.suppress(ValueError):
            _check_valid(info, group, error)
        raise


def agree(group, embeddings, labels, num_local_classes=None, num_classes=None) -> "Shard":
    """The exchange a sharded call starts with (after local validation inside `agreement`): one all-gather of six
    int64 per rank, then checks made identically on every rank, each a ValueError on every rank (through
    `_validation.require`: on CUDA tensors and under torch.compile an asynchronous assert instead):
    every rank's local checks passed; the same number of rows and the same width on every rank; labels in
    [0, C) with C the sum of the ranks' class counts (`num_local_classes`: class-sharded losses), or in
    [0, num_classes) (replicated per-class tensors), or >= 0."""
    device = _group_device(group)
    n, d = embeddings.shape
    sizes = torch.tensor([1, n, d, num_local_classes or 0], device=device)
    info = exchange_checks(group, torch.cat([sizes, torch.stack(torch.aminmax(labels)).to(device)]))
    world = dist.get_world_size(group)
    for column, what in ((_ROWS, "number of rows"), (_WIDTH, "width")):
        require(info[:, column] == info[0, column],
                f"embeddings: every rank of process_group must pass the same {what} (sharded losses gather "
                f"equal shards of the batch)", lambda: f", got {info[:, column].tolist()} on ranks 0..{world - 1}")  # noqa: B023 (called here)
    if num_local_classes is not None:
        upper, what = info[:, _CLASSES].sum(), "the number of classes of all ranks"
    elif num_classes is not None:
        upper, what = num_classes, "num_classes"
    else:
        upper, what = None, None
    ok = info[:, _YMIN] >= 0
    if upper is not None:
        ok = ok & (info[:, _YMAX] < upper)

    def detail():
        ranges = ", ".join(f"rank {r}: {lo}..{hi}" for r, (lo, hi) in enumerate(info[:, _YMIN:].tolist()))
        bound = "" if upper is None else f" with {what} = {int(upper)}"
        return f"{bound}; got values {ranges}"

    require(ok, "labels must be in [0, C) on every rank of process_group" if upper is not None
            else "labels must be >= 0 on every rank of process_group", detail)
    return Shard(group, info, n, device)


# ------------------------------------------------------------------------------------------- the two strategies
class Local:
    """One process holds every class and every row: the identity for every method of `Shard`."""
    world_size = 1

    def local(self, labels):
        return labels

    def target(self, values, local, num_local):
        return values

    def row_lse(self, lse):
        return lse

    def subset_mean(self, values, subset):
        """Mean of the per-class values [C_local] over the classes of the bool `subset` [C_local]."""
        return values.sum() / subset.sum()

    def classes_mean(self, mean, num_local):
        """The mean over all classes of a per-class quantity whose mean over this rank's classes is `mean`."""
        return mean

    def all_proxies(self, proxies, k):
        """(every class's proxies [C*K, D], this rank's first class as an index into them)."""
        return proxies, 0

    def rows_of(self, w, num_classes):
        """This rank's rows of a full per-class tensor w [num_classes, ...]."""
        return w

    def anchors(self):
        return None


LOCAL = Local()


class Shard(Local):
    """One sharded call's view of its group (built by `agree`): the class start of this rank and the number of
    classes as 0-d tensors (no host read), this rank's rows of the gathered batch, and the collectives."""

    def __init__(self, group, info, n, device):
        self.group, self.info, self.device = group, info, device
        self.world_size, self.rank = group_rank(group)
        self.start = info[:self.rank, _CLASSES].sum()
        self.num_classes = info[:, _CLASSES].sum()
        self.rows = (self.rank * n, (self.rank + 1) * n)

    def gather(self, embeddings, labels):
        """(X [N, D], Y [N]): the batch of every rank; X's gradient follows the DDP convention (x W)."""
        y = _all_gather(labels.to(self.device), self.group).to(labels.device)
        return gather_rows(embeddings, self.group, float(self.world_size)), y

    def gather_index(self, index):
        """Every rank's indices into its own n rows (negative: none) as indices into the gathered rows, [N]."""
        shifted = torch.where(index >= 0, index + self.rows[0], index)
        return _all_gather(shifted.to(self.device), self.group).to(index.device)

    def local(self, labels):
        """Global labels -> this rank's class indices; other ranks' classes fall outside [0, C_local) (where
        class_lse leaves nothing out)."""
        return labels - self.start.to(labels.device)

    def target(self, values, local, num_local):
        """values [N] computed by every rank for every row, kept from the rank that owns the row's class."""
        own = (local >= 0) & (local < num_local)
        return psum(torch.where(own, values, 0), self.group)

    def row_lse(self, lse):
        """Row LSEs over all classes from each rank's LSEs over its classes: logsumexp of the [W, N] stack."""
        return torch.logsumexp(gather_stack(lse, self.group), dim=0)

    def subset_mean(self, values, subset):
        total = psum(torch.stack([values.sum(), subset.sum().to(values.dtype)]), self.group)
        return total[0] / total[1]

    def classes_mean(self, mean, num_local):
        return psum(mean * num_local, self.group) / self.num_classes.to(mean.dtype)

    def all_proxies(self, proxies, k):
        """All-gathers the proxies (shards padded to the largest; their sizes are read on the host) with the
        gradient summed back to the owners."""
        sizes = [c * k for c in self.info[:, _CLASSES].tolist()]
        padded = torch.nn.functional.pad(proxies, (0, 0, 0, max(sizes) - proxies.shape[0]))
        stacked = gather_rows(padded, self.group).view(self.world_size, max(sizes), -1)
        full = torch.cat([stacked[r, :s] for r, s in enumerate(sizes)])
        return full, sum(sizes[:self.rank]) // k

    def rows_of(self, w, num_classes):
        start, stop = class_range(num_classes, self.rank, self.world_size)
        return w[start:stop]

    def anchors(self):
        from .reference.pair import Anchors

        return Anchors(*self.rows, lambda t: psum(t, self.group),
                       lambda t: _all_reduce(t.detach(), self.group, "max"))

    def replicated(self, t):
        return replicated(t, self.group)


# -------------------------------------------------------------------------------------- PartialFC-style sampling
def sample_size(num_classes: int, rate: float, num_rows: int) -> int:
    """Classes kept by `sampled`: ceil(rate * C_local), raised to the number of rows N when smaller (so that every
    positive class fits in a fixed shape), at most C_local."""
    return min(num_classes, max(math.ceil(rate * num_classes), num_rows))


def sample_classes(labels: torch.Tensor, num_classes: int, size: int):
    """A random subset of `size` of the classes [0, num_classes) that contains every class among `labels` (labels
    outside the range belong to no class here): top-k of uniform scores, +1 for the positives. Returns (index
    [size], sorted; labels re-indexed into the subset, -1 where outside). Fixed shapes, no host read."""
    inside = (labels >= 0) & (labels < num_classes)
    slot = torch.where(inside, labels, num_classes)
    positive = torch.zeros(num_classes + 1, device=labels.device).index_fill_(0, slot, 1.0)[:num_classes]
    scores = torch.rand(num_classes, device=labels.device) + positive
    index = scores.topk(size).indices.sort().values
    position = torch.full((num_classes + 1,), -1, dtype=torch.long, device=labels.device)
    position[index] = torch.arange(size, device=labels.device)
    return index, position[slot]


def sampled(lse, rate: float):
    """`lse` (a callable with class_lse's signature) whose row reductions run over `sample_size` classes of `w`
    (every class of the rows' labels among them, the negatives drawn uniformly from torch's global RNG; PartialFC):
    the row LSE of a class-sampled softmax. rate = 1 returns `lse` itself: exactly the full loss."""
    if rate == 1:
        return lse

    def run(x, w, labels, *, bias=None, centers_per_class=1, reduce="row", **kwargs):
        if reduce != "row":
            raise ValueError("sample_rate < 1 applies to row-wise losses only")
        k = centers_per_class
        c = w.shape[0] // k
        size = sample_size(c, rate, labels.shape[0])
        if size < c:
            index, labels = sample_classes(labels, c, size)
            w = w.unflatten(0, (c, k))[index].flatten(0, 1)
            bias = None if bias is None else bias[index]
        return lse(x, w, labels, bias=bias, centers_per_class=k, reduce=reduce, **kwargs)

    return run


# ------------------------------------------------------------------------------------------------ checkpoints
def _sharded_modules(module):
    """(prefix, submodule) for every class-sharded submodule (one with a process group and `class_rows`); one
    process group for all of them."""
    found = [((name + ".") if name else "", sub) for name, sub in module.named_modules()
             if getattr(sub, "process_group", None) is not None and hasattr(sub, "class_rows")]
    if not found:
        raise ValueError("module has no class-sharded loss (a proxy loss built with a process_group)")
    if len({id(sub.process_group) for _, sub in found}) > 1:
        raise ValueError("module's sharded losses must share one process group")
    return found


def gather_state_dict(module: torch.nn.Module, dst: int = 0):
    """Collective over the process group of `module`'s sharded losses: the state_dict of the unsharded module
    (every class-sharded tensor concatenated in class order: what an unsharded module of the same arguments loads)
    on the group's rank `dst`, None on the other ranks."""
    state, sharded = module.state_dict(), _sharded_modules(module)
    group = sharded[0][1].process_group
    world, rank = group_rank(group)
    for prefix, sub in sharded:
        ranges = [class_range(sub.num_classes, r, world) for r in range(world)]
        for name, per_class in sub.class_rows().items():
            local = state[prefix + name]
            rows = [(stop - start) * per_class for start, stop in ranges]
            pad = (0, 0) * (local.dim() - 1) + (0, max(rows) - local.shape[0])
            padded = torch.nn.functional.pad(local, pad).contiguous()
            parts = [torch.empty_like(padded) for _ in range(world)] if rank == dst else None
            dist.gather(padded, parts, dst=dist.get_global_rank(group, dst), group=group)
            if rank == dst:
                state[prefix + name] = torch.cat([p[:r] for p, r in zip(parts, rows)])
        del state[prefix + "class_range"], state[prefix + "num_classes"]
    return state if rank == dst else None


def shard_state_dict(full_state_dict: dict, module: torch.nn.Module) -> dict:
    """`module`'s state_dict taken from an unsharded one (from `gather_state_dict`, or from an unsharded module of
    the same arguments; any world size): every class-sharded tensor cut to the module's class range, with the
    range. Load it with `module.load_state_dict`."""
    state = dict(full_state_dict)
    for prefix, sub in _sharded_modules(module):
        start, stop = sub.class_range
        for name, per_class in sub.class_rows().items():
            state[prefix + name] = full_state_dict[prefix + name][start * per_class:stop * per_class]
        state[prefix + "class_range"] = torch.tensor([start, stop])
        state[prefix + "num_classes"] = torch.tensor(sub.num_classes)
    return state
