// Schema of the exact k-nearest-neighbour op (registered when metricloss_kernels._C is imported: csrc/module.cpp).
//
// The kernel registers itself next to its code: csrc/cpu/knn_kernel.cpp (CPU; CUDA tensors take the torch path of
// metricloss_kernels/retrieval.py).  The fake (meta) kernel used by torch.compile lives in retrieval.py
// (torch.library.register_fake).

#include <torch/library.h>

TORCH_LIBRARY(metricloss_kernels, m) {
  // queries [Q, D], reference [R, D] (same floating dtype and device), 1 <= k <= R (R - 1 with exclude_self).
  // metric: "cosine" / "dot" (similarities, best = largest) or "euclidean" (distances, best = smallest; ||q - r||
  // computed directly in fp64, whatever the offset of the data: cpu/knn_kernel.cpp, "Euclidean exactness").
  // Returns (scores [Q, k] in the input dtype, indices [Q, k] int64), best first, ties towards the lower index;
  // exclude_self drops reference row q from the candidates of query q.  Not differentiable.
  m.def("knn(Tensor queries, Tensor reference, int k, str metric, bool exclude_self) -> (Tensor, Tensor)");
}
