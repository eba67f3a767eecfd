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
//   euclidean:  2 a . b - ||b||^2            with a = q - c, b = r - c for a centre c within the reference
//               (= ||a||^2 - ||a - b||^2: the order of ||q - r||, up to rounding), a filter only; see below.
// fp16 / bf16 inputs are computed in fp32, fp64 in fp64; scores come back in the input dtype.
//
// Euclidean exactness.  The GEMM value carries cancellation error: with u the unit roundoff of the compute type,
// gamma = D u / (1 - D u), w the rounding of the GEMM's inputs (0, or 2^-8 / 2^-11 when torch lets fp32 matmuls
// round to bf16 / tf32) and rho = ||a|| + max_r ||b||, it lies within (1.5 gamma + 1.5 w + 5u) rho^2 of
// ||a||^2 - ||q - r||^2 (GEMM and norms (1.5 gamma + 1.5 w) rho^2, the subtraction 2u rho^2, the rounding of the
// centring 3u rho^2).  Centring keeps rho at the spread of the data rather than its distance from the origin.
// Each query keeps every candidate whose value is within slack = 2E, E = 3 (gamma + w + 4u) rho^2, of its k-th
// best (a Window; E's extra margin covers the rounding of the thresholds and of the fp64 distances), so the
// window holds its k nearest rows, and re-ranks them by squared_distances: ||q - r||^2 computed directly from the
// inputs in fp64.  When too many candidates crowd the window (clusters far apart relative to their spread), or
// the slack is not finite, the query measures every candidate that passes the filter directly instead.  The
// result is the k nearest by that fp64 distance, ties to the lower index, wherever the data lie.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>
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
// A euclidean Window holds 2k + kWindowSpare candidates; a compaction that frees less than half of the room
// above k sends the query to direct distances (the window is crowded).
constexpr int64_t kWindowSpare = 32;

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

// ||x - y_j||^2 in fp64 for N rows y_j at once, each summed in coordinate order with separate multiply and add
// (setup.py turns FMA contraction off): the torch path sums in the same order, so both paths produce the same
// bits.  N > 1 overlaps the latency of the N independent sums and of the rows' cache misses.
template <int N, typename T>
void squared_distances(const T* x, const T* const (&ys)[N], int64_t dim, double (&sums)[N]) {
  for (int j = 0; j < N; ++j) sums[j] = 0;
  for (int64_t i = 0; i < dim; ++i) {
    const double xi = static_cast<double>(x[i]);
    for (int j = 0; j < N; ++j) {
      const double d = xi - static_cast<double>(ys[j][i]);
      sums[j] += d * d;
    }
  }
}

// Distance order of (squared distance, index): nearer first, then lower index.
struct Nearer {
  bool operator()(const Neighbour<double>& a, const Neighbour<double>& b) const {
    return a.value < b.value || (a.value == b.value && a.index < b.index);
  }
};

// What a euclidean Window needs besides the selection values.
template <typename T>
struct EuclideanRows {
  const T* queries;           // [Q, D] uncentred, for the direct distances
  const T* reference;         // [R, D] uncentred
  int64_t dim;
  const T* slack;             // [Q] 2E (file comment)
  const double* centred_sq;   // [Q] ||a||^2
};

// The candidates of one query for the euclidean metric (file comment), behind TopK's interface.  Window mode: an
// unsorted buffer of (selection value, index) cut back, when it fills, to the values within slack of the k-th
// best; finish() measures what is left directly.  Direct mode (a crowded window, or a slack that is not finite):
// a heap of the k nearest by direct distance (farthest on top); every candidate that passes the filter is
// measured at once, and the filter admits what might still beat the k-th distance.
template <typename T>
class Window {
 public:
  Window(Neighbour<T>* slots, int64_t k, int64_t capacity, const EuclideanRows<T>& rows, int64_t query)
      : slots_(slots), k_(k), capacity_(capacity), reference_(rows.reference), dim_(rows.dim),
        query_(rows.queries + query * rows.dim), slack_(rows.slack[query]), centred_sq_(rows.centred_sq[query]),
        direct_(!std::isfinite(slack_)) {}

