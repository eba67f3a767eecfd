// Exact k-nearest neighbours on CPU: blocked GEMM (ATen / MKL) fused with per-query bounded selection.
//
// Queries are split into blocks of `block_q` rows that the threads take from a shared counter (dynamic
// scheduling: the machine may be shared, so a static split would wait for the slowest core).  A thread computes
// the scores of its query block against `block_r` reference rows at a time into a private buffer small enough to
// stay in its L2 cache, then scans every row of the buffer into that query's running top-k before the next GEMM
// overwrites it.  Memory is O(threads * block_q * (block_r + k)), never Q x R.
//
// Selection: candidates of a query arrive in increasing reference index, so a candidate whose value equals the
// current k-th best always loses the tie (ties go to the lower index) and the filter is a strict
// `value > threshold`, tested 32 values at a time by SIMD compares (a bit mask of the values to look at); almost
// every group is rejected there.
// Small k keeps a binary heap (worst on top); large k keeps an unsorted buffer of 2k that is cut back to the best
// k with nth_element when it fills (amortised O(1) per accepted candidate instead of O(log k)).
//
// Metrics, all as "largest value is best" during selection:
//   dot:        q . r
//   cosine:     q' . r'                      (rows normalised as q / max(||q||, 1e-12), like F.normalize)
//   euclidean:  2 q . r - ||r||^2            (= ||q||^2 - d^2; ||q||^2 is constant per query), turned into
//               d = sqrt(max(||q||^2 - value, 0)) at the end and re-sorted by (d, index).
// fp16 / bf16 inputs are computed in fp32, fp64 in fp64; scores come back in the input dtype.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace metricloss_kernels {
namespace {

enum class Metric { kCosine, kDot, kEuclidean };

// Up to this k the running top-k is a heap, above it a 2k selection buffer (measured on a Xeon with AVX-512:
// the heap is faster up to k = 32, the buffer from k = 64 on).
constexpr int64_t kHeapMaxK = 32;
// Values tested per branch-free filter step.
constexpr int64_t kFilterWidth = 32;  // <= 32: the filters return a 32-bit mask

Metric parse_metric(std::string_view metric) {
  if (metric == "cosine") return Metric::kCosine;
  if (metric == "dot") return Metric::kDot;
  if (metric == "euclidean") return Metric::kEuclidean;
  TORCH_CHECK_VALUE(false, "knn: metric must be 'cosine', 'dot' or 'euclidean', got '", std::string(metric), "'");
}

// Block sizes: the default 512 x 512 score buffer is 1 MiB in fp32, half of a 2 MiB L2 (Sapphire Rapids), with
// the GEMM's packed panels beside it; 256-1024 x 256-1024 were within 5% of each other there (bench_knn.py
// --tune).  METRICLOSS_KNN_BLOCK_Q / METRICLOSS_KNN_BLOCK_R override them.
int64_t env_or(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr) return fallback;
  const long long parsed = std::atoll(value);
  return parsed > 0 ? static_cast<int64_t>(parsed) : fallback;
}

template <typename T>
struct Neighbour {
  T value;
  int64_t index;
};

// Strict ranking order: larger value first, then lower index.  A functor, not a function pointer, so that the
// std:: heap / selection / sort algorithms inline it.
struct RanksBefore {
  template <typename T>
  bool operator()(const Neighbour<T>& a, const Neighbour<T>& b) const {
    return a.value > b.value || (a.value == b.value && a.index < b.index);
  }
};

// The best k (value, index) pairs of one query among the candidates pushed so far.  Until it has seen enough
// candidates to hold a threshold (`filtering()` false) every candidate must be pushed; afterwards only those with
// value > threshold().  NaN values rank last (as -inf).
template <typename T>
class TopK {
 public:
  TopK(Neighbour<T>* slots, int64_t k, int64_t capacity) : slots_(slots), k_(k), capacity_(capacity) {}

  bool filtering() const { return filtering_; }
  T threshold() const { return threshold_; }

