// Block-sparse attention on CPU, forward and backward, fp32: loom's compiled kernel
// (loom.model.block_sparse_native drives it through ctypes; loom.native builds it).
//
// Inputs are (BH, S, d) contiguous arrays, BH = batch x heads; head h = bh % H. cols[h][i] lists
// the key blocks query block i attends, ascending, -1 after the last (causal: blocks after i are
// skipped). Each query block is one job: its kept key blocks, taken as runs of consecutive
// blocks (a run is one contiguous span of keys: no gather), give a score tile
// S = Q_i K^T scale (block x kept x block, in the thread's cache), the future inside the diagonal
// block set to -inf, a row softmax, O_i = P V / rowsum. Only the log-sum-exp per query is kept
// for backward (as flash attention); backward recomputes P = exp(S - lse) per query block and
//   dP = dO V^T,  dS = P o (dP - rowsum(dO o O)),  dQ = dS K scale,  dK += dS^T Q scale,  dV += P^T dO.
// Work and memory follow the kept blocks; no tile leaves the thread's cache between passes.
//
// Threads (OpenMP, the process's runtime): forward over query blocks; backward over (batch, head)
// pairs, which own their dK and dV, or where there are fewer pairs than threads over query blocks
// with a private dK, dV per thread, summed at the end. Matrix products are the BLAS sgemm torch
// links (its address given to loom_init), one thread each inside the parallel region.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <omp.h>

namespace {

using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
using threads_t = int (*)(int);
sgemm_t blas_sgemm = nullptr;
threads_t blas_local_threads = nullptr;  // MKL's per-thread setting, where torch's BLAS is MKL

// One BLAS thread for the products inside a kernel thread (MKL's setting is the calling
// thread's own, and outlives the kernel): set on entry, the thread's own setting put back on
// exit, so torch's matmuls on the same threads (the caller's among them) keep their threads.
class OneBlasThread {
 public:
  OneBlasThread() : before_(blas_local_threads ? blas_local_threads(1) : 0) {}
  ~OneBlasThread() {
    if (blas_local_threads) blas_local_threads(before_);
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  int before_;
};

// Row-major C (M x N) = alpha op(A) op(B) + beta C, through column-major sgemm: C^T = op(B)^T op(A)^T.
inline void gemm(char ta, char tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb,
                 float beta, float* C, int ldc) {
  blas_sgemm(&tb, &ta, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// x[c] = exp(x[c] - shift) over a row, returning the sum: Cephes' polynomial for exp on
// [-ln2/2, ln2/2] after range reduction (about 1 ulp), written so the compiler vectorizes it;
// exp(-inf) (a masked score) is exactly 0.
inline float exp_row(float* x, int n, float shift) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int c = 0; c < n; ++c) {
    float t = x[c] - shift;
    const bool zero = t < -87.0f;
    t = zero ? -87.0f : t;
    const float m = std::nearbyint(t * 1.44269504088896341f);
    const float r = t - m * 0.693359375f + m * 2.12194440e-4f;  // t - m ln2, ln2 in two parts
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(m) + 127) << 23;  // 2^m
    float two_m;
    std::memcpy(&two_m, &bits, sizeof two_m);
    x[c] = zero ? 0.0f : y * two_m;
    sum += x[c];
  }
  return sum;
}

// The kept key blocks of one query block as runs of consecutive blocks: (first block, length).
struct Runs {
  std::vector<int> start, length;
  int blocks = 0;  // kept blocks in all