  bool filtering() const { return filtering_; }
  T threshold() const { return threshold_; }

  // Values are finite here: a finite slack bounds every score by a finite rho^2.
  __attribute__((noinline)) void push(T value, int64_t index) {
    if (direct_) {
      push_direct(index);
      return;
    }
    slots_[size_++] = {value, index};
    if (size_ == capacity_) compact();
  }

  // Writes the k nearest, nearest first, as (squared fp64 distance, index) (through `emit`).
  template <typename Emit>
  void finish(Emit emit) {
    if (!direct_) {
      if (size_ > k_) cut();
      nearest_.resize(size_);
      constexpr int kLanes = 8;  // rows measured at once: 8 was faster than 4 (and 4 twice as fast as 1)
      int64_t i = 0;
      for (; i + kLanes <= size_; i += kLanes) {
        const T* rows[kLanes];
        double sums[kLanes];
        for (int j = 0; j < kLanes; ++j) rows[j] = reference_ + slots_[i + j].index * dim_;
        squared_distances(query_, rows, dim_, sums);
        for (int j = 0; j < kLanes; ++j) nearest_[i + j] = {sums[j], slots_[i + j].index};
      }
      for (; i < size_; ++i) nearest_[i] = {distance_to(slots_[i].index), slots_[i].index};
      std::nth_element(nearest_.begin(), nearest_.begin() + (k_ - 1), nearest_.end(), Nearer{});
      nearest_.resize(k_);
    }
    std::sort(nearest_.begin(), nearest_.end(), Nearer{});
    for (int64_t i = 0; i < k_; ++i) emit(i, nearest_[i]);
  }

 private:
  double distance_to(int64_t index) const {
    const T* rows[1] = {reference_ + index * dim_};
    double sum[1];
    squared_distances(query_, rows, dim_, sum);
    return sum[0];
  }

  // Keeps the candidates within slack of the k-th best value (at least k).
  void cut() {
    std::nth_element(slots_, slots_ + (k_ - 1), slots_ + size_, RanksBefore{});
    filtering_ = true;
    threshold_ = slots_[k_ - 1].value - slack_;
    const T threshold = threshold_;
    size_ = std::partition(slots_, slots_ + size_, [threshold](const Neighbour<T>& n) {
              return n.value >= threshold;
            }) - slots_;
  }

  void compact() {
    cut();
    if (size_ > k_ + (capacity_ - k_) / 2) {
      direct_ = true;
      for (int64_t i = 0; i < size_; ++i) push_direct(slots_[i].index);
    }
  }

  void push_direct(int64_t index) {
    const Neighbour<double> candidate{distance_to(index), index};
    if (static_cast<int64_t>(nearest_.size()) < k_) {
      nearest_.push_back(candidate);
      std::push_heap(nearest_.begin(), nearest_.end(), Nearer{});
    } else if (Nearer{}(candidate, nearest_.front())) {
      std::pop_heap(nearest_.begin(), nearest_.end(), Nearer{});
      nearest_.back() = candidate;
      std::push_heap(nearest_.begin(), nearest_.end(), Nearer{});
    } else {
      return;
    }
    // Without a finite slack nothing may be filtered: every candidate is measured.
    if (static_cast<int64_t>(nearest_.size()) == k_ && std::isfinite(slack_)) {
      filtering_ = true;
      // A row whose selection value is at most ||a||^2 - d_k^2 - slack lies farther than the k-th nearest.
      threshold_ = static_cast<T>(centred_sq_ - nearest_.front().value - static_cast<double>(slack_));
    }
  }