  // Out of line: the rare path, kept out of the scan loop that every score goes through.
  __attribute__((noinline)) void push(T value, int64_t index) {
    if (std::isnan(value)) value = -std::numeric_limits<T>::infinity();
    const Neighbour<T> candidate{value, index};
    if (capacity_ == k_) {
      push_heap(candidate);
    } else {
      push_buffer(candidate);
    }
  }

  // Writes the k best, best first, to values[0..k) / indices[0..k) (through `emit`).
  template <typename Emit>
  void finish(Emit emit) {
    if (size_ > k_) std::nth_element(slots_, slots_ + (k_ - 1), slots_ + size_, RanksBefore{});
    std::sort(slots_, slots_ + k_, RanksBefore{});
    for (int64_t i = 0; i < k_; ++i) emit(i, slots_[i]);
  }

 private:
  // Heap ordered by RanksBefore: slots_[0] is the worst of the kept k.
  void push_heap(const Neighbour<T>& candidate) {
    if (size_ < k_) {
      slots_[size_++] = candidate;
      std::push_heap(slots_, slots_ + size_, RanksBefore{});
    } else {
      std::pop_heap(slots_, slots_ + k_, RanksBefore{});
      slots_[k_ - 1] = candidate;
      std::push_heap(slots_, slots_ + k_, RanksBefore{});
    }
    if (size_ == k_) {
      filtering_ = true;
      threshold_ = slots_[0].value;
    }
  }

  void push_buffer(const Neighbour<T>& candidate) {
    slots_[size_++] = candidate;
    if (size_ == capacity_) {
      std::nth_element(slots_, slots_ + (k_ - 1), slots_ + size_, RanksBefore{});
      size_ = k_;
      filtering_ = true;
      threshold_ = slots_[k_ - 1].value;
    }
  }

  Neighbour<T>* slots_;
  int64_t k_;
  int64_t capacity_;
  int64_t size_ = 0;
  bool filtering_ = false;
  T threshold_ = -std::numeric_limits<T>::infinity();
};

// Filters: bit u of the returned mask is set if the selection value u of the kFilterWidth values at row (minus
// offsets with kOffset) may exceed threshold; the scan then re-checks only those values.
//
// Portable filter (any type, any CPU): all bits when any value exceeds threshold.  A branch-free OR that the
// compiler vectorises; the loop must not be unrolled first, as GCC's SLP pass misses the unrolled OR-reduction.
struct PortableFilter {
  template <typename T, bool kOffset>
  static inline __attribute__((always_inline)) uint32_t mask(const T* __restrict__ row,
                                                            const T* __restrict__ offsets, T threshold) {
    int any = 0;
#pragma GCC unroll 1
    for (int64_t u = 0; u < kFilterWidth; ++u) any |= (kOffset ? row[u] - offsets[u] : row[u]) > threshold;
    return any ? ~uint32_t{0} >> (32 - kFilterWidth) : 0;
  }
};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define METRICLOSS_X86_FILTERS
// fp32 filters with exact per-value masks (two compares per 32 values on AVX-512).  Same interface as
// PortableFilter, instantiated with T = float only.
struct Avx512Filter {
  template <typename T, bool kOffset>
  static inline __attribute__((target("avx512f"))) uint32_t mask(const float* row, const float* offsets, float t) {
    __m512 lo = _mm512_loadu_ps(row), hi = _mm512_loadu_ps(row + 16);
    if (kOffset) {
      lo = _mm512_sub_ps(lo, _mm512_loadu_ps(offsets));
      hi = _mm512_sub_ps(hi, _mm512_loadu_ps(offsets + 16));
    }
    const __m512 threshold = _mm512_set1_ps(t);
    return static_cast<uint32_t>(_mm512_cmp_ps_mask(lo, threshold, _CMP_GT_OQ)) |
           (static_cast<uint32_t>(_mm512_cmp_ps_mask(hi, threshold, _CMP_GT_OQ)) << 16);
  }
};