  void of(const int32_t* cols, int width, int row, bool causal) {
    start.clear();
    length.clear();
    blocks = 0;
    for (int t = 0; t < width && cols[t] >= 0; ++t) {
      if (causal && cols[t] > row) break;  // ascending: the rest are later still
      if (!start.empty() && start.back() + length.back() == cols[t]) {
        ++length.back();
      } else {
        start.push_back(cols[t]);
        length.push_back(1);
      }
      ++blocks;
    }
  }
};

struct Shape {
  int64_t bh;
  int heads, blocks, width, block, d;
  float scale;
  bool causal;
  int64_t seq() const { return static_cast<int64_t>(blocks) * block; }
};

// S (block x runs' keys, row stride ld) = Q_i K^T scale, the future of the diagonal block -inf.
void scores(const Shape& s, const float* qi, const float* k, int row, const Runs& runs, int ld, float* S) {
  int col = 0;
  for (size_t r = 0; r < runs.start.size(); ++r) {
    const int keys = runs.length[r] * s.block;
    gemm('N', 'T', s.block, keys, s.d, s.scale, qi, s.d, k + static_cast<int64_t>(runs.start[r]) * s.block * s.d, s.d,
         0.f, S + col, ld);
    if (s.causal && runs.start[r] + runs.length[r] - 1 == row) {  // the diagonal ends its run
      float* diag = S + col + keys - s.block;
      for (int a = 0; a + 1 < s.block; ++a) {
        float* future = diag + static_cast<int64_t>(a) * ld;
        std::fill(future + a + 1, future + s.block, kNegInf);
      }
    }
    col += keys;
  }
}

void forward(const Shape& s, const float* q, const float* k, const float* v, const int32_t* cols, int threads,
             float* out, float* lse) {
  const int64_t jobs = s.bh * s.blocks;
#pragma omp parallel num_threads(threads)
  {
    const OneBlasThread one;
    std::vector<float> tile(static_cast<size_t>(s.block) * s.width * s.block), inverse(s.block);
    Runs runs;
#pragma omp for schedule(dynamic, 4)
    for (int64_t job = 0; job < jobs; ++job) {
      const int64_t bh = job / s.blocks;
      const int i = static_cast<int>(job % s.blocks);
      runs.of(cols + (static_cast<int64_t>(bh % s.heads) * s.blocks + i) * s.width, s.width, i, s.causal);
      const int ld = runs.blocks * s.block;
      const int64_t first = bh * s.seq() + static_cast<int64_t>(i) * s.block;  // the block's first query
      const float* kb = k + bh * s.seq() * s.d;
      const float* vb = v + bh * s.seq() * s.d;
      float* S = tile.data();
      scores(s, q + first * s.d, kb, i, runs, ld, S);
      for (int a = 0; a < s.block; ++a) {
        float* row = S + static_cast<int64_t>(a) * ld;
        float top = kNegInf;
#pragma omp simd reduction(max : top)
        for (int c = 0; c < ld; ++c) top = row[c] > top ? row[c] : top;
        const float sum = exp_row(row, ld, top);
        lse[first + a] = top + std::log(sum);
        inverse[a] = 1.f / sum;
      }
      float* oi = out + first * s.d;
      int col = 0;
      for (size_t r = 0; r < runs.start.size(); ++r) {
        const int keys = runs.length[r] * s.block;
        gemm('N', 'N', s.block, s.d, keys, 1.f, S + col, ld, vb + static_cast<int64_t>(runs.start[r]) * s.block * s.d,
             s.d, r ? 1.f : 0.f, oi, s.d);
        col += keys;
      }
      for (int a = 0; a < s.block; ++a) {
        const float w = inverse[a];
#pragma omp simd
        for (int e = 0; e < s.d; ++e) oi[a * s.d + e] *= w;
      }
    }
  }
}

// One query block's backward: its rows of dQ written, its key blocks' rows of dK and dV added to.
struct Backward {
  const Shape& s;
  std::vector<float> tile, grad, delta;
  Runs runs;

  explicit Backward(const Shape& shape)
      : s(shape),
        tile(static_cast<size_t>(shape.block) * shape.width * shape.block),
        grad(tile.size()),
        delta(shape.block) {}

  void row(int64_t bh, int i, const float* q, const float* k, const float* v, const float* out, const float* lse,
           const float* dout, const int32_t* cols, float* dq, float* dk, float* dv) {
    runs.of(cols + (static_cast<int64_t>(bh % s.heads) * s.blocks + i) * s.width, s.width, i, s.causal);
    const int ld = runs.blocks * s.block;
    const int64_t first = bh * s.seq() + static_cast<int64_t>(i) * s.block;
    const float *qi = q + first * s.d, *oi = out + first * s.d, *doi = dout + first * s.d;
    const int64_t base = bh * s.seq() * s.d;  // this batch and head's keys, values and their gradients
    const float *kb = k + base, *vb = v + base;
    float *dkb = dk + base, *dvb = dv + base;
    for (int a = 0; a < s.block; ++a) {  // rowsum(dO o O)
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int e = 0; e < s.d; ++e) sum += doi[a * s.d + e] * oi[a * s.d + e];
      delta[a] = sum;
    }
    float *P = tile.data(), *dS = grad.data();
    scores(s, qi, kb, i, runs, ld, P);
    for (int a = 0; a < s.block; ++a) exp_row(P + static_cast<int64_t>(a) * ld, ld, lse[first + a]);
    int col = 0;
    for (size_t r = 0; r < runs.start.size(); ++r) {  // dP = dO V^T
      const int keys = runs.length[r] * s.block;
      gemm('N', 'T', s.block, keys, s.d, 1.f, doi, s.d, vb + static_cast<int64_t>(runs.start[r]) * s.block * s.d, s.d,
           0.f, dS + col, ld);
      col += keys;
    }
    for (int a = 0; a < s.block; ++a) {  // dS = P o (dP - delta)
      const float* p = P + static_cast<int64_t>(a) * ld;
      float* g = dS + static_cast<int64_t>(a) * ld;
      const float da = delta[a];
#pragma omp simd
      for (int c = 0; c < ld; ++c) g[c] = p[c] * (g[c] - da);
    }
    col = 0;
    for (size_t r = 0; r < runs.start.size(); ++r) {
      const int keys = runs.length[r] * s.block;
      const int64_t at = static_cast<int64_t>(runs.start[r]) * s.block * s.d;
      gemm('T', 'N', keys, s.d, s.block, 1.f, P + col, ld, doi, s.d, 1.f, dvb + at, s.d);  // dV += P^T dO
      gemm('N', 'N', s.block, s.d, keys, s.scale, dS + col, ld, kb + at, s.d, r ? 1.f : 0.f, dq + first * s.d,
           s.d);                                                                           // dQ = dS K scale
      gemm('T', 'N', keys, s.d, s.block, s.scale, dS + col, ld, qi, s.d, 1.f, dkb + at, s.d);  // dK += dS^T Q scale
      col += keys;
    }
  }
};

