"""The proxy losses under torch.autocast: computed in fp32 whatever autocast would do to their matmuls, the loss in
fp32 (as torch's own losses under autocast), the proxies' gradients in fp32 and the embeddings' in their dtype.

CPU autocast (bf16) here; CUDA autocast (fp16 and bf16) on a GPU."""
import pytest
import torch

import metricloss_kernels as mlk

N, C, K, D = 37, 53, 3, 40
MODULES = {
    "ProxyNCALoss": lambda b: mlk.ProxyNCALoss(C, D, backend=b),
    "ProxyAnchorLoss": lambda b: mlk.ProxyAnchorLoss(C, D, backend=b),
    "SoftTripleLoss": lambda b: mlk.SoftTripleLoss(C, D, centers_per_class=K, backend=b),
    "MPALoss": lambda b: mlk.MPALoss(C, D, centers_per_class=K, backend=b),
    "ArcFaceLoss": lambda b: mlk.ArcFaceLoss(C, D, backend=b),
    "SubCenterArcFaceLoss": lambda b: mlk.SubCenterArcFaceLoss(C, D, sub_centers=K, backend=b),
    "CosFaceLoss": lambda b: mlk.CosFaceLoss(C, D, backend=b),
    "L2SoftmaxLoss": lambda b: mlk.L2SoftmaxLoss(C, D, backend=b),
    "ProxyRepelLoss-batch": lambda b: mlk.ProxyRepelLoss(C, D, variant="batch", backend=b),
}
AUTOCAST = [("cpu", torch.bfloat16, backend) for backend in ("reference", "chunked")]
if torch.cuda.is_available():
    AUTOCAST += [("cuda", dtype, backend) for dtype in (torch.float16, torch.bfloat16)
                 for backend in ("triton", "gemm")]


@pytest.mark.parametrize("device,dtype,backend", AUTOCAST, ids=[f"{d}-{str(t)[6:]}-{b}" for d, t, b in AUTOCAST])
@pytest.mark.parametrize("name", list(MODULES))
def test_proxy_losses_are_fp32_accurate_under_autocast(name, device, dtype, backend):
    torch.manual_seed(0)
    loss_fn = MODULES[name](backend).to(device)
    net = torch.nn.Linear(24, D).to(device)
    g = torch.Generator().manual_seed(1)
    inputs, labels = torch.randn(N, 24, generator=g).to(device), torch.randint(0, C, (N,), generator=g).to(device)
    with torch.autocast(device, dtype=dtype):
        embeddings = net(inputs)
        loss = loss_fn(embeddings, labels)
    assert embeddings.dtype == dtype  # autocast is on: the loss receives half-precision embeddings
    grad_x, grad_w = torch.autograd.grad(loss, [embeddings, *loss_fn.parameters()])[:2]
    # The truth: the float64 loss of the same half-precision embedding values and fp32 proxies.
    truth_fn = MODULES[name]("reference").to(device).double()
    truth_fn.load_state_dict(loss_fn.state_dict())
    x64 = embeddings.detach().double().requires_grad_()
    truth = truth_fn(x64, labels)
    truth_x, truth_w = torch.autograd.grad(truth, [x64, *truth_fn.parameters()])[:2]
    assert loss.dtype == torch.float32 and grad_w.dtype == torch.float32 and grad_x.dtype == dtype
    torch.testing.assert_close(loss.double(), truth, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_w.double(), truth_w, rtol=1e-4, atol=1e-6 * truth_w.abs().max().item())
    # The embeddings' gradient is rounded to their dtype at the end, and only then.
    torch.testing.assert_close(grad_x, truth_x.to(dtype), rtol=1e-2, atol=1e-2 * truth_x.abs().max().item())