struct Avx2Filter {
  template <typename T, bool kOffset>
  static inline __attribute__((target("avx2"))) uint32_t mask(const float* row, const float* offsets, float t) {
    const __m256 threshold = _mm256_set1_ps(t);
    uint32_t bits = 0;
    for (int q = 0; q < 4; ++q) {
      __m256 v = _mm256_loadu_ps(row + 8 * q);
      if (kOffset) v = _mm256_sub_ps(v, _mm256_loadu_ps(offsets + 8 * q));
      bits |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, threshold, _CMP_GT_OQ))) << (8 * q);
    }
    return bits;
  }
};
#endif

// Feeds a block of scores [nq, nr] (queries q0.., reference rows r0..) to the queries' top-k.  With kOffset the
// selection value is score - offsets[j] (euclidean).  With exclude_self, query q0 + i skips reference row q0 + i.
template <typename T, bool kOffset, typename Filter>
inline void scan_block(const T* __restrict__ scores, const T* __restrict__ offsets, int64_t nq, int64_t nr,
                       int64_t q0, int64_t r0, bool exclude_self, TopK<T>* tops) {
  for (int64_t i = 0; i < nq; ++i) {
    const T* row = scores + i * nr;
    const int64_t self = exclude_self ? q0 + i - r0 : -1;  // position of the query's own row in this block
    TopK<T>& top = tops[i];
    T threshold = top.threshold();
    auto offer = [&](int64_t j) {
      const T v = kOffset ? row[j] - offsets[j] : row[j];
      if ((!top.filtering() || v > threshold) && j != self) {
        top.push(v, r0 + j);
        threshold = top.threshold();
      }
    };
    int64_t j = 0;
    for (; j < nr && !top.filtering(); ++j) offer(j);
    for (; j + kFilterWidth <= nr; j += kFilterWidth) {
      for (uint32_t bits = Filter::template mask<T, kOffset>(row + j, kOffset ? offsets + j : nullptr, threshold);
           bits != 0; bits &= bits - 1) {
        offer(j + __builtin_ctz(bits));
      }
    }
    for (; j < nr; ++j) offer(j);
  }
}

using ScanFn = void (*)(const float*, const float*, int64_t, int64_t, int64_t, int64_t, bool, TopK<float>*);

// flatten: inline scan_block and the filter into the target-specific function (TopK::push stays a call).
#define METRICLOSS_SCAN(NAME, TARGET, FILTER, OFFSET)                                                        \
  __attribute__((flatten)) TARGET void NAME(const float* scores, const float* offsets, int64_t nq, int64_t nr, \
                                            int64_t q0, int64_t r0, bool exclude_self, TopK<float>* tops) {   \
    scan_block<float, OFFSET, FILTER>(scores, offsets, nq, nr, q0, r0, exclude_self, tops);                  \
  }
METRICLOSS_SCAN(scan_portable, , PortableFilter, false)
METRICLOSS_SCAN(scan_portable_offset, , PortableFilter, true)
#ifdef METRICLOSS_X86_FILTERS
METRICLOSS_SCAN(scan_avx512, __attribute__((target("avx512f"))), Avx512Filter, false)
METRICLOSS_SCAN(scan_avx512_offset, __attribute__((target("avx512f"))), Avx512Filter, true)
METRICLOSS_SCAN(scan_avx2, __attribute__((target("avx2"))), Avx2Filter, false)
METRICLOSS_SCAN(scan_avx2_offset, __attribute__((target("avx2"))), Avx2Filter, true)
#endif
#undef METRICLOSS_SCAN

