// Exact CPU attention over blocks of whole query rows, with what probability-level surgeries need from it.
//
// PyTorch's CPU flash kernel returns the output and the log-sum-exp, but a surgery like ACT also needs each key's
// received attention (column sums of the probabilities) and clipped softmax needs every row's final lse before
// it can touch a single probability. Both are one pass when a block holds whole rows: the block's scores come
// from one GEMM, each row is normalised while it is hot in cache, the column sums accumulate from it, and the
// value product is a second GEMM. Measured on one SmolLM2 layer's real q/k/v (2 threads, fp32): 0.87-1.00x flash at
// 2k-8k tokens with the column sums (docs/benchmarks-rowblock.md), where the same pass as torch ops costs 1.8-2.3x.
// Built with -fopenmp (attnsurgery/rowblock.py): without it the at::parallel_for below runs on one thread.
// Calls that need neither (MoH's routed rows) take key tiles with an online softmax instead (block_keys > 0), as
// flash attention does: a tile's scores stay in L2, and the routed-off rows are never packed into its GEMMs.
//
// Built on first use by attnsurgery/rowblock.py (torch.utils.cpp_extension); everything here has an exact
// torch fallback (attnsurgery.kernels.tiled_attention), which the tests compare it against.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <pmmintrin.h>
#include <xmmintrin.h>
#define ROWBLOCK_X86 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <vector>

// The BLAS PyTorch itself links (MKL on x86 wheels, OpenBLAS on others) exports the Fortran sgemm_.
extern "C" void sgemm_(const char*, const char*, const void*, const void*, const void*, const float*, const float*,
                       const void*, const float*, const void*, const float*, float*, const void*);

namespace {

// Far-off keys of a peaked row (sink heads, massive activations) give exp(s - max) below float's normal range;
// arithmetic on such subnormals takes a slow microcode path in the exp, the sums and the BLAS (measured: the kernel
// took 1.4x longer on SmolLM2's real activations at 8k tokens than on random ones). Flushing them to zero changes
// a probability by less than 1.2e-38. Set per worker thread for the kernel's duration, then restored.
class FlushDenormals {
 public:
  FlushDenormals() {
#ifdef ROWBLOCK_X86
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040);  // FTZ (bit 15) and DAZ (bit 6)
#endif
  }
  ~FlushDenormals() {
#ifdef ROWBLOCK_X86
    _mm_setcsr(saved_);
#endif
  }

 private:
  unsigned int saved_ = 0;
};

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Column-major C (m x n) = op(A) op(B) + beta C. Integers go as 64-bit values: an LP64 BLAS reads their low
// 32 bits (little-endian), an ILP64 one all 64, and both see the right number.
inline void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                 int64_t ldb, float beta, float* c, int64_t ldc) {
  const float one = 1.f;
  sgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
}

inline float row_max(const float* x, int64_t n) {
  Vec m(kNegInf);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) m = at::vec::maximum(m, Vec::loadu(x + j));
  float out = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, m);
  for (; j < n; ++j) out = std::max(out, x[j]);
  return out;
}

// x <- exp(x - shift); returns the sum. exp_u20 (a polynomial, up to 20 ulp) is the exp PyTorch's own CPU flash
// kernel uses: the stock op's rounding, 5-8% faster than Sleef's 1-ulp exp here.
inline float exp_sum(float* x, int64_t n, float shift) {
  Vec s(0.f), sh(shift);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec e = (Vec::loadu(x + j) - sh).exp_u20();
    e.store(x + j);
    s = s + e;
  }
  float out = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, s);
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    out += x[j];
  }
  return out;
}

// acc <- acc + a x
inline void axpy(float* acc, const float* x, int64_t n, float a) {
  Vec va(a);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(acc + j) + Vec::loadu(x + j) * va).store(acc + j);
  for (; j < n; ++j) acc[j] += a * x[j];
}

// x <- clamp(a x + b, 0, 1)
inline void clip(float* x, int64_t n, float a, float b) {
  Vec va(a), vb(b), zero(0.f), one(1.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) at::vec::clamp(Vec::loadu(x + j) * va + vb, zero, one).store(x + j);
  for (; j < n; ++j) x[j] = std::min(1.f, std::max(0.f, a * x[j] + b));
}

