// cluster_quantize, CPU: per-cluster mean of the residual and the index of its nearest code (L2, lowest index on ties).
//
// The codebook's derived arrays (double copy, norms, float32 tiles) come from nvg::cluster_quantize_prepare, computed
// once per codebook by the caller (the quantizer prepares once per forward for its 9 stage calls), or here when not
// given. validate=false skips the finiteness checks; on the CPU the label range is checked inline in any case.
// Phase 1 (per image): sums in double over the members of each cluster, divided by the count (an empty cluster has
// mean 0, as the official clamp(count, min=1) gives).
// Phase 2 (blocks of 4 clusters): a float32 pass over the whole codebook scores s_v = |e_v|^2 - 2 r.e_v (|r|^2 is common to
// all codes), vectorised across codes, tracking the best and second-best score. When the two are closer than the
// float32 error bound, the cluster is rescored exactly in double precision, so the answer is the true nearest code
// (lowest index on exact ties) without paying double precision for every distance.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "checks.h"

namespace nvg {
namespace {

constexpr int64_t kQB = 6;   // queries scored together: each codebook load feeds kQB FMAs
constexpr int64_t kVB = 16;  // codes per tile: kQB x kVB accumulators stay in (12 AVX2) vector registers
typedef float v8f __attribute__((vector_size(32)));  // GCC/Clang vector extension: AVX2 or two SSE registers

// Fast pass for kQB queries r32 [kQB, C] over all codes: s_v = |e_v|^2 - 2 r.e_v in float32, best and second best.
// Compiled twice (x86-64-v3 with AVX2+FMA, and baseline x86-64) and picked at load time, so the build stays portable.
// fp-contract=fast here only: this float32 pass may fuse (its error bound allows it); the exact paths may not.
__attribute__((target_clones("arch=x86-64-v3", "default"), optimize("fp-contract=fast")))
void score_block(const float* r32, int64_t C, const float* tiles, const float* ee, int64_t Vp, float* best,
                 float* second, int64_t* arg) {
  for (int64_t q = 0; q < kQB; ++q) {
    best[q] = second[q] = std::numeric_limits<float>::infinity();
    arg[q] = 0;
  }
  for (int64_t v0 = 0; v0 < Vp; v0 += kVB) {
    v8f acc[kQB][2] = {};
    const float* t = tiles + v0 * C;  // this tile: [C][kVB]
    for (int64_t c = 0; c < C; ++c) {
      v8f e0, e1;
      std::memcpy(&e0, t + c * kVB, sizeof(v8f));
      std::memcpy(&e1, t + c * kVB + 8, sizeof(v8f));
      for (int64_t q = 0; q < kQB; ++q) {
        const float rc = r32[q * C + c];
        acc[q][0] += rc * e0;
        acc[q][1] += rc * e1;
      }
    }
    v8f ee0, ee1;
    std::memcpy(&ee0, ee + v0, sizeof(v8f));
    std::memcpy(&ee1, ee + v0 + 8, sizeof(v8f));
    for (int64_t q = 0; q < kQB; ++q) {
      const v8f s0 = ee0 - 2.0f * acc[q][0], s1 = ee1 - 2.0f * acc[q][1];
      const v8f m = s0 < s1 ? s0 : s1;
      float lo = m[0];
      for (int j = 1; j < 8; ++j) lo = m[j] < lo ? m[j] : lo;
      if (!(lo < second[q])) continue;  // nothing in this tile can change the best or second best
      for (int64_t j = 0; j < kVB; ++j) {  // in index order: the lowest index wins exact float32 ties
        const float s = j < 8 ? s0[j] : s1[j - 8];
        if (s < best[q]) {
          second[q] = best[q];
          best[q] = s;
          arg[q] = v0 + j;
        } else if (s < second[q]) {
          second[q] = s;
        }
      }
    }
  }
}

int64_t nearest_code_exact(const double* r, const double* E, const double* ee, int64_t V, int64_t C) {
  double best = std::numeric_limits<double>::infinity();
  int64_t arg = 0;
  for (int64_t v = 0; v < V; ++v) {
    double dot = 0.0;
    for (int64_t c = 0; c < C; ++c) dot += r[c] * E[v * C + c];
    const double s = ee[v] - 2.0 * dot;
    if (s < best) {
      best = s;
      arg = v;
    }
  }
  return arg;
}

// Codebook preparation, once per codebook version (nvg::cluster_quantize_prepare): [E64 [V, C] double, ee64 [V]
// double (|e|^2 summed in channel order, as the CUDA kernel does, so the exact rescoring is bit-identical on both
// devices), tiles [Vp * C] float (kVB codes per tile, channel-major inside: [V/kVB][C][kVB]), ee_pad [Vp] float
// (padded codes score +inf), max_ee [] double].
std::vector<at::Tensor> prepare_cpu(const at::Tensor& codebook) {
  check_codebook(codebook);
  const int64_t V = codebook.size(0), C = codebook.size(1);
  const at::Tensor E64 = codebook.to(at::kDouble).contiguous();
  at::Tensor ee64 = at::empty({V}, E64.options());
  const double* e = E64.data_ptr<double>();
  double* eep = ee64.data_ptr<double>();
  for (int64_t v = 0; v < V; ++v) {
    double acc = 0.0;
    for (int64_t c = 0; c < C; ++c) acc += e[v * C + c] * e[v * C + c];
    eep[v] = acc;
  }
  const int64_t Vp = (V + kVB - 1) / kVB * kVB;
  const auto fopt = codebook.options().dtype(at::kFloat);
  at::Tensor tiles = at::zeros({Vp * C}, fopt);
  at::Tensor ee_pad = at::full({Vp}, std::numeric_limits<float>::infinity(), fopt);
  const at::Tensor E32 = codebook.to(at::kFloat).contiguous();
  const float* e32 = E32.data_ptr<float>();
  float* tp = tiles.data_ptr<float>();
  float* pp = ee_pad.data_ptr<float>();
  for (int64_t v = 0; v < V; ++v) {
    pp[v] = static_cast<float>(eep[v]);
    for (int64_t c = 0; c < C; ++c) tp[(v / kVB) * C * kVB + c * kVB + v % kVB] = e32[v * C + c];
  }
  return {E64, ee64, tiles, ee_pad, ee64.max()};
}

std::tuple<at::Tensor, at::Tensor> cluster_quantize_cpu(const at::Tensor& residual, const at::Tensor& labels,
                                                        int64_t num_clusters, const at::Tensor& codebook,
                                                        std::optional<at::TensorList> prepared_opt, bool validate) {
  check_cluster_quantize(residual, labels, num_clusters, codebook);
  const int64_t B = residual.size(0), N = residual.size(1), C = residual.size(2), V = codebook.size(0);
  const int64_t n = num_clusters;
  const int64_t Vp = (V + kVB - 1) / kVB * kVB;
  const at::Tensor lab = labels.contiguous();
  const at::Tensor x = residual.to(at::kDouble).contiguous();
  if (validate) {
    check_finite(x, "cluster_quantize", "residual");
    check_finite(codebook, "cluster_quantize", "codebook");
  }
  std::vector<at::Tensor> prep;
  if (prepared_opt.has_value()) {
    prep = prepared_opt.value().vec();
    check_prepared(prep, codebook, {{V, C}, {V}, {Vp * C}, {Vp}, {}},
                   {at::kDouble, at::kDouble, at::kFloat, at::kFloat, at::kDouble});
  } else {
    prep = prepare_cpu(codebook);
  }
  const double max_ee = prep[4].item<double>();  // a CPU scalar: no device sync
  const double max_enorm = std::sqrt(max_ee);
  const float* tiles = prep[2].data_ptr<float>();
  const float* ee_pad = prep[3].data_ptr<float>();

  at::Tensor means64 = at::zeros({B, n, C}, x.options());
  at::Tensor ids = at::empty({B, n}, labels.options());
  const double* xp = x.data_ptr<double>();
  const int64_t* lp = lab.data_ptr<int64_t>();
  double* mp = means64.data_ptr<double>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> count(n);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(count.begin(), count.end(), 0);
      double* m = mp + b * n * C;
      for (int64_t p = 0; p < N; ++p) {
        const int64_t l = lp[b * N + p];
        TORCH_CHECK(l >= 0 && l < n, "cluster_quantize: labels must lie in [0, num_clusters = ", n, "), found ", l,
                    " at [", b, ", ", p, "]");
        ++count[l];
        const double* xr = xp + (b * N + p) * C;
        for (int64_t c = 0; c < C; ++c) m[l * C + c] += xr[c];
      }
      for (int64_t l = 0; l < n; ++l) {
        if (count[l] > 1) {
          const double inv = 1.0 / double(count[l]);
          for (int64_t c = 0; c < C; ++c) m[l * C + c] *= inv;
        }
      }
    }
  });

  const double* E = prep[0].data_ptr<double>();
  const double* eed = prep[1].data_ptr<double>();
  int64_t* ip = ids.data_ptr<int64_t>();
  // float32 rounding of s_v is below (C + 4) u (|e|^2 + 2 |r| |e|) with u = 2^-24 (r itself is rounded to float32
  // too); two scores can swap order only if they are within twice that.
  const double u = std::ldexp(1.0, -24);
  const int64_t Q = B * n, num_blocks = (Q + kQB - 1) / kQB;
  at::parallel_for(0, num_blocks, 4, [&](int64_t blk0, int64_t blk1) {
    std::vector<float> r32(kQB * C);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t q0 = blk * kQB, qn = std::min<int64_t>(kQB, Q - q0);
      std::fill(r32.begin(), r32.end(), 0.0f);
      double rnorm[kQB] = {0.0};
      for (int64_t q = 0; q < qn; ++q) {
        for (int64_t c = 0; c < C; ++c) {
          const double rc = mp[(q0 + q) * C + c];
          r32[q * C + c] = static_cast<float>(rc);
          rnorm[q] += rc * rc;
        }
      }
      float best[kQB], second[kQB];
      int64_t arg[kQB];
      score_block(r32.data(), C, tiles, ee_pad, Vp, best, second, arg);
      for (int64_t q = 0; q < qn; ++q) {
        const double scale = max_ee + 2.0 * std::sqrt(rnorm[q]) * max_enorm;  // bounds |s_v| and its partial sums
        const double tol = 2.0 * (double(C) + 6.0) * u * scale + 1e-30;
        const double* r = mp + (q0 + q) * C;
        // scale >= 1e30: float32 could overflow (max 3.4e38) and the bound fails: always rescore exactly.
        const bool sure = scale < 1e30 && double(second[q]) - double(best[q]) > tol;
        ip[q0 + q] = sure ? arg[q] : nearest_code_exact(r, E, eed, V, C);
      }
    }
  });
  return {ids, means64.to(residual.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(nvg, CPU, m) {
  m.impl("cluster_quantize_prepare", &prepare_cpu);
  m.impl("cluster_quantize", &cluster_quantize_cpu);
}

}  // namespace nvg