// The scan is the only hot loop written here rather than in MKL.  Its fp32 version is compiled for AVX-512, AVX2
// and the baseline, picked once at run time, so the package needs no -march flag; METRICLOSS_KNN_SIMD =
// "avx2" / "portable" forces a lower level (tests use it).  fp64 (exactness) always uses the portable filter.
void scan(const float* scores, const float* offsets, int64_t nq, int64_t nr, int64_t q0, int64_t r0,
          bool exclude_self, TopK<float>* tops) {
  static const std::array<ScanFn, 2> fns = [] {
#ifdef METRICLOSS_X86_FILTERS
    const char* forced = std::getenv("METRICLOSS_KNN_SIMD");
    const std::string level = forced == nullptr ? "avx512" : forced;
    if (level == "avx512" && __builtin_cpu_supports("avx512f")) {
      return std::array<ScanFn, 2>{scan_avx512, scan_avx512_offset};
    }
    if ((level == "avx512" || level == "avx2") && __builtin_cpu_supports("avx2")) {
      return std::array<ScanFn, 2>{scan_avx2, scan_avx2_offset};
    }
#endif
    return std::array<ScanFn, 2>{scan_portable, scan_portable_offset};
  }();
  fns[offsets != nullptr](scores, offsets, nq, nr, q0, r0, exclude_self, tops);
}

void scan(const double* scores, const double* offsets, int64_t nq, int64_t nr, int64_t q0, int64_t r0,
          bool exclude_self, TopK<double>* tops) {
  if (offsets != nullptr) {
    scan_block<double, true, PortableFilter>(scores, offsets, nq, nr, q0, r0, exclude_self, tops);
  } else {
    scan_block<double, false, PortableFilter>(scores, offsets, nq, nr, q0, r0, exclude_self, tops);
  }
}

