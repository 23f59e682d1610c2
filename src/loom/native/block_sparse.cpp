// Block-sparse attention on CPU, forward and backward, fp32: loom's compiled kernel
// (loom.model.block_sparse_cpp drives it through ctypes; loom.native builds it).
//
// Every array is (batch, heads, S, d) with its own strides, d contiguous (Tensor4): the model's
// q, k and v are views of its projections, (batch, S, heads, d) in memory, and are read in
// place; the gradients are written in whatever layout the caller allocated. BH = batch x heads;
// head h = bh % H. cols[h][i] lists the key blocks query block i attends, ascending, -1 after
// the last (causal: blocks after i are skipped). Each query block is one job: its kept key
// blocks, taken as runs of consecutive blocks (a run is one strided span of keys: no gather),
// give a score tile S = Q_i K^T scale (block x kept x block, in the thread's cache), the future
// inside the diagonal block set to -inf, a row softmax, O_i = P V / rowsum. Only the log-sum-exp
// per query is kept for backward (as flash attention); backward recomputes P = exp(S - lse) per
// query block and
//   dP = dO V^T,  dS = P o (dP - rowsum(dO o O)),  dQ = dS K scale,  dK += dS^T Q scale,  dV += P^T dO.
// Work and memory follow the kept blocks; no tile leaves the thread's cache between passes.
//
// Threads (OpenMP, the process's runtime): forward over query blocks; backward over (batch, head)
// pairs, which own their dK and dV, or where there are fewer pairs than threads over query blocks
// with a private dK, dV per thread (dense arrays, so laid out as the caller's), summed at the end.
// Matrix products are the BLAS sgemm torch links (its address given to loom_init), one thread
// each inside the parallel region.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <omp.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// Fault in fresh output pages at once, split between the team's threads (call inside a parallel
// region, before anything writes them): `pages` holds `n` [start, end) address ranges, page-aligned,
// that loom.parallel.host_allocator.fresh_pages found to be fresh mappings advised huge pages. One
// MADV_POPULATE_WRITE per 2 MiB piece instead of a fault per 4 KiB page as the rows are written.
// Pieces are cut at 2 MiB boundaries, so each huge page is faulted by one thread: two threads
// faulting one huge page serialise (a piece straddling two huge pages cost 20 ms of a 31 ms call
// at 4k tokens). Before Linux 5.14 the call fails and the pages fault as before.
void populate(const int64_t* pages, int n) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  constexpr int64_t kPiece = int64_t(2) << 20;
  const auto first_piece = [](int64_t start) { return start / kPiece; };
  const auto pieces = [&](int r) { return (pages[2 * r + 1] - 1) / kPiece - first_piece(pages[2 * r]) + 1; };
  int64_t count = 0;
  for (int r = 0; r < n; ++r) count += pages[2 * r + 1] > pages[2 * r] ? pieces(r) : 0;
#pragma omp for schedule(static)
  for (int64_t c = 0; c < count; ++c) {
    int64_t left = c;
    for (int r = 0; r < n; ++r) {
      const int64_t here = pages[2 * r + 1] > pages[2 * r] ? pieces(r) : 0;
      if (left < here) {
        const int64_t piece = first_piece(pages[2 * r]) + left;
        const int64_t from = std::max(pages[2 * r], piece * kPiece), to = std::min(pages[2 * r + 1], (piece + 1) * kPiece);
        madvise(reinterpret_cast<void*>(from), static_cast<size_t>(to - from), MADV_POPULATE_WRITE);
        break;
      }
      left -= here;
    }
  }
#else
  (void)pages;
  (void)n;
#endif
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

// A (batch, heads, S, d) float array, d contiguous: element (b, h, t, e) at
// data[b * batch + h * head + t * token + e]. `token` is the row stride every product is given.
struct Tensor4 {
  float* data;
  int64_t batch, head, token;

