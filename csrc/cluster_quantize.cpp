// cluster_quantize, CPU: per-cluster mean of the residual and the index of its nearest code (L2, lowest index on ties).
//
// Phase 1 (per image): sums in double over the members of each cluster, divided by the count (an empty cluster has
// mean 0, as the official clamp(count, min=1) gives).
// Phase 2 (per cluster): a float32 pass over the whole codebook scores s_v = |e_v|^2 - 2 r.e_v (|r|^2 is common to
// all codes), vectorised across codes, tracking the best and second-best score. When the two are closer than the
// float32 error bound, the cluster is rescored exactly in double precision, so the answer is the true nearest code
// (lowest index on exact ties) without paying double precision for every distance.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "checks.h"

namespace nvg {
namespace {

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

std::tuple<at::Tensor, at::Tensor> cluster_quantize_cpu(const at::Tensor& residual, const at::Tensor& labels,
                                                        int64_t num_clusters, const at::Tensor& codebook) {
  check_cluster_quantize(residual, labels, num_clusters, codebook);
  const int64_t B = residual.size(0), N = residual.size(1), C = residual.size(2), V = codebook.size(0);
  const int64_t n = num_clusters;
  const at::Tensor lab = labels.contiguous();
  {
    auto mm = at::aminmax(lab);
    const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < n, "cluster_quantize: labels must lie in [0, num_clusters = ", n, "), found values in [",
                lo, ", ", hi, "]");
  }
  const at::Tensor x = residual.to(at::kDouble).contiguous();
  const at::Tensor E64 = codebook.to(at::kDouble).contiguous();
  const at::Tensor Et32 = codebook.to(at::kFloat).t().contiguous();  // [C, V]: the fast pass walks codes contiguously
  const at::Tensor ee64 = E64.square().sum(1);
  const at::Tensor ee32 = ee64.to(at::kFloat);
  const double max_ee = ee64.max().item<double>();
  const double max_enorm = std::sqrt(max_ee);

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

  const float* Et = Et32.data_ptr<float>();
  const float* ee = ee32.data_ptr<float>();
  const double* E = E64.data_ptr<double>();
  const double* eed = ee64.data_ptr<double>();
  int64_t* ip = ids.data_ptr<int64_t>();
  // float32 rounding of s_v is below (C + 4) u (|e|^2 + 2 sum|r_c e_c|) with u = 2^-24; two scores can swap only if
  // they are within twice that.
  const double u = std::ldexp(1.0, -24);
  at::parallel_for(0, B * n, 16, [&](int64_t q0, int64_t q1) {
    std::vector<float> acc(V), r32(C);
    for (int64_t q = q0; q < q1; ++q) {
      const double* r = mp + q * C;
      double rnorm = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        r32[c] = static_cast<float>(r[c]);
        rnorm += r[c] * r[c];
      }
      rnorm = std::sqrt(rnorm);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t c = 0; c < C; ++c) {
        const float rc = r32[c];
        const float* ec = Et + c * V;
        for (int64_t v = 0; v < V; ++v) acc[v] += rc * ec[v];
      }
      float best = std::numeric_limits<float>::infinity(), second = best;
      int64_t arg = 0;
      for (int64_t v = 0; v < V; ++v) {
        const float s = ee[v] - 2.0f * acc[v];
        if (s < best) {
          second = best;
          best = s;
          arg = v;
        } else if (s < second) {
          second = s;
        }
      }
      // r was rounded to float32 too: include its relative error in the bound (|r - r32| <= u |r|).
      const double tol = 2.0 * (double(C) + 6.0) * u * (max_ee + 2.0 * rnorm * max_enorm) + 1e-30;
      if (!(double(second) - double(best) > tol)) arg = nearest_code_exact(r, E, eed, V, C);
      ip[q] = arg;
    }
  });
  return {ids, means64.to(residual.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(nvg, CPU, m) { m.impl("cluster_quantize", &cluster_quantize_cpu); }

}  // namespace nvg
