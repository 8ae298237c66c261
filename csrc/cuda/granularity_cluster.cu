// granularity_cluster, CUDA: the same greedy pairwise clustering as csrc/granularity_cluster.cpp (the specification),
// with bit-identical labels for every finite input, exact ties included.
//
// Math, per image and per round (M = N, N/2, ..., 2 clusters of S = N / M members -> M/2 clusters):
//   * mean[l][c] = (sum over the members s = 0..S-1 of cluster l, in member order, of x[member][c]) / S, in double;
//   * d(r, k) = sum over c = 0..C-1, in order, of (mean[k][c] - mean[r][c])^2 in double. Every operation is an
//     explicitly rounded intrinsic (__dsub_rn, __dmul_rn, __dadd_rn, __ddiv_rn): nvcc would otherwise contract
//     a*b + c into one fused multiply-add, which rounds differently from the CPU kernel. d(r, k) == d(k, r) bitwise.
//   * greedy matching, M/2 times: i = the alive row with the smallest (row_min, row) pair, j = row_arg[i], where
//     row_min[r] / row_arg[r] are the smallest distance to an alive column k != r and the smallest such k. This is
//     the first entry of the row-major flattened matrix holding the global minimum, as in the CPU kernel. The new
//     cluster's members are cluster i's followed by cluster j's, its raw label is the match counter; rows whose
//     nearest column was i or j are rescanned, the others keep a valid minimum (removing columns only raises it).
//   * after all rounds, labels are renumbered top-down: the child with the smaller raw label of parent p becomes 2p,
//     the other 2p+1.
// Minima are taken over (value, index) pairs, lexicographically, so they do not depend on the order in which threads
// combine them. A distance that is not finite (possible only for double inputs above ~1e154: NaN and inf inputs are
// rejected up front) is a candidate of value +inf: rows then still get a valid partner (the CPU kernel would index
// out of bounds there), and for finite distances the result is unchanged.
//
// Parallel decomposition: one thread block per image, all rounds inside one kernel.
//   * per-image state (channel-major means [C][M], row_min, row_arg, alive, member lists, labels) lives in shared
//     memory when it fits the device's per-block limit (N = 256, C = 32: 79 KB, two blocks per SM), else in a
//     global-memory workspace with the same layout (same code, kSharedState = false, 512 threads per block);
//   * the distance matrix of the round (M x M doubles) lives in a global-memory workspace, one N x N slot per image;
//     the batch is processed in chunks so that this workspace stays within a budget (1 GiB by default,
//     NVG_CLUSTER_WORKSPACE_MB overrides it), and at least one image per chunk;
//   * distance rows: each warp computes kRows rows at a time, lanes over columns (register tile kRows x 1, the
//     column's mean read once per channel for kRows rows), writes them and reduces each row's minimum with shuffles;
//   * each match: a block-wide argmin over alive rows (warp shuffles, then one value per warp in shared memory),
//     the members copied by all threads, the rows to rescan appended to a list, and the list spread over the warps:
//     one warp per rescanned row, lanes over its columns, reading the stored distances.
//   Three __syncthreads per match: after the per-warp minima (S1), after the list and alive flags (S2), after the
//   rescans (S3).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>

#include "../checks.h"

namespace nvg {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kNone = 0x7fffffff;  // index of "no candidate": loses every (value, index) comparison on equal values
constexpr int kRows = 4;           // rows per warp in the distance-row pass
constexpr int kRescanBatch = 8;    // columns per lane loaded together in a rescan (8 x 32 = a whole row at N = 256)
constexpr int kSharedThreads = 256;   // block size when the state is in shared memory
constexpr int kGlobalThreads = 512;   // block size when the state is in global memory (large N or C)

__device__ __forceinline__ double inf_d() { return __longlong_as_double(0x7ff0000000000000LL); }

__device__ __forceinline__ bool key_less(double av, int ai, double bv, int bi) {
  return av < bv || (av == bv && ai < bi);
}

// Lexicographic minimum of (val, idx) over the 32 lanes; every lane ends with it. All 32 lanes must call it.
__device__ __forceinline__ void warp_argmin(double& val, int& idx) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const double ov = __shfl_xor_sync(kFullMask, val, off);
    const int oi = __shfl_xor_sync(kFullMask, idx, off);
    if (key_less(ov, oi, val, idx)) {
      val = ov;
      idx = oi;
    }
  }
}