void backward(const Shape& s, const float* q, const float* k, const float* v, const float* out, const float* lse,
              const float* dout, const int32_t* cols, int threads, float* dq, float* dk, float* dv) {
  const int64_t per = s.seq() * s.d;  // one (batch, head)'s elements
  if (s.bh >= threads) {
#pragma omp parallel num_threads(threads)
    {
      const OneBlasThread one;
      Backward step(s);
#pragma omp for schedule(dynamic, 1)
      for (int64_t bh = 0; bh < s.bh; ++bh) {
        float *dkb = dk + bh * per, *dvb = dv + bh * per;
        std::fill(dkb, dkb + per, 0.f);
        std::fill(dvb, dvb + per, 0.f);
        for (int i = 0; i < s.blocks; ++i) step.row(bh, i, q, k, v, out, lse, dout, cols, dq, dk, dv);
      }
    }
    return;
  }
  const int64_t total = s.bh * per;
  std::vector<float> spare(static_cast<size_t>(2 * total) * (threads - 1));  // thread 0 writes dk, dv themselves
#pragma omp parallel num_threads(threads)
  {
    const OneBlasThread one;
    const int t = omp_get_thread_num();
    float* mine_k = t ? spare.data() + static_cast<int64_t>(t - 1) * 2 * total : dk;
    float* mine_v = t ? mine_k + total : dv;
    std::fill(mine_k, mine_k + total, 0.f);
    std::fill(mine_v, mine_v + total, 0.f);
    Backward step(s);
#pragma omp for schedule(dynamic, 4)
    for (int64_t job = 0; job < s.bh * s.blocks; ++job)
      step.row(job / s.blocks, static_cast<int>(job % s.blocks), q, k, v, out, lse, dout, cols, dq, mine_k, mine_v);
#pragma omp for
    for (int64_t e = 0; e < total; ++e)
      for (int u = 1; u < omp_get_num_threads(); ++u) {
        dk[e] += spare[static_cast<size_t>(u - 1) * 2 * total + e];
        dv[e] += spare[static_cast<size_t>(u - 1) * 2 * total + total + e];
      }
  }
}

}  // namespace

extern "C" {

void loom_init(void* sgemm, void* local_threads) {
  blas_sgemm = reinterpret_cast<sgemm_t>(sgemm);
  blas_local_threads = reinterpret_cast<threads_t>(local_threads);
}

void loom_block_sparse_forward(const float* q, const float* k, const float* v, const int32_t* cols, int64_t bh,
                               int heads, int blocks, int width, int block, int d, float scale, int causal,
                               int threads, float* out, float* lse) {
  const Shape s{bh, heads, blocks, width, block, d, scale, causal != 0};
  forward(s, q, k, v, cols, threads, out, lse);
}

void loom_block_sparse_backward(const float* q, const float* k, const float* v, const float* out, const float* lse,
                                const float* dout, const int32_t* cols, int64_t bh, int heads, int blocks, int width,
                                int block, int d, float scale, int causal, int threads, float* dq, float* dk,
                                float* dv) {
  const Shape s{bh, heads, blocks, width, block, d, scale, causal != 0};
  backward(s, q, k, v, out, lse, dout, cols, threads, dq, dk, dv);
}
}