// One row's scores over a block's n keys, of which [a, e) are the row's visible range: keys outside it take no part
// in the value product (0), keys the mask hides inside it become -inf. Returns the max over the range (-inf when
// the row sees none of these keys). `visible`: the mask row at the block's first key, or null without a mask.
inline float mask_row(float* x, int64_t n, int64_t a, int64_t e, const bool* visible) {
  std::fill(x, x + a, 0.f);
  std::fill(x + e, x + n, 0.f);
  if (visible != nullptr)
    for (int64_t j = a; j < e; ++j)
      if (!visible[j]) x[j] = kNegInf;
  return e > a ? row_max(x + a, e - a) : kNegInf;
}

}  // namespace

// q (B, H, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv): fp32 with unit stride along the last dimension, any
//   other strides (a token's stride at least a row's width); H a multiple of Hkv (GQA). transformers hands over
//   views of its (B, T, H, D) projections: read in place, without a contiguous copy of each per layer.
// mask: none, or bool (B|1, 1, Tq, Tk) contiguous, true = visible. Without a mask, `causal` makes key j visible
//   from row i iff j <= i (SDPA's upper-left alignment); otherwise every key is visible.
// clip_heads: none, or bool (H,): on those heads the probabilities become clamp(clip_a p + clip_b, 0, 1).
// weights: none, or (B, Tq) fp32: also return the column sums sum_i weights[b, i] p[b, h, i, j] (B, H, Tk).
// active: none, or bool (B, H, Tq): only those (head, query) rows are computed; the others get out 0, lse +inf
//   and add nothing to the column sums (MoH's routed-off pairs, never computed).
// block_keys: 0 for whole rows; otherwise keys per tile of the online softmax (no weights, no clip_heads then).
// Returns out (B, H, Tq, Dv) fp32, a view of (B, Tq, H, Dv) memory (the layout transformers' attention functions
// return, so the caller's reshape is free), lse (B, H, Tq) fp32 and the column sums (undefined without weights). A
// row that sees no key gets out 0 and lse +inf, so a probability rebuilt from it as exp(s - lse) is 0.
std::vector<at::Tensor> rowblock_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                           const c10::optional<at::Tensor>& mask, bool causal, int64_t block_rows,
                                           const c10::optional<at::Tensor>& clip_heads, double clip_a, double clip_b,
                                           const c10::optional<at::Tensor>& weights,
                                           const c10::optional<at::Tensor>& active, int64_t block_keys) {
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 4 && t->stride(3) == 1 &&
                    t->stride(2) >= t->size(3),
                "rowblock_attention: q, k and v must be 4-d fp32 CPU tensors with unit stride along the last "
                "dimension and a token stride of at least a row");
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Tk = k.size(2), Dv = v.size(3);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && k.size(0) == B && v.size(0) == B && v.size(1) == Hkv &&
                  k.size(3) == D && v.size(2) == Tk,
              "rowblock_attention: mismatched q/k/v shapes");
  TORCH_CHECK(block_rows > 0, "rowblock_attention: block_rows must be positive");
  TORCH_CHECK(block_keys >= 0, "rowblock_attention: block_keys must be 0 (whole rows) or positive");
  const int64_t G = H / Hkv;
  const bool has_mask = mask.has_value() && mask->defined();
  const bool* mp = nullptr;
  int64_t mask_stride = 0;
  if (has_mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->dim() == 4 &&
                    (mask->size(0) == 1 || mask->size(0) == B) && mask->size(1) == 1 && mask->size(2) == Tq &&
                    mask->size(3) == Tk,
                "rowblock_attention: the mask must be a contiguous bool (B|1, 1, Tq, Tk) tensor");
    mp = mask->data_ptr<bool>();
    mask_stride = mask->size(0) == 1 ? 0 : Tq * Tk;
  }
  std::vector<char> clipped(H, 0);
  if (clip_heads.has_value() && clip_heads->defined()) {
    TORCH_CHECK(clip_heads->scalar_type() == at::kBool && clip_heads->numel() == H,
                "rowblock_attention: clip_heads must be bool (H,)");
    auto ch = clip_heads->contiguous();
    for (int64_t h = 0; h < H; ++h) clipped[h] = ch.data_ptr<bool>()[h];
  }
  const bool want_cols = weights.has_value() && weights->defined();
  // key tiles (online softmax) give exact rows only: column sums and clipping need each row's final lse first
  TORCH_CHECK(block_keys == 0 || (!want_cols && std::none_of(clipped.begin(), clipped.end(), [](char c) { return c; })),
              "rowblock_attention: key tiles (block_keys > 0) cannot give column sums or clipped rows");
  at::Tensor w;
  if (want_cols) {
    w = weights->contiguous();
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.size(0) == B && w.size(1) == Tq,
                "rowblock_attention: weights must be fp32 (B, Tq)");
  }

  const bool* ap = nullptr;
  at::Tensor act;
  if (active.has_value() && active->defined()) {
    act = active->contiguous();
    TORCH_CHECK(act.scalar_type() == at::kBool && act.dim() == 3 && act.size(0) == B && act.size(1) == H &&
                    act.size(2) == Tq,
                "rowblock_attention: active must be bool (B, H, Tq)");
    ap = act.data_ptr<bool>();
  }
  auto out = ap != nullptr ? at::zeros({B, Tq, H, Dv}, q.options()) : at::empty({B, Tq, H, Dv}, q.options());
  auto lse = ap != nullptr ? at::full({B, H, Tq}, kInf, q.options()) : at::empty({B, H, Tq}, q.options());
  // Column sums: each chunk of work parallel_for hands a thread accumulates into its own buffer over the (batch,
  // kv-head) groups it covers (its units are contiguous, so about B x Hkv / threads + 1 groups); the buffers are
  // added in chunk order afterwards, so the sums do not depend on thread timing. Memory: about the output's size
  // plus one group per chunk, not a copy of the output per thread.
  auto cols = want_cols ? at::zeros({B, H, Tk}, q.options()) : at::Tensor();
  std::mutex partials_lock;
  std::map<int64_t, std::pair<int64_t, std::vector<float>>> partials;  // chunk start -> (first group, sums)
  const float* qp = q.data_ptr<float>();
  const int64_t qsB = q.stride(0), qsH = q.stride(1), qsT = q.stride(2);
  const int64_t ksB = k.stride(0), ksH = k.stride(1), ksT = k.stride(2);
  const int64_t vsB = v.stride(0), vsH = v.stride(1), vsT = v.stride(2);
  // out (B, Tq, H, Dv) memory: row (b, h, t) starts at ((b Tq + t) H + h) Dv
  auto out_row = [&](int64_t b, int64_t h, int64_t t) { return ((b * Tq + t) * H + h) * Dv; };
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* wp = want_cols ? w.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  float* cp = want_cols ? cols.data_ptr<float>() : nullptr;
  const int64_t nblocks = (Tq + block_rows - 1) / block_rows;
  const float fscale = float(scale), a_clip = float(clip_a), b_clip = float(clip_b);

  // The work: units u = (batch, kv head, row block), their blocks in the order described below. Each thread takes a
  // contiguous range of units; run_units does one range.
  const int64_t units = B * Hkv * nblocks;
  auto unit_block = [&](int64_t u) {  // the row block of unit u
    const int64_t w_ = u % nblocks;
    return (w_ % 2 == 0) ? w_ / 2 : nblocks - 1 - w_ / 2;
  };
  auto run_units = [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    FlushDenormals flush;
    const int64_t R = G * block_rows;
    const int64_t tile = block_keys > 0 ? std::min(block_keys, Tk) : Tk;
    std::vector<float> qs(R * D), s(R * std::max<int64_t>(tile, 1)), o(R * Dv), inv(R), row_m(R), alpha(R);
    std::vector<int64_t> lo(block_rows), hi(block_rows), row_g(R), row_i(R);
    const int64_t first_group = begin / nblocks;
    std::vector<float> local(want_cols ? ((end - 1) / nblocks - first_group + 1) * G * Tk : 0);
    for (int64_t u = begin; u < end; ++u) {
      // Under causality later row blocks cost more: early and late blocks alternate, so that ranges of units carry
      // similar work even before the split below weighs them.
      const int64_t bh = u / nblocks, blk = unit_block(u);
      const int64_t b = bh / Hkv, kv = bh % Hkv;
      const int64_t r0 = blk * block_rows, nr = std::min(Tq, r0 + block_rows) - r0;
      const bool* mb = has_mask ? mp + b * mask_stride : nullptr;
      // the block's rows: (head g of the group, query r0 + i) pairs, only the active ones (MoH's routed heads)
      int64_t rows = 0;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < nr; ++i)
          if (ap == nullptr || ap[((b * H + kv * G + g) * Tq) + r0 + i]) row_g[rows] = g, row_i[rows] = i, ++rows;
      if (rows == 0) continue;
      // each row's visible key range [lo, hi) (a mask's first and last visible key); the block reads their union
      int64_t k_lo = Tk, k_hi = 0;
      for (int64_t i = 0; i < nr; ++i) {
        if (ap != nullptr) {  // skip queries no head of this group attends from (their range would widen the block)
          bool used = false;
          for (int64_t g = 0; g < G && !used; ++g) used = ap[((b * H + kv * G + g) * Tq) + r0 + i];
          if (!used) {
            lo[i] = hi[i] = Tk;
            continue;
          }
        }
        int64_t l = 0, h = Tk;
        if (has_mask) {
          const bool* row = mb + (r0 + i) * Tk;
          while (l < Tk && !row[l]) ++l;
          while (h > l && !row[h - 1]) --h;
        } else if (causal) {
          h = std::min(Tk, r0 + i + 1);
        }
        lo[i] = l, hi[i] = h;
        if (h > l) k_lo = std::min(k_lo, l), k_hi = std::max(k_hi, h);
      }
      if (k_hi <= k_lo) k_lo = k_hi = 0;
      const int64_t nk = k_hi - k_lo;
      // the block's queries, pre-scaled
      for (int64_t r = 0; r < rows; ++r) {
        const float* src = qp + b * qsB + (kv * G + row_g[r]) * qsH + (r0 + row_i[r]) * qsT;
        float* dst = qs.data() + r * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * fscale;
      }
      float* group_cols = want_cols ? local.data() + (bh - first_group) * G * Tk : nullptr;
      const float* kb = kp + b * ksB + kv * ksH + k_lo * ksT;
      const float* vb = vp + b * vsB + kv * vsH + k_lo * vsT;
      if (block_keys > 0) {
        // Online softmax over key tiles (as flash attention): a tile's scores (rows x tile) stay in L2 where the
        // whole rows below stream through L3. Each row keeps its running max and sum; the accumulated output is
        // rescaled when the max grows, and normalised at the end.
        std::fill(o.begin(), o.begin() + rows * Dv, 0.f);
        std::fill(row_m.begin(), row_m.begin() + rows, kNegInf);
        std::fill(inv.begin(), inv.begin() + rows, 0.f);  // the running sums
        const int64_t ntiles = (nk + block_keys - 1) / block_keys;
        const int64_t step = ntiles > 0 ? (nk + ntiles - 1) / ntiles : 1;  // even tiles: no sliver of a GEMM
        for (int64_t c0 = 0; c0 < nk; c0 += step) {
          const int64_t n = std::min(nk, c0 + step) - c0;
          gemm('T', 'N', n, rows, D, kb + c0 * ksT, ksT, qs.data(), D, 0.f, s.data(), n);
          bool rescale = false;
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = row_i[r];
            float* x = s.data() + r * n;
            const int64_t a = std::clamp<int64_t>(lo[i] - k_lo - c0, 0, n);
            const int64_t e = std::clamp<int64_t>(hi[i] - k_lo - c0, a, n);
            const float m = mask_row(x, n, a, e, has_mask ? mb + (r0 + i) * Tk + k_lo + c0 : nullptr);
            alpha[r] = 1.f;
            if (m == kNegInf) {  // no visible key of this row in this tile
              std::fill(x + a, x + e, 0.f);
              continue;
            }
            const float top = std::max(row_m[r], m);
            if (row_m[r] != kNegInf && top > row_m[r]) alpha[r] = std::exp(row_m[r] - top), rescale = true;
            inv[r] = inv[r] * alpha[r] + exp_sum(x + a, e - a, top);
            row_m[r] = top;
          }
          if (rescale)
            for (int64_t r = 0; r < rows; ++r)
              if (alpha[r] != 1.f)
                for (int64_t d = 0; d < Dv; ++d) o[r * Dv + d] *= alpha[r];
          gemm('N', 'N', Dv, rows, n, vb + c0 * vsT, vsT, s.data(), n, 1.f, o.data(), Dv);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t head = kv * G + row_g[r], t = r0 + row_i[r], row = (b * H + head) * Tq + t;
          float* dst = op + out_row(b, head, t);
          const float* src = o.data() + r * Dv;
          if (inv[r] == 0.f) {  // the row sees no key
            std::fill(dst, dst + Dv, 0.f);
            lp[row] = kInf;
            continue;
          }
          const float f = 1.f / inv[r];
          for (int64_t d = 0; d < Dv; ++d) dst[d] = src[d] * f;
          lp[row] = row_m[r] + std::log(inv[r]);
        }
        continue;
      }
      // scores (rows x nk), row-major: s = qs @ k^T
      if (nk > 0) gemm('T', 'N', nk, rows, D, kb, ksT, qs.data(), D, 0.f, s.data(), nk);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = row_i[r], head = kv * G + row_g[r];
        float* x = s.data() + r * nk;
        // the row's visible range within the block's (a row that sees nothing has lo = hi = Tk: clamp to nk)
        const int64_t a = std::clamp<int64_t>(lo[i] - k_lo, 0, nk), e = std::clamp<int64_t>(hi[i] - k_lo, a, nk);
        const float m = mask_row(x, nk, a, e, has_mask ? mb + (r0 + i) * Tk + k_lo : nullptr);
        if (m == kNegInf) {  // the row sees no key
          std::fill(x + a, x + e, 0.f);
          lp[(b * H + head) * Tq + r0 + i] = kInf;
          inv[r] = 0.f;
          continue;
        }
        const float total = exp_sum(x + a, e - a, m);
        lp[(b * H + head) * Tq + r0 + i] = m + std::log(total);
        inv[r] = 1.f / total;
        if (want_cols) {
          const float wi = wp[b * Tq + r0 + i];
          if (wi != 0.f) axpy(group_cols + row_g[r] * Tk + k_lo + a, x + a, e - a, wi * inv[r]);
        }
        if (clipped[head]) {  // masked keys are exp(-inf) = 0 here; clamp(b) would give them b > 0
          clip(x + a, e - a, a_clip * inv[r], b_clip);
          if (has_mask && b_clip > 0.f) {
            const bool* row = mb + (r0 + i) * Tk + k_lo;
            for (int64_t j = a; j < e; ++j)
              if (!row[j]) x[j] = 0.f;
          }
          inv[r] = 1.f;
        }
      }
      // o (rows x Dv), row-major: o = p @ v
      if (nk > 0) gemm('N', 'N', Dv, rows, nk, vb, vsT, s.data(), nk, 0.f, o.data(), Dv);
      for (int64_t r = 0; r < rows; ++r) {
        float* dst = op + out_row(b, kv * G + row_g[r], r0 + row_i[r]);
        const float* src = o.data() + r * Dv;
        const float f = nk > 0 ? inv[r] : 0.f;
        for (int64_t d = 0; d < Dv; ++d) dst[d] = f == 0.f ? 0.f : src[d] * f;
      }
    }
    if (want_cols) {
      std::lock_guard<std::mutex> guard(partials_lock);
      partials.emplace(begin, std::make_pair(first_group, std::move(local)));
    }
  };

  // Split the units between threads by their estimated work (rows computed x keys each sees), not by count:
  // MoH's router sends most tokens to the same few heads, so whole kv groups have few active rows, and an even split
  // of the units left one thread idle for a third of the call. The estimate reads the causal rule (with a cache
  // offset where a mask is given), which padding masks follow closely; the split only moves work, never changes it.
  // Deterministic for a given input and thread count, as the column sums' fixed order needs.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), units));
  std::vector<int64_t> bounds(threads + 1, units);
  bounds[0] = 0;
  if (threads > 1) {
    std::vector<double> work(units + 1, 0.0);  // prefix sums of the units' estimated work
    const int64_t offset = has_mask ? Tk - Tq : 0;
    for (int64_t u = 0; u < units; ++u) {
      const int64_t bh = u / nblocks, b = bh / Hkv, kv = bh % Hkv, r0 = unit_block(u) * block_rows;
      const int64_t nr = std::min(Tq, r0 + block_rows) - r0;
      double cost = 0.0;
      for (int64_t i = 0; i < nr; ++i) {
        int64_t heads = G;
        if (ap != nullptr) {
          heads = 0;
          for (int64_t g = 0; g < G; ++g) heads += ap[(b * H + kv * G + g) * Tq + r0 + i];
        }
        const int64_t keys = (causal || has_mask) ? std::clamp<int64_t>(offset + r0 + i + 1, 1, Tk) : Tk;
        cost += double(heads) * double(keys + D);  // + D: a row's fixed share (its query, output, lse)
      }
      work[u + 1] = work[u] + cost;
    }
    for (int64_t t = 1, u = 0; t < threads; ++t) {
      const double target = work[units] * double(t) / double(threads);
      while (u < units && work[u + 1] <= target) ++u;
      // the boundary nearer the target: before unit u or after it
      const int64_t pick = (u < units && work[u + 1] - target < target - work[u]) ? u + 1 : u;
      bounds[t] = std::max(bounds[t - 1], pick);
    }
  }
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) run_units(bounds[t], bounds[t + 1]);
  });
  for (const auto& [start, partial] : partials) {  // cols (B, H, Tk) is (B x Hkv groups) x G x Tk
    const auto& [group, sums] = partial;
    axpy(cp + group * G * Tk, sums.data(), static_cast<int64_t>(sums.size()), 1.f);
  }
  return {out.transpose(1, 2), lse, cols};
}