// acc + (a - b)^2 with the CPU kernel's three roundings (no fused multiply-add).
__device__ __forceinline__ double add_sq_diff(double acc, double a, double b) {
  const double t = __dsub_rn(a, b);
  return __dadd_rn(acc, __dmul_rn(t, t));
}

// Byte offsets of the per-image state. Doubles first, then 32-bit ints, then bytes, so every array is aligned.
struct StateLayout {
  int64_t mean, row_min, row_arg, members, next, list, lab, alive, bytes;
};

__host__ __device__ inline StateLayout state_layout(int64_t N, int64_t C, int64_t K) {
  StateLayout s;
  s.mean = 0;                          // double [C][M] (channel-major, row stride M of the current round)
  s.row_min = s.mean + 8 * C * N;      // double [N]
  s.row_arg = s.row_min + 8 * N;       // int [N]
  s.members = s.row_arg + 4 * N;       // int [N]: members of cluster l at [l*S, (l+1)*S)
  s.next = s.members + 4 * N;          // int [N]: the next round's member lists
  s.list = s.next + 4 * N;             // int [N]: rows to rescan
  s.lab = s.list + 4 * N;              // int [K+1][N]: raw labels, then the final ones
  s.alive = s.lab + 4 * (K + 1) * N;   // uint8 [N]
  s.bytes = (s.alive + N + 15) / 16 * 16;
  return s;
}