  Neighbour<T>* slots_;
  int64_t k_;
  int64_t capacity_;
  const T* reference_;
  int64_t dim_;
  const T* query_;
  T slack_;
  double centred_sq_;
  bool direct_;
  int64_t size_ = 0;
  bool filtering_ = false;
  T threshold_ = -std::numeric_limits<T>::infinity();
  std::vector<Neighbour<double>> nearest_;  // direct mode: the heap; finish(): the measured candidates
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

// Feeds a block of scores [nq, nr] (queries q0.., reference rows r0..) to the queries' selections `tops` (TopK or
// Window).  With kOffset the selection value is score - offsets[j] (euclidean).  With exclude_self, query q0 + i
// skips reference row q0 + i.
template <typename T, bool kOffset, typename Filter, typename Top>
inline void scan_block(const T* __restrict__ scores, const T* __restrict__ offsets, int64_t nq, int64_t nr,
                       int64_t q0, int64_t r0, bool exclude_self, Top* tops) {
  for (int64_t i = 0; i < nq; ++i) {
    const T* row = scores + i * nr;
    const int64_t self = exclude_self ? q0 + i - r0 : -1;  // position of the query's own row in this block
    Top& top = tops[i];
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

// Scores are similarities for a TopK, euclidean selection values (score - offsets) for a Window.
template <typename Top>
constexpr bool kScansOffsets = !std::is_same_v<Top, TopK<float>> && !std::is_same_v<Top, TopK<double>>;

template <typename Top>
using ScanFn = void (*)(const float*, const float*, int64_t, int64_t, int64_t, int64_t, bool, Top*);

// flatten: inline scan_block and the filter into the target-specific function (push stays a call).
#define METRICLOSS_SCAN(NAME, TARGET, FILTER)                                                                  \
  template <typename Top>                                                                                      \
  __attribute__((flatten)) TARGET void NAME(const float* scores, const float* offsets, int64_t nq, int64_t nr, \
                                            int64_t q0, int64_t r0, bool exclude_self, Top* tops) {           \
    scan_block<float, kScansOffsets<Top>, FILTER>(scores, offsets, nq, nr, q0, r0, exclude_self, tops);       \
  }
METRICLOSS_SCAN(scan_portable, , PortableFilter)
#ifdef METRICLOSS_X86_FILTERS
METRICLOSS_SCAN(scan_avx512, __attribute__((target("avx512f"))), Avx512Filter)
METRICLOSS_SCAN(scan_avx2, __attribute__((target("avx2"))), Avx2Filter)
#endif
#undef METRICLOSS_SCAN

// The scan is the only hot loop written here rather than in MKL.  Its fp32 version is compiled for AVX-512, AVX2
// and the baseline, picked once at run time, so the package needs no -march flag; METRICLOSS_KNN_SIMD =
// "avx2" / "portable" forces a lower level (tests use it).  fp64 (exactness) always uses the portable filter.
template <typename Top>
void scan(const float* scores, const float* offsets, int64_t nq, int64_t nr, int64_t q0, int64_t r0,
          bool exclude_self, Top* tops) {
  static const ScanFn<Top> fn = [] {
#ifdef METRICLOSS_X86_FILTERS
    const char* forced = std::getenv("METRICLOSS_KNN_SIMD");
    const std::string level = forced == nullptr ? "avx512" : forced;
    if (level == "avx512" && __builtin_cpu_supports("avx512f")) return ScanFn<Top>{scan_avx512<Top>};
    if ((level == "avx512" || level == "avx2") && __builtin_cpu_supports("avx2")) return ScanFn<Top>{scan_avx2<Top>};
#endif
    return ScanFn<Top>{scan_portable<Top>};
  }();
  fn(scores, offsets, nq, nr, q0, r0, exclude_self, tops);
}

template <typename Top>
void scan(const double* scores, const double* offsets, int64_t nq, int64_t nr, int64_t q0, int64_t r0,
          bool exclude_self, Top* tops) {
  scan_block<double, kScansOffsets<Top>, PortableFilter>(scores, offsets, nq, nr, q0, r0, exclude_self, tops);
}

// q [Q, D], r [R, D]: contiguous, prepared for the metric (see the file comment).  offsets: [R] for a Window
// (euclidean), else nullptr.  make_top(slots, query) builds a query's selection over its `capacity` slots.
// Writes values (what Top::finish emits: T for TopK, fp64 squared distances for a Window) / indices [Q, k].
template <typename T, typename Top, typename V, typename MakeTop>
void knn_blocked(const at::Tensor& q, const at::Tensor& r, const T* offsets, int64_t k, int64_t capacity,
                 bool exclude_self, MakeTop make_top, V* out_values, int64_t* out_indices) {
  const int64_t Q = q.size(0);
  const int64_t R = r.size(0);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Enough blocks for every thread, but no smaller than 16 rows (GEMM efficiency).
  const int64_t block_q = std::max<int64_t>(
      1, std::min(env_or("METRICLOSS_KNN_BLOCK_Q", 512), std::max<int64_t>(16, (Q + threads - 1) / threads)));
  const int64_t block_r = std::min(env_or("METRICLOSS_KNN_BLOCK_R", 512), R);
  const int64_t num_blocks = (Q + block_q - 1) / block_q;
  std::atomic<int64_t> next_block{0};

  at::parallel_for(0, std::min(threads, num_blocks), 1, [&](int64_t, int64_t) {
    // Worker threads do not inherit the caller's dispatch state; the inner ATen calls need no autograd.
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor scores = at::empty({block_q * block_r}, q.options());
    std::vector<Neighbour<T>> slots(block_q * capacity);
    std::vector<Top> tops;
    tops.reserve(block_q);
    for (int64_t b = next_block++; b < num_blocks; b = next_block++) {
      const int64_t q0 = b * block_q;
      const int64_t nq = std::min(block_q, Q - q0);
      tops.clear();
      for (int64_t i = 0; i < nq; ++i) tops.push_back(make_top(slots.data() + i * capacity, q0 + i));
      const at::Tensor q_block = q.narrow(0, q0, nq);
      for (int64_t r0 = 0; r0 < R; r0 += block_r) {
        const int64_t nr = std::min(block_r, R - r0);
        at::Tensor s = scores.narrow(0, 0, nq * nr).view({nq, nr});
        at::mm_out(s, q_block, r.narrow(0, r0, nr).t());
        scan(s.const_data_ptr<T>(), offsets == nullptr ? nullptr : offsets + r0, nq, nr, q0, r0, exclude_self,
             tops.data());
      }
      for (int64_t i = 0; i < nq; ++i) {
        V* values = out_values + (q0 + i) * k;
        int64_t* indices = out_indices + (q0 + i) * k;
        tops[i].finish([&](int64_t n, const Neighbour<V>& nb) {
          values[n] = nb.value;
          indices[n] = nb.index;
        });
      }
    }
  });
}

// Unit roundoff of the GEMM's inputs: torch.set_float32_matmul_precision("medium" / "high") lets oneDNN round
// fp32 operands to bf16 (8 significant bits) / tf32 (11).
double gemm_input_roundoff(at::ScalarType compute) {
  if (compute != at::kFloat) return 0.0;
  switch (at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL)) {
    case at::Float32Precision::BF16:
      return std::ldexp(1.0, -8);
    case at::Float32Precision::TF32:
      return std::ldexp(1.0, -11);
    default:
      return 0.0;
  }
}

// One pass over x [n, D]: out = scale (x - centre) and sq = ||x - centre||^2 summed in Acc.
template <typename T, typename Acc>
void centre_rows(const T* x, const T* centre, int64_t n, int64_t dim, T scale, T* out, Acc* sq) {
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      Acc sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < dim; ++j) {
        const T c = x[i * dim + j] - centre[j];
        out[i * dim + j] = scale * c;
        sum += static_cast<Acc>(c) * static_cast<Acc>(c);
      }
      sq[i] = sum;
    }
  });
}

