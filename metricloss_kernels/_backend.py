"""Backend selection: "reference" (pure torch, materialises the logits), "chunked" (streaming torch ops over
blocks of classes), "triton" (fused kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) and "gemm"
(cuBLAS GEMMs over chunks of classes with fused Triton epilogues; where "triton" runs).

"auto" (the default, or the METRICLOSS_BACKEND environment variable) picks Triton for CUDA tensors when it
imports, else the chunked backend when the N x C*K logits would exceed AUTO_CHUNK_BYTES, else the reference.
An explicitly requested backend that cannot run raises; the automatic choice falls back quietly."""
import functools
import os

import torch

BACKENDS = ("auto", "reference", "chunked", "triton", "gemm")
AUTO_CHUNK_BYTES = 64 * 2**20


@functools.cache
def _triton_import_error() -> str | None:
    try:
        from . import triton as _kernels  # noqa: F401  (imports triton itself)
    except Exception as exc:  # any import failure means "not available", with the reason kept
        return f"triton does not import ({type(exc).__name__}: {exc})"
    return None


def triton_reason(device: torch.device) -> str | None:
    """None when the Triton backend can run on tensors of `device`, else why not."""
    err = _triton_import_error()
    if err:
        return err
    from . import triton as kernels
    return kernels.unavailable_reason(device)


def backends() -> dict:
    """What each backend can run on this machine: {name: (available, reason)} for the default device."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = triton_reason(device)
    return {
        "reference": (True, "pure torch, always available"),
        "chunked": (True, "pure torch streaming over class blocks, always available"),
        "triton": (reason is None, reason or f"fused kernels on {device.type}"),
        "gemm": (reason is None, reason or f"torch.mm GEMMs and Triton epilogues on {device.type}"),
    }


def resolve(backend: str | None, device: torch.device, logits: int, supported=BACKENDS) -> str:
    """The concrete backend for an op on `device` whose reference would hold `logits` fp32 values.

    METRICLOSS_BACKEND replaces "auto"; a backend it names that this op does not implement (the pair losses have
    no "triton" or "gemm") falls back to the automatic choice, whereas an explicit `backend=` argument raises."""
    if backend is None or backend == "auto":
        backend = os.environ.get("METRICLOSS_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"METRICLOSS_BACKEND must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
        if backend not in supported:
            backend = "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend == "auto":
        if "triton" in supported and device.type == "cuda" and triton_reason(device) is None:
            return "triton"
        if "chunked" in supported and logits * 4 > AUTO_CHUNK_BYTES:
            return "chunked"
        return "reference"
    if backend not in supported:
        raise ValueError(f"backend {backend!r} is not implemented for this loss; "
                         f"available: {', '.join(map(repr, supported))}")
    if backend in ("triton", "gemm"):
        reason = triton_reason(device)
        if reason:
            raise RuntimeError(f"backend={backend!r} cannot run: {reason}")
    return backend
