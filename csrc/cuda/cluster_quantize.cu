// cluster_quantize, CUDA: per-cluster means of the residual and the index of each mean's nearest code (L2, lowest index
// on exact ties), with the semantics of csrc/cluster_quantize.cpp (the specification).
//
// Kernel 1, means (one block per image, one warp per cluster, lanes over channels): the warp walks the positions in
// order, 32 at a time; a ballot finds this cluster's members among them, and each lane adds the members' values of
// its channel one after the other, in double. So sum[l][c] is the CPU kernel's sum in position order, bit for bit;
// mean = sum * (1 / count) when count > 1 (as the CPU kernel rounds it), the sum itself when count is 1, and 0 for an
// empty cluster. It writes the double means (returned, cast to the residual's dtype like the CPU kernel does), their
// float32 copy for the search, and |mean| (for the error bound). Cost O(num_clusters * N) ballots per image: nothing
// at the method's sizes (N = 256, up to 256 clusters), quadratic for very large N with as many clusters.
//
// Kernel 2, nearest code, without a distance tensor in global memory. Score s_v = |e_v|^2 - 2 r.e_v (|r|^2 is common
// to all codes). One block of 256 threads takes 128 queries (cluster means) and walks the whole codebook in tiles of
// 128 codes staged in shared memory, channel-major ([C][128], |e|^2 beside it); each thread owns an 8 x 8 register
// tile (queries ty*4+{0..3} and 64+ty*4+{0..3}, codes tx*4+{0..3} and 64+tx*4+{0..3}: 16-byte shared loads, no bank
// conflicts) and accumulates r.e in float32 with FMAs, then keeps, per query, the best score, the second best and the
// best code. Its codes come in increasing index order, so strict < keeps the lowest index among equal scores; the 16
// threads that share a query merge (best, second, index) triples with shuffles (best by (score, index), second = the
// second smallest of the union, duplicates counted). Queries whose best and second best are not further apart than
// the float32 error bound (the CPU kernel's: 2 (C + 6) u (max |e|^2 + 2 |r| max |e|) + 1e-30, u = 2^-24) are rescored
// exactly as the CPU kernel does it: one warp per query, lanes over codes, dot = sum_c r_c e_c in double in channel
// order with separate roundings (no FMA), s = |e|^2 - 2 dot, strict < from +inf, lowest index on ties, 0 when no score
// is below +inf. Outside that band the float32 winner is the true nearest code, as is the CPU kernel's. The bound
// assumes no float32 overflow: when max |e|^2 + 2 |r| max |e| >= 1e30 the query is always rescored exactly (the CPU
// kernel lacks this guard; the two differ only there, where its float32 pass can overflow).
//
// Equality with the CPU kernel: the means are bit-identical. The ids are identical whenever the nearest code is
// separated from the others by more than double rounding (~C * 2^-53 relative): both kernels then return the true
// nearest code, lowest index on exact ties. Inside that band both return the minimum of double-rounded scores, which
// agree only if |e|^2 is summed in the same order on both sides: here it is summed in channel order (the CPU kernel
// lets torch's sum choose its order).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"