// Gated attention's elementwise form at inference, in one pass: attn (N, C) *= scale * sigmoid(logits + bias), with
// N = batch x tokens rows of C = heads x head_dim channels, in place; returns each row's per-head mean gate (N, H).
// Torch ops make five passes over these (N, C) arrays (the bias copied into the GEMM's output, sigmoid, the scale,
// the product, the per-head mean): about 4% of a SmolLM2 prefill at 2k tokens on 2 cores, where the gate's GEMM
// itself is 4%. The sigmoid is PyTorch's vectorised formula, 1 / (1 + exp(-x)), on every element (row tails too).
at::Tensor gate_heads_(at::Tensor attn, const at::Tensor& logits, const at::Tensor& bias, double scale,
                       int64_t head_dim) {
  TORCH_CHECK(attn.dtype() == at::kFloat && logits.dtype() == at::kFloat && bias.dtype() == at::kFloat,
              "gate_heads_: float32 tensors only");
  TORCH_CHECK(attn.is_contiguous() && logits.is_contiguous() && bias.is_contiguous(), "gate_heads_: contiguous only");
  const int64_t C = bias.numel();
  TORCH_CHECK(C > 0 && head_dim > 0 && C % head_dim == 0, "gate_heads_: channels must be whole heads");
  TORCH_CHECK(attn.numel() == logits.numel() && attn.numel() % C == 0, "gate_heads_: attn and logits differ in size");
  const int64_t N = attn.numel() / C, H = C / head_dim;
  auto means = at::empty({N, H}, attn.options());
  float* ap = attn.data_ptr<float>();
  const float* lp = logits.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* mp = means.data_ptr<float>();
  const Vec one(1.f), zero(0.f), s(static_cast<float>(scale));
  const float inv_d = 1.f / static_cast<float>(head_dim);
  at::parallel_for(0, N, 16, [&](int64_t first, int64_t last) {
    for (int64_t n = first; n < last; ++n) {
      float* a = ap + n * C;
      const float* l = lp + n * C;
      for (int64_t h = 0; h < H; ++h) {
        Vec sum(0.f);
        for (int64_t d = h * head_dim; d < (h + 1) * head_dim; d += Vec::size()) {
          const int64_t count = std::min<int64_t>(Vec::size(), (h + 1) * head_dim - d);
          Vec x = Vec::loadu(l + d, count) + Vec::loadu(bp + d, count);
          Vec g = (one + (zero - x).exp()).reciprocal() * s;
          if (count < Vec::size()) g = Vec::set(zero, g, count);  // the lanes past the head add nothing
          sum = sum + g;
          (Vec::loadu(a + d, count) * g).store(a + d, count);
        }
        mp[n * H + h] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sum) * inv_d;
      }
    }
  });
  return means;
}

// How many threads a parallel_for of this module runs on (at::get_num_threads() where it was compiled with OpenMP;
// 1 where the pragma was compiled out): the tests' check that the kernel's own loop is parallel.
int64_t worker_threads() {
  const int64_t n = at::get_num_threads();
  std::vector<char> seen(n, 0);
  at::parallel_for(0, n, 1, [&](int64_t first, int64_t last) {
    const int64_t id = at::get_thread_num();
    if (id >= 0 && id < n) seen[id] = 1;
  });
  return std::count(seen.begin(), seen.end(), 1);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the calling convention's version: attnsurgery/rowblock.py refuses a build of another one (a process that
  // imported an older attnsurgery, then compiled a newer source on its first kernel call)
  m.attr("API") = 4;
  m.def("rowblock_attention", &rowblock_attention,
        "exact row-block attention with lse, column sums, clipping and skipped (head, query) rows");
  m.def("gate_heads_", &gate_heads_, "gated attention's elementwise gates applied in place; per-head mean gates");
  m.def("worker_threads", &worker_threads, "threads a parallel_for of this module runs on");
}