  Tensor4(const float* p, const int64_t* strides)
      : data(const_cast<float*>(p)), batch(strides[0]), head(strides[1]), token(strides[2]) {}
  Tensor4(float* p, const Tensor4& like) : data(p), batch(like.batch), head(like.head), token(like.token) {}
  // The first of (batch x head) pair bh's rows from token t on.
  float* at(int64_t bh, int heads, int64_t t) const { return data + (bh / heads) * batch + (bh % heads) * head + t * token; }
  int ld() const { return static_cast<int>(token); }
};

// S (block x runs' keys, row stride ld) = Q_i K^T scale, the future of the diagonal block -inf.
// qi: the block's queries (row stride ldq); k: this pair's keys from token 0 (row stride ldk).
void scores(const Shape& s, const float* qi, int ldq, const float* k, int ldk, int row, const Runs& runs, int ld,
            float* S) {
  int col = 0;
  for (size_t r = 0; r < runs.start.size(); ++r) {
    const int keys = runs.length[r] * s.block;
    gemm('N', 'T', s.block, keys, s.d, s.scale, qi, ldq, k + static_cast<int64_t>(runs.start[r]) * s.block * ldk, ldk,
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

void forward(const Shape& s, const Tensor4& q, const Tensor4& k, const Tensor4& v, const int32_t* cols, int threads,
             const Tensor4& out, float* lse, const int64_t* fresh, int n_fresh) {
  const int64_t jobs = s.bh * s.blocks;
#pragma omp parallel num_threads(threads)
  {
    populate(fresh, n_fresh);
    const OneBlasThread one;
    std::vector<float> tile(static_cast<size_t>(s.block) * s.width * s.block), inverse(s.block);
    Runs runs;
#pragma omp for schedule(dynamic, 4)
    for (int64_t job = 0; job < jobs; ++job) {
      const int64_t bh = job / s.blocks;
      const int i = static_cast<int>(job % s.blocks);
      runs.of(cols + (static_cast<int64_t>(bh % s.heads) * s.blocks + i) * s.width, s.width, i, s.causal);
      const int ld = runs.blocks * s.block;
      const int64_t first = static_cast<int64_t>(i) * s.block;  // the block's first query
      const float* vb = v.at(bh, s.heads, 0);
      float* S = tile.data();
      scores(s, q.at(bh, s.heads, first), q.ld(), k.at(bh, s.heads, 0), k.ld(), i, runs, ld, S);
      float* lse_i = lse + bh * s.seq() + first;
      for (int a = 0; a < s.block; ++a) {
        float* row = S + static_cast<int64_t>(a) * ld;
        float top = kNegInf;
#pragma omp simd reduction(max : top)
        for (int c = 0; c < ld; ++c) top = row[c] > top ? row[c] : top;
        const float sum = exp_row(row, ld, top);
        lse_i[a] = top + std::log(sum);
        inverse[a] = 1.f / sum;
      }
      float* oi = out.at(bh, s.heads, first);
      int col = 0;
      for (size_t r = 0; r < runs.start.size(); ++r) {
        const int keys = runs.length[r] * s.block;
        gemm('N', 'N', s.block, s.d, keys, 1.f, S + col, ld, vb + static_cast<int64_t>(runs.start[r]) * s.block * v.token,
             v.ld(), r ? 1.f : 0.f, oi, out.ld());
        col += keys;
      }
      for (int a = 0; a < s.block; ++a) {
        const float w = inverse[a];
        float* o = oi + a * out.token;
#pragma omp simd
        for (int e = 0; e < s.d; ++e) o[e] *= w;
      }
    }
  }
}

// The arrays of one backward call: inputs, the output and its gradient, and the gradients written.
struct Grads {
  Tensor4 q, k, v, out, dout, dq, dk, dv;
  const float* lse;
};

// One query block's backward: its rows of dQ written, its key blocks' rows of dK and dV added to
// (dk, dv: this thread's, laid out as g.dk and g.dv).
struct Backward {
  const Shape& s;
  std::vector<float> tile, grad, delta;
  Runs runs;

  explicit Backward(const Shape& shape)
      : s(shape),
        tile(static_cast<size_t>(shape.block) * shape.width * shape.block),
        grad(tile.size()),
        delta(shape.block) {}

  void row(int64_t bh, int i, const Grads& g, const int32_t* cols, const Tensor4& dk, const Tensor4& dv) {
    runs.of(cols + (static_cast<int64_t>(bh % s.heads) * s.blocks + i) * s.width, s.width, i, s.causal);
    const int ld = runs.blocks * s.block;
    const int64_t first = static_cast<int64_t>(i) * s.block;
    const float *qi = g.q.at(bh, s.heads, first), *oi = g.out.at(bh, s.heads, first);
    const float* doi = g.dout.at(bh, s.heads, first);
    const float *kb = g.k.at(bh, s.heads, 0), *vb = g.v.at(bh, s.heads, 0);
    float *dkb = dk.at(bh, s.heads, 0), *dvb = dv.at(bh, s.heads, 0), *dqi = g.dq.at(bh, s.heads, first);
    const float* lse_i = g.lse + bh * s.seq() + first;
    for (int a = 0; a < s.block; ++a) {  // rowsum(dO o O)
      const float *x = doi + a * g.dout.token, *y = oi + a * g.out.token;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int e = 0; e < s.d; ++e) sum += x[e] * y[e];
      delta[a] = sum;
    }
    float *P = tile.data(), *dS = grad.data();
    scores(s, qi, g.q.ld(), kb, g.k.ld(), i, runs, ld, P);
    for (int a = 0; a < s.block; ++a) exp_row(P + static_cast<int64_t>(a) * ld, ld, lse_i[a]);
    int col = 0;
    for (size_t r = 0; r < runs.start.size(); ++r) {  // dP = dO V^T
      const int keys = runs.length[r] * s.block;
      gemm('N', 'T', s.block, keys, s.d, 1.f, doi, g.dout.ld(), vb + runs.start[r] * s.block * g.v.token, g.v.ld(), 0.f,
           dS + col, ld);
      col += keys;
    }
    for (int a = 0; a < s.block; ++a) {  // dS = P o (dP - delta)
      const float* p = P + static_cast<int64_t>(a) * ld;
      float* dsa = dS + static_cast<int64_t>(a) * ld;
      const float da = delta[a];
#pragma omp simd
      for (int c = 0; c < ld; ++c) dsa[c] = p[c] * (dsa[c] - da);
    }
    col = 0;
    for (size_t r = 0; r < runs.start.size(); ++r) {
      const int keys = runs.length[r] * s.block;
      const int64_t key = static_cast<int64_t>(runs.start[r]) * s.block;  // the run's first key
      gemm('T', 'N', keys, s.d, s.block, 1.f, P + col, ld, doi, g.dout.ld(), 1.f, dvb + key * dv.token,
           dv.ld());  // dV += P^T dO
      gemm('N', 'N', s.block, s.d, keys, s.scale, dS + col, ld, kb + key * g.k.token, g.k.ld(), r ? 1.f : 0.f, dqi,
           g.dq.ld());  // dQ = dS K scale
      gemm('T', 'N', keys, s.d, s.block, s.scale, dS + col, ld, qi, g.q.ld(), 1.f, dkb + key * dk.token,
           dk.ld());  // dK += dS^T Q scale
      col += keys;
    }
  }
};

// Zero pair bh's rows of x.
void zero_rows(const Shape& s, const Tensor4& x, int64_t bh) {
  for (int64_t t = 0; t < s.seq(); ++t) {
    float* row = x.at(bh, s.heads, t);
    std::fill(row, row + s.d, 0.f);
  }
}

void backward(const Shape& s, const Grads& g, const int32_t* cols, int threads, const int64_t* fresh, int n_fresh) {
  if (s.bh >= threads) {
#pragma omp parallel num_threads(threads)
    {
      populate(fresh, n_fresh);
      const OneBlasThread one;
      Backward step(s);
#pragma omp for schedule(dynamic, 1)
      for (int64_t bh = 0; bh < s.bh; ++bh) {
        zero_rows(s, g.dk, bh);
        zero_rows(s, g.dv, bh);
        for (int i = 0; i < s.blocks; ++i) step.row(bh, i, g, cols, g.dk, g.dv);
      }
    }
    return;
  }
  // dk and dv are dense (the caller's contract): their `total` elements from data on, in their
  // own order; each private copy is laid out the same, so the sum runs element by element.
  const int64_t total = s.bh * s.seq() * s.d;
  std::vector<float> spare(static_cast<size_t>(2 * total) * (threads - 1));  // thread 0 writes dk, dv themselves
#pragma omp parallel num_threads(threads)
  {
    populate(fresh, n_fresh);
    const OneBlasThread one;
    const int t = omp_get_thread_num();
    float* spare_k = t ? spare.data() + static_cast<int64_t>(t - 1) * 2 * total : nullptr;
    const Tensor4 mine_k = t ? Tensor4(spare_k, g.dk) : g.dk;
    const Tensor4 mine_v = t ? Tensor4(spare_k + total, g.dv) : g.dv;
    std::fill(mine_k.data, mine_k.data + total, 0.f);
    std::fill(mine_v.data, mine_v.data + total, 0.f);
    Backward step(s);
#pragma omp for schedule(dynamic, 4)
    for (int64_t job = 0; job < s.bh * s.blocks; ++job)
      step.row(job / s.blocks, static_cast<int>(job % s.blocks), g, cols, mine_k, mine_v);
#pragma omp for
    for (int64_t e = 0; e < total; ++e)
      for (int u = 1; u < omp_get_num_threads(); ++u) {
        g.dk.data[e] += spare[static_cast<size_t>(u - 1) * 2 * total + e];
        g.dv.data[e] += spare[static_cast<size_t>(u - 1) * 2 * total + total + e];
      }
  }
}

}  // namespace

extern "C" {

void loom_init(void* sgemm, void* local_threads) {
  blas_sgemm = reinterpret_cast<sgemm_t>(sgemm);
  blas_local_threads = reinterpret_cast<threads_t>(local_threads);
}

// strides: (batch, head, token) in elements for q, k, v, out, each (batch, heads, S, d) with d
// contiguous; lse is (batch x heads, S) contiguous. fresh: n_fresh [start, end) address ranges of
// the outputs to fault in first (populate).
void loom_block_sparse_forward(const float* q, const float* k, const float* v, const int32_t* cols,
                               const int64_t* strides, int64_t bh, int heads, int blocks, int width, int block, int d,
                               float scale, int causal, int threads, float* out, float* lse, const int64_t* fresh,
                               int n_fresh) {
  const Shape s{bh, heads, blocks, width, block, d, scale, causal != 0};
  forward(s, Tensor4(q, strides), Tensor4(k, strides + 3), Tensor4(v, strides + 6), cols, threads,
          Tensor4(out, strides + 9), lse, fresh, n_fresh);
}

// strides: (batch, head, token) for q, k, v, out, dout, dq, dk, dv; dk and dv dense (in any order).
void loom_block_sparse_backward(const float* q, const float* k, const float* v, const float* out, const float* lse,
                                const float* dout, const int32_t* cols, const int64_t* strides, int64_t bh, int heads,
                                int blocks, int width, int block, int d, float scale, int causal, int threads,
                                float* dq, float* dk, float* dv, const int64_t* fresh, int n_fresh) {
  const Shape s{bh, heads, blocks, width, block, d, scale, causal != 0};
  const Grads g{Tensor4(q, strides),      Tensor4(k, strides + 3),  Tensor4(v, strides + 6),
                Tensor4(out, strides + 9), Tensor4(dout, strides + 12), Tensor4(dq, strides + 15),
                Tensor4(dk, strides + 18), Tensor4(dv, strides + 21), lse};
  backward(s, g, cols, threads, fresh, n_fresh);
}
}