namespace nvg {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kNone = 0x7fffffff;

constexpr int kMeanThreads = 256;  // kernel 1: 8 warps per image
constexpr int kThreads = 256;      // kernel 2: 16 x 16 threads
constexpr int kQT = 128;           // queries per block
constexpr int kVT = 128;           // codes per tile
constexpr int kKC = 32;            // channels per shared-memory chunk
constexpr int kQS = kQT + 4;       // padded row of the query tile (keeps rows 16-byte aligned)

__device__ __forceinline__ double inf_d() { return __longlong_as_double(0x7ff0000000000000LL); }
__device__ __forceinline__ float inf_f() { return __int_as_float(0x7f800000); }

// Kernel 1: x [B, N, C] (any floating type), labels [B, N] in [0, n) -> means64 [B*n, C], means32 [Qpad, C] (rows
// below B*n), rnorm [B*n] = |mean|.
template <typename scalar_t>
__global__ void __launch_bounds__(kMeanThreads)
    cluster_means_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ labels, int N, int C, int n,
                         double* __restrict__ means64, float* __restrict__ means32, double* __restrict__ rnorm) {
  constexpr int kWarps = kMeanThreads / kWarp;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t b = blockIdx.x;
  const int64_t* lb = labels + b * N;
  const scalar_t* xb = x + b * N * C;
  for (int l = warp; l < n; l += kWarps) {  // warp-uniform: the ballots below see all 32 lanes
    const int64_t q = b * n + l;
    double sq = 0.0;
    for (int c0 = 0; c0 < C; c0 += kWarp) {
      const int c = c0 + lane;
      double acc = 0.0;
      int count = 0;
      for (int p0 = 0; p0 < N; p0 += kWarp) {
        const int p = p0 + lane;
        unsigned mask = __ballot_sync(kFullMask, p < N && lb[p] == l);
        count += __popc(mask);
        while (mask) {  // members in position order; mask is the same in every lane
          const int bit = __ffs(mask) - 1;
          mask &= mask - 1;
          if (c < C) acc = __dadd_rn(acc, static_cast<double>(xb[int64_t(p0 + bit) * C + c]));
        }
      }
      if (count > 1) acc = __dmul_rn(acc, __ddiv_rn(1.0, double(count)));
      if (c < C) {
        means64[q * C + c] = acc;
        means32[q * C + c] = __double2float_rn(acc);
        sq += acc * acc;  // only feeds the error bound: order and rounding do not matter here
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(kFullMask, sq, off);
    if (lane == 0) rnorm[q] = sqrt(sq);
  }
}

// |e_v|^2 in double, channels in order, separate roundings: the norms of the exact rescoring.
__global__ void code_norms_kernel(const double* __restrict__ E64, int V, int C, double* __restrict__ ee64) {
  const int v = blockIdx.x * blockDim.x + threadIdx.x;
  if (v >= V) return;
  double s = 0.0;
  for (int c = 0; c < C; ++c) {
    const double e = E64[int64_t(v) * C + c];
    s = __dadd_rn(s, __dmul_rn(e, e));
  }
  ee64[v] = s;
}

// Kernel 2. means32 [Qpad][C], Et32 [C][Vpad] and ee32 [Vpad] (padded codes: 0 and +inf, so they never win),
// means64 [Q][C], rnorm [Q], E64t [C][V], ee64 [V], max_ee: a device scalar (max |e|^2) -> ids [Q].
__global__ void __launch_bounds__(kThreads, 2)
    nearest_code_kernel(const float* __restrict__ means32, const double* __restrict__ means64,
                        const double* __restrict__ rnorm, const float* __restrict__ Et32,
                        const float* __restrict__ ee32, const double* __restrict__ E64t,
                        const double* __restrict__ ee64, const double* __restrict__ max_ee_ptr, int64_t Q, int C,
                        int V, int Vpad, int64_t* __restrict__ ids) {
  __shared__ __align__(16) float sQ[kKC][kQS];
  __shared__ __align__(16) float sE[kKC][kVT];
  __shared__ float sEE[2][kVT];  // double-buffered by tile parity: read in the epilogue while the next tile loads
  __shared__ int exact_list[kQT];
  __shared__ int exact_len;

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;  // lanes 0-15 of a warp share ty, so share queries
  const int lane = tid % kWarp, warp = tid / kWarp;
  const int64_t q0 = int64_t(blockIdx.x) * kQT;
  const bool resident = C <= kKC;  // the whole query tile stays in shared memory

  auto load_queries = [&](int c0, int kc) {
    for (int t = tid; t < kQT * kc; t += kThreads) {
      const int ql = t / kc, c = t % kc;
      sQ[c][ql] = means32[(q0 + ql) * C + c0 + c];
    }
  };

  float best[8], second[8];
  int arg[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    best[i] = second[i] = inf_f();
    arg[i] = kNone;
  }
  if (tid == 0) exact_len = 0;
  if (resident) load_queries(0, C);  // visible after the first __syncthreads below

  for (int v0 = 0, tile = 0; v0 < Vpad; v0 += kVT, ++tile) {
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
    float* see = sEE[tile & 1];
    for (int t = tid; t < kVT; t += kThreads) see[t] = ee32[v0 + t];
    __syncthreads();  // see is visible below even when C == 0 (no chunk loop)
    for (int c0 = 0; c0 < C; c0 += kKC) {
      const int kc = min(kKC, C - c0);
      if (!resident) load_queries(c0, kc);
      for (int t = tid; t < kc * (kVT / 4); t += kThreads) {
        const int row = t / (kVT / 4), col = (t % (kVT / 4)) * 4;
        *reinterpret_cast<float4*>(&sE[row][col]) =
            *reinterpret_cast<const float4*>(Et32 + int64_t(c0 + row) * Vpad + v0 + col);
      }
      __syncthreads();
#pragma unroll 4
      for (int c = 0; c < kc; ++c) {
        const float4 a0 = *reinterpret_cast<const float4*>(&sQ[c][ty * 4]);
        const float4 a1 = *reinterpret_cast<const float4*>(&sQ[c][64 + ty * 4]);
        const float4 e0 = *reinterpret_cast<const float4*>(&sE[c][tx * 4]);
        const float4 e1 = *reinterpret_cast<const float4*>(&sE[c][64 + tx * 4]);
        const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        const float e[8] = {e0.x, e0.y, e0.z, e0.w, e1.x, e1.y, e1.z, e1.w};
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], e[j], acc[i][j]);
      }
      __syncthreads();  // sE and (if not resident) sQ are overwritten next
    }
    // Scores of this tile, codes in increasing index order (j = 0..3 then 4..7).
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int vl = j < 4 ? tx * 4 + j : 64 + tx * 4 + (j - 4);
      const float ee = see[vl];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float s = fmaf(-2.0f, acc[i][j], ee);
        if (s < best[i]) {
          second[i] = best[i];
          best[i] = s;
          arg[i] = v0 + vl;
        } else if (s < second[i]) {
          second[i] = s;
        }
      }
    }
  }

  // Merge the 16 partial (best, second, arg) triples of each query: lanes tx = 0..15 of the same half-warp.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) {
      const float ob = __shfl_xor_sync(kFullMask, best[i], off);
      const float os = __shfl_xor_sync(kFullMask, second[i], off);
      const int oa = __shfl_xor_sync(kFullMask, arg[i], off);
      if (ob < best[i] || (ob == best[i] && oa < arg[i])) {
        second[i] = best[i] < os ? best[i] : os;
        best[i] = ob;
        arg[i] = oa;
      } else {
        second[i] = second[i] < ob ? second[i] : ob;
      }
    }
  }
  if (tx == 0) {
    const double u = 1.0 / 16777216.0;  // 2^-24
    const double max_ee = *max_ee_ptr, max_enorm = sqrt(max_ee);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int ql = i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4);
      const int64_t q = q0 + ql;
      if (q < Q) {
        const double scale = max_ee + 2.0 * rnorm[q] * max_enorm;  // bounds |s_v| and every partial sum
        const double tol = 2.0 * (double(C) + 6.0) * u * scale + 1e-30;
        // scale < 1e30: float32 cannot overflow (max 3.4e38), so the bound holds; beyond, always rescore.
        if (scale < 1e30 && arg[i] != kNone && double(second[i]) - double(best[i]) > tol) {
          ids[q] = arg[i];
        } else {
          exact_list[atomicAdd(&exact_len, 1)] = ql;
        }
      }
    }
  }
  __syncthreads();

  // Exact rescoring of the near ties: one warp per query, lanes over codes.
  const int n_exact = exact_len;
  const double kInf = inf_d();
  for (int k = warp; k < n_exact; k += kThreads / kWarp) {  // warp-uniform loop
    const int64_t q = q0 + exact_list[k];
    const double* r = means64 + q * C;
    double lb = kInf;
    int la = kNone;
    for (int v = lane; v < V; v += kWarp) {  // increasing v per lane: strict < keeps the lowest index
      double dot = 0.0;
      for (int c = 0; c < C; ++c) dot = __dadd_rn(dot, __dmul_rn(r[c], E64t[int64_t(c) * V + v]));
      const double s = __dsub_rn(ee64[v], __dmul_rn(2.0, dot));
      if (s < lb) {
        lb = s;
        la = v;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const double ob = __shfl_xor_sync(kFullMask, lb, off);
      const int oa = __shfl_xor_sync(kFullMask, la, off);
      if (ob < lb || (ob == lb && oa < la)) {
        lb = ob;
        la = oa;
      }
    }
    if (lane == 0) ids[q] = la == kNone ? 0 : la;  // no score below +inf: code 0, as the CPU kernel
  }
}