// q [Q, D], r [R, D]: contiguous, prepared for the metric (see the file comment).  offsets: ||r||^2 [R] for
// euclidean, else undefined; query_sq: ||q||^2 [Q] for euclidean.  Writes values / indices [Q, k].
template <typename T>
void knn_blocked(const at::Tensor& q, const at::Tensor& r, const at::Tensor& offsets, const at::Tensor& query_sq,
                 int64_t k, bool exclude_self, T* out_values, int64_t* out_indices) {
  const int64_t Q = q.size(0);
  const int64_t R = r.size(0);
  const bool euclidean = offsets.defined();
  const T* offset_data = euclidean ? offsets.data_ptr<T>() : nullptr;
  const T* query_sq_data = euclidean ? query_sq.data_ptr<T>() : nullptr;

  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Enough blocks for every thread, but no smaller than 16 rows (GEMM efficiency).
  const int64_t block_q = std::max<int64_t>(
      1, std::min(env_or("METRICLOSS_KNN_BLOCK_Q", 512), std::max<int64_t>(16, (Q + threads - 1) / threads)));
  const int64_t block_r = std::min(env_or("METRICLOSS_KNN_BLOCK_R", 512), R);
  const int64_t num_blocks = (Q + block_q - 1) / block_q;
  const int64_t capacity = k <= kHeapMaxK ? k : 2 * k;
  std::atomic<int64_t> next_block{0};

  at::parallel_for(0, std::min(threads, num_blocks), 1, [&](int64_t, int64_t) {
    // Worker threads do not inherit the caller's dispatch state; the inner ATen calls need no autograd.
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor scores = at::empty({block_q * block_r}, q.options());
    std::vector<Neighbour<T>> slots(block_q * capacity);
    std::vector<TopK<T>> tops;
    tops.reserve(block_q);
    for (int64_t b = next_block++; b < num_blocks; b = next_block++) {
      const int64_t q0 = b * block_q;
      const int64_t nq = std::min(block_q, Q - q0);
      tops.clear();
      for (int64_t i = 0; i < nq; ++i) tops.emplace_back(slots.data() + i * capacity, k, capacity);
      const at::Tensor q_block = q.narrow(0, q0, nq);
      for (int64_t r0 = 0; r0 < R; r0 += block_r) {
        const int64_t nr = std::min(block_r, R - r0);
        at::Tensor s = scores.narrow(0, 0, nq * nr).view({nq, nr});
        at::mm_out(s, q_block, r.narrow(0, r0, nr).t());
        scan(s.const_data_ptr<T>(), euclidean ? offset_data + r0 : nullptr, nq, nr, q0, r0, exclude_self,
             tops.data());
      }
      for (int64_t i = 0; i < nq; ++i) {
        T* values = out_values + (q0 + i) * k;
        int64_t* indices = out_indices + (q0 + i) * k;
        tops[i].finish([&](int64_t n, const Neighbour<T>& nb) {
          values[n] = nb.value;
          indices[n] = nb.index;
        });
        if (euclidean) {
          // value = ||q||^2 - d^2: convert, clamp the rounding below zero, and restore (distance, index) order
          // (the clamp can tie neighbours that the selection value still told apart).
          std::vector<Neighbour<T>> row(k);
          for (int64_t n = 0; n < k; ++n) {
            row[n] = {std::sqrt(std::max<T>(query_sq_data[q0 + i] - values[n], T(0))), indices[n]};
          }
          std::sort(row.begin(), row.end(), [](const Neighbour<T>& a, const Neighbour<T>& c) {
            return a.value < c.value || (a.value == c.value && a.index < c.index);
          });
          for (int64_t n = 0; n < k; ++n) {
            values[n] = row[n].value;
            indices[n] = row[n].index;
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& queries, const at::Tensor& reference, int64_t k,
                                          std::string_view metric_name, bool exclude_self) {
  const Metric metric = parse_metric(metric_name);
  TORCH_CHECK_VALUE(queries.dim() == 2, "knn: queries must be 2-D [Q, D], got shape ", queries.sizes());
  TORCH_CHECK_VALUE(reference.dim() == 2, "knn: reference must be 2-D [R, D], got shape ", reference.sizes());
  TORCH_CHECK_VALUE(queries.size(1) == reference.size(1), "knn: queries and reference must have the same ",
                    "embedding size D, got ", queries.size(1), " and ", reference.size(1));
  TORCH_CHECK_VALUE(queries.device().is_cpu() && reference.device().is_cpu(),
                    "knn (CPU kernel): queries and reference must be CPU tensors, got ", queries.device(), " and ",
                    reference.device());
  TORCH_CHECK_TYPE(at::isFloatingType(queries.scalar_type()), "knn: queries must be a floating tensor, got ",
                   queries.scalar_type());
  TORCH_CHECK_TYPE(reference.scalar_type() == queries.scalar_type(), "knn: reference must have the dtype of ",
                   "queries (", queries.scalar_type(), "), got ", reference.scalar_type());
  const int64_t Q = queries.size(0);
  const int64_t R = reference.size(0);
  const int64_t available = (exclude_self && Q > 0 && R > 0) ? R - 1 : R;
  TORCH_CHECK_VALUE(k >= 1 && k <= available, "knn: k must be in [1, ", available, "] (reference size",
                    exclude_self ? " minus the excluded query itself" : "", "), got ", k);

  at::AutoDispatchBelowADInplaceOrView guard;
  const at::ScalarType compute = queries.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor q = queries.detach().to(compute).contiguous();
  at::Tensor r = reference.detach().to(compute).contiguous();
  at::Tensor offsets, query_sq;
  if (metric == Metric::kCosine) {
    q = q / q.norm(2, {1}, true).clamp_min(1e-12);
    r = r / r.norm(2, {1}, true).clamp_min(1e-12);
  } else if (metric == Metric::kEuclidean) {
    offsets = r.square().sum(1);
    query_sq = q.square().sum(1);
    q = q * 2;  // exact (power of two): the GEMM then yields 2 q . r directly
  }

  at::Tensor values = at::empty({Q, k}, q.options());
  at::Tensor indices = at::empty({Q, k}, q.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(compute, "knn_cpu", [&] {
    knn_blocked<scalar_t>(q, r, offsets, query_sq, k, exclude_self, values.data_ptr<scalar_t>(),
                          indices.data_ptr<int64_t>());
  });
  return {values.to(queries.scalar_type()), indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(metricloss_kernels, CPU, m) {
  m.impl("knn", &knn_cpu);
}

}  // namespace metricloss_kernels