// q [Q, D], r [R, D] contiguous in the compute dtype T (file comment, "Euclidean exactness").  Writes the
// indices [Q, k] and returns the distances [Q, k] in T.
template <typename T>
at::Tensor knn_euclidean(const at::Tensor& q, const at::Tensor& r, int64_t k, bool exclude_self, int64_t* indices) {
  const int64_t Q = q.size(0);
  const int64_t R = r.size(0);
  const int64_t D = q.size(1);
  // Any centre leaves the distances as they are and only sets rho: the mean of up to 1024 evenly spaced
  // reference rows lies within the data.
  const at::Tensor centre = r.slice(0, 0, R, std::max<int64_t>(1, R / 1024)).mean(0).contiguous();
  at::Tensor a2 = at::empty_like(q);  // 2 (q - c): exact, so the GEMM yields 2 a . b
  at::Tensor b = at::empty_like(r);
  at::Tensor centred_sq = at::empty({Q}, q.options().dtype(at::kDouble));
  at::Tensor offsets = at::empty({R}, r.options());
  centre_rows<T, double>(q.const_data_ptr<T>(), centre.const_data_ptr<T>(), Q, D, T(2), a2.data_ptr<T>(),
                         centred_sq.data_ptr<double>());
  centre_rows<T, T>(r.const_data_ptr<T>(), centre.const_data_ptr<T>(), R, D, T(1), b.data_ptr<T>(),
                    offsets.data_ptr<T>());

  // slack = 2E = 6 (gamma + w + 4u) rho^2 per query, inf where that overflows T (or gamma is not finite).
  const double u = std::numeric_limits<T>::epsilon() / 2;
  const double du = static_cast<double>(D) * u;
  const double gamma = du < 0.5 ? du / (1 - du) : std::numeric_limits<double>::infinity();
  const double factor = 6 * (gamma + gemm_input_roundoff(q.scalar_type()) + 4 * u);
  const double max_b = std::sqrt(static_cast<double>(offsets.max().item<T>()));
  at::Tensor slack = at::empty({Q}, q.options());
  const double* cs = centred_sq.const_data_ptr<double>();
  T* slack_data = slack.data_ptr<T>();
  for (int64_t i = 0; i < Q; ++i) {
    const double rho = std::sqrt(cs[i]) + max_b;
    const double value = factor * rho * rho;
    slack_data[i] = value <= std::numeric_limits<T>::max() ? static_cast<T>(value)
                                                           : std::numeric_limits<T>::infinity();
  }

  const EuclideanRows<T> rows{q.const_data_ptr<T>(), r.const_data_ptr<T>(), D, slack_data, cs};
  const int64_t capacity = 2 * k + kWindowSpare;
  at::Tensor squared = at::empty({Q, k}, q.options().dtype(at::kDouble));
  knn_blocked<T, Window<T>>(
      a2, b, offsets.const_data_ptr<T>(), k, capacity, exclude_self,
      [&](Neighbour<T>* slots, int64_t query) { return Window<T>(slots, k, capacity, rows, query); },
      squared.data_ptr<double>(), indices);
  // ATen's sqrt, as in the torch path: its fp64 result may differ from std::sqrt's in the last bit.
  return squared.sqrt().to(q.scalar_type());
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
  if (metric == Metric::kCosine) {
    q = q / q.norm(2, {1}, true).clamp_min(1e-12);
    r = r / r.norm(2, {1}, true).clamp_min(1e-12);
  }

  at::Tensor values;
  at::Tensor indices = at::empty({Q, k}, q.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(compute, "knn_cpu", [&] {
    if (metric == Metric::kEuclidean) {
      values = knn_euclidean<scalar_t>(q, r, k, exclude_self, indices.data_ptr<int64_t>());
    } else {
      values = at::empty({Q, k}, q.options());
      const int64_t capacity = k <= kHeapMaxK ? k : 2 * k;
      knn_blocked<scalar_t, TopK<scalar_t>>(
          q, r, nullptr, k, capacity, exclude_self,
          [&](Neighbour<scalar_t>* slots, int64_t) { return TopK<scalar_t>(slots, k, capacity); },
          values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>());
    }
  });
  return {values.to(queries.scalar_type()), indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(metricloss_kernels, CPU, m) {
  m.impl("knn", &knn_cpu);
}

}  // namespace metricloss_kernels