// Codebook preparation, once per codebook version (nvg::cluster_quantize_prepare on CUDA): [E64t [C, V] double
// (transposed), ee64 [V] double (|e|^2 in channel order), Et32 [C, Vpad] float (padded codes 0), ee32 [Vpad] float
// (padded codes +inf), max_ee [] double on the device]. Device work only: no host sync, capturable in a CUDA graph.
std::vector<at::Tensor> prepare_cuda(const at::Tensor& codebook) {
  check_codebook(codebook);
  TORCH_CHECK(codebook.is_cuda(), "cluster_quantize_prepare: the CUDA kernel got a codebook on ", codebook.device());
  const c10::cuda::CUDAGuard device_guard(codebook.device());
  const int64_t V = codebook.size(0), C = codebook.size(1);
  TORCH_CHECK(C <= std::numeric_limits<int32_t>::max() && V <= std::numeric_limits<int32_t>::max() - 2 * kVT,
              "cluster_quantize_prepare: V = ", V, ", C = ", C, " exceed the CUDA kernel's 32-bit index range");
  const auto dopt = codebook.options().dtype(at::kDouble), fopt = codebook.options().dtype(at::kFloat);
  const at::Tensor E64 = codebook.to(at::kDouble).contiguous();
  at::Tensor ee64 = at::empty({V}, dopt);
  code_norms_kernel<<<unsigned((V + 255) / 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      E64.data_ptr<double>(), int(V), int(C), ee64.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t Vpad = (V + kVT - 1) / kVT * kVT;
  at::Tensor Et32 = at::zeros({C, Vpad}, fopt);
  Et32.narrow(1, 0, V).copy_(codebook.t());
  at::Tensor ee32 = at::full({Vpad}, std::numeric_limits<float>::infinity(), fopt);
  ee32.narrow(0, 0, V).copy_(ee64);
  return {E64.t().contiguous(), ee64, Et32, ee32, ee64.max()};
}

std::tuple<at::Tensor, at::Tensor> cluster_quantize_cuda(const at::Tensor& residual, const at::Tensor& labels,
                                                         int64_t num_clusters, const at::Tensor& codebook,
                                                         std::optional<at::TensorList> prepared_opt, bool validate) {
  check_cluster_quantize(residual, labels, num_clusters, codebook);
  TORCH_CHECK(residual.is_cuda(), "cluster_quantize: the CUDA kernel got tensors on ", residual.device());
  const c10::cuda::CUDAGuard device_guard(residual.device());
  const int64_t B = residual.size(0), N = residual.size(1), C = residual.size(2), V = codebook.size(0);
  const int64_t n = num_clusters;
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(N <= kIntMax && C <= kIntMax && n <= kIntMax && V <= kIntMax - 2 * kVT,
              "cluster_quantize: sizes N = ", N, ", C = ", C, ", num_clusters = ", n, ", V = ", V,
              " exceed the CUDA kernel's 32-bit index range");
  const at::Tensor lab = labels.contiguous();
  const at::Tensor x = residual.contiguous();
  if (validate) {  // two device-to-host syncs. Unvalidated, a label outside [0, n) joins no cluster (kernel 1)
    auto mm = at::aminmax(lab);
    const at::Tensor lohi = at::stack({std::get<0>(mm), std::get<1>(mm)}).cpu();  // one device-to-host copy
    const int64_t lo = lohi[0].item<int64_t>(), hi = lohi[1].item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < n, "cluster_quantize: labels must lie in [0, num_clusters = ", n,
                "), found values in [", lo, ", ", hi, "]");
    check_finite(x, "cluster_quantize", "residual");
    check_finite(codebook, "cluster_quantize", "codebook");
  }
  const int64_t Vpad = (V + kVT - 1) / kVT * kVT;
  std::vector<at::Tensor> prep;
  if (prepared_opt.has_value()) {
    prep = prepared_opt.value().vec();
    check_prepared(prep, codebook, {{C, V}, {V}, {C, Vpad}, {Vpad}, {}},
                   {at::kDouble, at::kDouble, at::kFloat, at::kFloat, at::kDouble});
  } else {
    prep = prepare_cuda(codebook);
  }
  const at::Tensor &E64t = prep[0], &ee64 = prep[1], &Et32 = prep[2], &ee32 = prep[3], &max_ee = prep[4];
  const auto dopt = residual.options().dtype(at::kDouble), fopt = residual.options().dtype(at::kFloat);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Means.
  const int64_t Q = B * n, Qpad = (Q + kQT - 1) / kQT * kQT;
  at::Tensor means64 = at::empty({B, n, C}, dopt);
  at::Tensor means32 = at::empty({Qpad, C}, fopt);
  if (Qpad > Q) means32.narrow(0, Q, Qpad - Q).zero_();
  at::Tensor rnorm = at::empty({Q}, dopt);
  at::Tensor ids = at::empty({B, n}, labels.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cluster_means_kernel", [&] {
    cluster_means_kernel<scalar_t><<<unsigned(B), kMeanThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), lab.data_ptr<int64_t>(), int(N), int(C), int(n), means64.data_ptr<double>(),
        means32.data_ptr<float>(), rnorm.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // Nearest codes.
  nearest_code_kernel<<<unsigned(Qpad / kQT), kThreads, 0, stream>>>(
      means32.data_ptr<float>(), means64.data_ptr<double>(), rnorm.data_ptr<double>(), Et32.data_ptr<float>(),
      ee32.data_ptr<float>(), E64t.data_ptr<double>(), ee64.data_ptr<double>(), max_ee.data_ptr<double>(), Q,
      int(C), int(V), int(Vpad), ids.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {ids, means64.to(residual.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(nvg, CUDA, m) {
  m.impl("cluster_quantize_prepare", &prepare_cuda);
  m.impl("cluster_quantize", &cluster_quantize_cuda);
}

}  // namespace nvg