template <int kThreads, bool kSharedState>
__global__ void __launch_bounds__(kThreads)
    granularity_cluster_kernel(const double* __restrict__ x, int64_t* __restrict__ out, double* dist_ws,
                               unsigned char* state_ws, int64_t state_stride, int N, int C, int K) {
  constexpr int kWarps = kThreads / kWarp;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ double red_val[kWarps];
  __shared__ int red_idx[kWarps];
  __shared__ int list_len;

  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int64_t img = blockIdx.x;
  const StateLayout L = state_layout(N, C, K);
  unsigned char* base = kSharedState ? smem : state_ws + img * state_stride;
  double* mean = reinterpret_cast<double*>(base + L.mean);
  double* row_min = reinterpret_cast<double*>(base + L.row_min);
  int* row_arg = reinterpret_cast<int*>(base + L.row_arg);
  int* members = reinterpret_cast<int*>(base + L.members);
  int* next = reinterpret_cast<int*>(base + L.next);
  int* list = reinterpret_cast<int*>(base + L.list);
  int* lab = reinterpret_cast<int*>(base + L.lab);
  unsigned char* alive = base + L.alive;

  const double* xi = x + img * N * C;
  double* D = dist_ws + img * int64_t(N) * N;  // not const/__restrict__: written and read back in this kernel
  const double kInf = inf_d();

  for (int p = tid; p < N; p += kThreads) {
    members[p] = p;
    lab[int64_t(K) * N + p] = p;  // level K: every position is its own cluster
  }
  __syncthreads();

  for (int level = K; level >= 1; --level) {
    const int M = 1 << level, S = N >> level;

    // (1) means, channel-major: entry q = ch * M + l; consecutive threads take consecutive clusters.
    for (int q = tid; q < M * C; q += kThreads) {  // M * C <= N * C < 2^31 (checked by the launcher)
      const int ch = q / M, l = q % M;
      const int* mem = members + l * S;
      double acc = 0.0;
      for (int s = 0; s < S; ++s) acc = __dadd_rn(acc, xi[int64_t(mem[s]) * C + ch]);
      mean[q] = __ddiv_rn(acc, double(S));
    }
    for (int r = tid; r < M; r += kThreads) alive[r] = 1;
    __syncthreads();

    // (2) distance rows and their minima: warp w takes rows r0..r0+kRows-1, lanes take columns c0 + lane.
    for (int r0 = warp * kRows; r0 < M; r0 += kWarps * kRows) {  // warp-uniform bound: shuffles below are safe
      double best[kRows];
      int arg[kRows];
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr) {
        best[rr] = kInf;
        arg[rr] = kNone;
      }
      for (int c0 = 0; c0 < M; c0 += kWarp) {
        const int c = c0 + lane;
        if (c < M) {
          double acc[kRows];
#pragma unroll
          for (int rr = 0; rr < kRows; ++rr) acc[rr] = 0.0;
          for (int ch = 0; ch < C; ++ch) {
            const double* mc = mean + int64_t(ch) * M;
            const double vc = mc[c];
#pragma unroll
            for (int rr = 0; rr < kRows; ++rr) acc[rr] = add_sq_diff(acc[rr], vc, mc[min(r0 + rr, M - 1)]);
          }
#pragma unroll
          for (int rr = 0; rr < kRows; ++rr) {
            const int r = r0 + rr;
            if (r < M) {
              D[int64_t(r) * M + c] = acc[rr];
              const double d = acc[rr] < kInf ? acc[rr] : kInf;
              if (c != r && key_less(d, c, best[rr], arg[rr])) {
                best[rr] = d;
                arg[rr] = c;
              }
            }
          }
        }
      }
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr) {
        warp_argmin(best[rr], arg[rr]);
        if (lane == 0 && r0 + rr < M) {
          row_min[r0 + rr] = best[rr];
          row_arg[r0 + rr] = arg[rr];
        }
      }
    }
    __syncthreads();

    // (3) greedy matching.
    int* raw = lab + int64_t(level - 1) * N;
    for (int match = 0; match < M / 2; ++match) {
      if (tid == 0) list_len = 0;  // its last reader ran before the previous S3
      double bv = kInf;
      int bi = kNone;
      for (int r = tid; r < M; r += kThreads) {
        if (alive[r] && key_less(row_min[r], r, bv, bi)) {
          bv = row_min[r];
          bi = r;
        }
      }
      warp_argmin(bv, bi);
      if (lane == 0) {
        red_val[warp] = bv;
        red_idx[warp] = bi;
      }
      __syncthreads();  // S1
      bv = red_val[0];
      bi = red_idx[0];
      for (int w = 1; w < kWarps; ++w) {
        if (key_less(red_val[w], red_idx[w], bv, bi)) {
          bv = red_val[w];
          bi = red_idx[w];
        }
      }
      // At least two rows are alive, and every alive row's row_arg is another alive row (see the header).
      const int i = bi, j = row_arg[i];
      int* dst = next + match * 2 * S;
      for (int s = tid; s < 2 * S; s += kThreads) {
        const int m = s < S ? members[i * S + s] : members[j * S + (s - S)];
        dst[s] = m;
        raw[m] = match;
      }
      // alive[r] is read and written here only by the thread that owns row r, read by everyone after S2.
      for (int r = tid; r < M; r += kThreads) {
        if (r == i || r == j) {
          alive[r] = 0;
        } else if (alive[r] && (row_arg[r] == i || row_arg[r] == j)) {
          list[atomicAdd(&list_len, 1)] = r;
        }
      }
      __syncthreads();  // S2
      const int n_list = list_len;
      for (int e = warp; e < n_list; e += kWarps) {  // warp-uniform loop
        const int r = list[e];
        const double* Dr = D + int64_t(r) * M;
        double rb = kInf;
        int ra = kNone;
        for (int cb = 0; cb < M; cb += kRescanBatch * kWarp) {
          double dv[kRescanBatch];  // all loads of a batch are issued before the first use: one memory latency
#pragma unroll
          for (int k = 0; k < kRescanBatch; ++k) {
            const int c = cb + k * kWarp + lane;
            dv[k] = c < M ? Dr[c] : 0.0;
          }
#pragma unroll
          for (int k = 0; k < kRescanBatch; ++k) {
            const int c = cb + k * kWarp + lane;
            if (c < M && c != r && alive[c]) {
              const double d = dv[k] < kInf ? dv[k] : kInf;
              if (key_less(d, c, rb, ra)) {
                rb = d;
                ra = c;
              }
            }
          }
        }
        warp_argmin(rb, ra);
        if (lane == 0) {
          row_min[r] = rb;
          row_arg[r] = ra;
        }
      }
      __syncthreads();  // S3
    }
    int* t = members;
    members = next;
    next = t;
  }

  // (4) top-down relabelling, level by level, positions spread over the threads. The member arrays are free now.
  int* child_label = members;  // [M] new label of each raw child label
  int* first_child = next;     // [M/2] smallest raw child label of each parent
  for (int level = 1; level <= K; ++level) {
    const int M = 1 << level;
    const int* parent = lab + int64_t(level - 1) * N;  // already final
    int* child = lab + int64_t(level) * N;             // raw, in [0, M)
    for (int l = tid; l < M / 2; l += kThreads) first_child[l] = M;
    __syncthreads();
    for (int p = tid; p < N; p += kThreads) atomicMin(&first_child[parent[p]], child[p]);
    __syncthreads();
    for (int p = tid; p < N; p += kThreads) {  // positions sharing a raw child label write the same value
      const int c = child[p], pl = parent[p];
      child_label[c] = 2 * pl + (c == first_child[pl] ? 0 : 1);
    }
    __syncthreads();
    for (int p = tid; p < N; p += kThreads) child[p] = child_label[child[p]];
    __syncthreads();
  }
  int64_t* o = out + img * int64_t(K + 1) * N;
  for (int64_t q = tid; q < int64_t(K + 1) * N; q += kThreads) o[q] = lab[q];
}

