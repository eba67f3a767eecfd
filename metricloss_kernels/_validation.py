"""Argument checks for the public entry points: each failure is a ValueError or TypeError naming the argument.

Checks of tensor *values* (label ranges, finiteness) go through `require`: on eager CPU tensors it reads the values
on the host (no device to wait for) and raises a ValueError with the offending values; on any other device, and
under torch.compile, it is `torch._assert_async`, a check that runs where the data lives: no synchronisation and no
graph break, at the price of a RuntimeError with a fixed message (on CUDA a device-side assert, reported
asynchronously and fatal to the CUDA context, as cross_entropy's out-of-range target is)."""
import math

import torch


def tensor(value, name: str) -> torch.Tensor:
    if not torch.is_tensor(value):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def embeddings(x, name: str = "embeddings", min_rows: int = 1) -> torch.Tensor:
    """A floating [N, D] tensor with N >= min_rows, D >= 1."""
    tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    return x


def require(ok: torch.Tensor, message: str, detail=None) -> None:
    """Checks that every element of the bool tensor `ok` is True (see the module docstring for how). Eager CPU:
    ValueError(message + detail()), `detail` an optional callable describing the offending values."""
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok.all()):
            raise ValueError(message + (detail() if detail is not None else ""))
    else:
        torch._assert_async(ok.all(), message)


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or infinity in x: one aminmax pass (it propagates NaN), no x-sized temporaries."""
    return x.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(x))).all())


def labels(y, n: int, device: torch.device, num_classes: int | None = None, name: str = "labels") -> torch.Tensor:
    """An integer [N] tensor on `device`, values in [0, num_classes) (>= 0 without num_classes); returned as int64.
    The value range is checked by `require`."""
    tensor(y, name)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {y.dtype}")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] (one label per embedding), got {tuple(y.shape)}")
    if y.device != device:
        raise ValueError(f"{name} must be on the embeddings' device {device}, got {y.device}")
    y = y.long()  # before the range check: in a narrow dtype num_classes would wrap (int8: 200 -> -56)
    if n:
        if num_classes is None:
            ok, expected = y >= 0, f"{name} must be >= 0"
        else:
            ok, expected = (y >= 0) & (y < num_classes), f"{name} must be in [0, num_classes = {num_classes})"
        require(ok, expected, lambda: ", got values from {} to {}".format(*map(int, torch.aminmax(y))))
    return y


def weights(w, d: int, device: torch.device, name: str, rows_multiple_of: int = 1) -> int:
    """A floating [R, D] tensor on `device` whose row count is a positive multiple of `rows_multiple_of`.
    Returns R // rows_multiple_of (the number of classes)."""
    tensor(w, name)
    if not w.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {w.dtype}")
    if w.dim() != 2 or w.shape[1] != d:
        raise ValueError(f"{name} must have shape [rows, {d}] (width = embedding size), got {tuple(w.shape)}")
    if w.device != device:
        raise ValueError(f"{name} must be on the embeddings' device {device}, got {w.device}")
    if w.shape[0] == 0 or w.shape[0] % rows_multiple_of:
        raise ValueError(f"{name} has {w.shape[0]} rows, expected a positive multiple of "
                         f"centers_per_class = {rows_multiple_of}")
    return w.shape[0] // rows_multiple_of


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def number(value, name: str, *, positive: bool = False, nonnegative: bool = False) -> float:
    # Comparisons rather than math.isfinite: under torch.compile a float hyper-parameter may arrive as a symbolic
    # float (dynamo makes floats dynamic once a second value is seen), which comparisons handle and isfinite not.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value