int64_t workspace_budget_bytes() {
  int64_t mb = 1024;
  if (const char* env = std::getenv("NVG_CLUSTER_WORKSPACE_MB")) {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && v >= 0,
                "granularity_cluster: NVG_CLUSTER_WORKSPACE_MB must be a non-negative integer, got '", env, "'");
    mb = v;
  }
  return mb * (int64_t(1) << 20);
}

at::Tensor granularity_cluster_cuda(const at::Tensor& f, bool validate) {
  check_granularity_cluster(f);
  TORCH_CHECK(f.is_cuda(), "granularity_cluster: the CUDA kernel got a tensor on ", f.device());
  const c10::cuda::CUDAGuard device_guard(f.device());
  const int64_t B = f.size(0), N = f.size(1), C = f.size(2);
  int64_t K = 0;
  while ((int64_t(1) << K) < N) ++K;
  TORCH_CHECK(N * C <= std::numeric_limits<int32_t>::max(), "granularity_cluster: N * C = ", N * C,
              " is too large for the CUDA kernel (at most 2^31 - 1 values per image)");
  const at::Tensor x = f.to(at::kDouble).contiguous();
  if (validate) check_finite(x, "granularity_cluster", "f");
  at::Tensor out = at::empty({B, K + 1, N}, f.options().dtype(at::kLong));

  const StateLayout layout = state_layout(N, C, K);
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  constexpr int64_t kStaticSmem = 1024;  // red_val, red_idx, list_len: under 400 bytes
  const bool shared_state = layout.bytes + kStaticSmem <= int64_t(prop->sharedMemPerBlockOptin);
  const int64_t state_stride = (layout.bytes + 255) / 256 * 256;
  const int64_t per_image = N * N * int64_t(sizeof(double)) + (shared_state ? 0 : state_stride);
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(B, workspace_budget_bytes() / per_image));
  at::Tensor dist_ws = at::empty({chunk * N * N}, f.options().dtype(at::kDouble));
  at::Tensor state_ws;
  if (!shared_state) state_ws = at::empty({chunk * state_stride}, f.options().dtype(at::kByte));

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (shared_state) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(granularity_cluster_kernel<kSharedThreads, true>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, int(layout.bytes)));
  }
  const double* xp = x.data_ptr<double>();
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t nb = std::min(chunk, B - b0);
    if (shared_state) {
      granularity_cluster_kernel<kSharedThreads, true><<<unsigned(nb), kSharedThreads, layout.bytes, stream>>>(
          xp + b0 * N * C, op + b0 * (K + 1) * N, dist_ws.data_ptr<double>(), nullptr, 0, int(N), int(C), int(K));
    } else {
      granularity_cluster_kernel<kGlobalThreads, false><<<unsigned(nb), kGlobalThreads, 0, stream>>>(
          xp + b0 * N * C, op + b0 * (K + 1) * N, dist_ws.data_ptr<double>(), state_ws.data_ptr<uint8_t>(),
          state_stride, int(N), int(C), int(K));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nvg, CUDA, m) { m.impl("granularity_cluster", &granularity_cluster_cuda); }

}  // namespace nvg
