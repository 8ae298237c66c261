// granularity_cluster, CUDA: the same greedy pairwise clustering as csrc/granularity_cluster.cpp (the specification),
// with bit-identical labels for every finite input, exact ties included.
//
// Math, per image and per round (M = N, N/2, ..., 2 clusters of S = N / M members -> M/2 clusters):
//   * mean[l][c] = (sum over the members s = 0..S-1 of cluster l, in member order, of x[member][c]) / S, in double;
//   * d(r, k) = sum over c = 0..C-1, in order, of (mean[k][c] - mean[r][c])^2 in double. Every operation is an
//     explicitly rounded intrinsic (__dsub_rn, __dmul_rn, __dadd_rn, __ddiv_rn): nvcc would otherwise contract
//     a*b + c into one fused multiply-add, which rounds differently from the CPU kernel. d(r, k) == d(k, r) bitwise.
//   * matching in rounds (the CPU kernel's header proves it equals the official one-pair-at-a-time loop):
//     row_arg[r] = the nearest alive column k != r, smallest (distance, k); every alive row r whose nearest row names
//     r back forms a mutual pair, all such pairs merge at once, rows whose nearest column merged are rescanned, until
//     no row is left. The official merge counter of a pair is its rank by (distance, row); the new cluster's members
//     are the row cluster's followed by the column cluster's.
//   * after all rounds, labels are renumbered top-down: the child with the smaller raw label of parent p becomes 2p,
//     the other 2p+1.
// Minima are taken over (value, index) pairs, lexicographically, so they do not depend on the order in which threads
// combine them. A distance that is not finite (double inputs above ~1e154, or NaN/inf inputs when validate=false) is
// a candidate of value +inf, as in the CPU kernel: rows then still get a valid partner, and for finite distances the
// result is unchanged.
//
// Parallel decomposition: one thread block per image, all rounds inside one kernel.
//   * per-image state (channel-major means [C][M], row_min, row_arg, alive, member lists, labels) lives in shared
//     memory when it fits the device's per-block limit (N = 256, C = 32: 80 KB, two blocks per SM), else in a
//     global-memory workspace with the same layout (same code, kSharedState = false, 512 threads per block);
//   * the distance matrix of the round (M x M doubles) lives in a global-memory workspace, one N x N slot per image;
//     the batch is processed in chunks so that this workspace stays within a budget (1 GiB by default,
//     NVG_CLUSTER_WORKSPACE_MB overrides it), and at least one image per chunk;
//   * distance rows: each warp computes kRows rows at a time, lanes over columns (register tile kRows x 1, the
//     column's mean read once per channel for kRows rows), writes them and reduces each row's minimum with shuffles;
//   * each round: every thread tests its rows for mutual pairs (appended with an atomic counter, order irrelevant),
//     then lists the rows to rescan, then one warp per listed row rescans it, lanes over its columns, reading the
//     stored distances. Three __syncthreads per round (S1, S2, S3) instead of three per merged pair;
//   * the merge ranks: each thread ranks its pairs against all pairs (O(P^2) comparisons, P = M/2, from shared
//     memory), then members and raw labels are written at their rank.
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
  int64_t mean, row_min, row_arg, members, next, list, pairs, lab, alive, bytes;
};

__host__ __device__ inline StateLayout state_layout(int64_t N, int64_t C, int64_t K) {
  StateLayout s;
  s.mean = 0;                          // double [C][M] (channel-major, row stride M of the current round)
  s.row_min = s.mean + 8 * C * N;      // double [N]
  s.row_arg = s.row_min + 8 * N;       // int [N]
  s.members = s.row_arg + 4 * N;       // int [N]: members of cluster l at [l*S, (l+1)*S)
  s.next = s.members + 4 * N;          // int [N]: the next round's member lists
  s.list = s.next + 4 * N;             // int [N]: rows to rescan, then the pairs' merge ranks
  s.pairs = s.list + 4 * N;            // int [N]: merged pairs (i at [0, N/2), j at [N/2, N))
  s.lab = s.pairs + 4 * N;             // int [K+1][N]: raw labels, then the final ones
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
  __shared__ int list_len;
  __shared__ int n_pairs;

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
  int* pairs = reinterpret_cast<int*>(base + L.pairs);
  int* lab = reinterpret_cast<int*>(base + L.lab);
  unsigned char* alive = base + L.alive;

  const double* xi = x + img * N * C;
  double* D = dist_ws + img * int64_t(N) * N;  // not const/__restrict__: written and read back in this kernel
  const double kInf = inf_d();

  for (int p = tid; p < N; p += kThreads) {
    members[p] = p;
    lab[int64_t(K) * N + p] = p;  // level K: every position is its own cluster
  }
  if (tid == 0) n_pairs = 0;
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

    // (3) matching in rounds: every mutual nearest pair merges at once (csrc/granularity_cluster.cpp proves that
    // this merges the official pairs), rows whose nearest column merged are rescanned, until no row is alive.
    int* raw = lab + int64_t(level - 1) * N;
    int* pair_i = pairs;
    int* pair_j = pairs + N / 2;
    for (;;) {
      if (tid == 0) list_len = 0;  // its last reader ran before the previous S3
      // Detection: only the owner of row r reads or writes alive[r] here; row_arg of alive rows names alive rows.
      for (int r = tid; r < M; r += kThreads) {
        if (alive[r]) {
          const int j = row_arg[r];
          if (row_arg[j] == r) {
            if (j > r) {
              const int p = atomicAdd(&n_pairs, 1);
              pair_i[p] = r;
              pair_j[p] = j;
            }
            alive[r] = 0;
          }
        }
      }
      __syncthreads();  // S1: pairs and alive flags of this round are final
      const bool done = 2 * n_pairs == M;  // block-uniform; n_pairs changes next only after S3
      if (!done) {
        for (int r = tid; r < M; r += kThreads) {
          if (alive[r] && !alive[row_arg[r]]) list[atomicAdd(&list_len, 1)] = r;
        }
      }
      __syncthreads();  // S2
      if (done) break;
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
        if (lane == 0) row_arg[r] = ra;
      }
      __syncthreads();  // S3
    }
    // Merge order: the rank of each pair by (distance, row), pairs ranked in parallel (row_min and list are free).
    const int P = M / 2;
    for (int p = tid; p < P; p += kThreads) {
      const double d = D[int64_t(pair_i[p]) * M + pair_j[p]];
      row_min[p] = d < kInf ? d : kInf;
    }
    __syncthreads();
    for (int p = tid; p < P; p += kThreads) {
      const double dp = row_min[p];
      const int ip = pair_i[p];
      int rank = 0;
      for (int q = 0; q < P; ++q) rank += key_less(row_min[q], pair_i[q], dp, ip);
      list[p] = rank;
    }
    __syncthreads();
    for (int e = tid; e < N; e += kThreads) {  // member s of merged pair p, written at its rank
      const int p = e / (2 * S), s = e % (2 * S), k = list[p];
      const int m = s < S ? members[pair_i[p] * S + s] : members[pair_j[p] * S + (s - S)];
      next[k * 2 * S + s] = m;
      raw[m] = k;
    }
    if (tid == 0) n_pairs = 0;  // first read after the next level's S1; reset before the barrier below
    __syncthreads();
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
  constexpr int64_t kStaticSmem = 1024;  // list_len, n_pairs: 8 bytes
  const bool shared_state = layout.bytes + kStaticSmem <= int64_t(prop->sharedMemPerBlockOptin);
  const int64_t state_stride = (layout.bytes + 255) / 256 * 256;
  const int64_t per_image = N * N * int64_t(sizeof(double)) + (shared_state ? 0 : state_stride);
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(B, workspace_budget_bytes() / per_image));
  at::Tensor dist_ws = at::empty({chunk * N * N}, f.options().dtype(at::kDouble));
  at::Tensor state_ws;
  if (!shared_state) state_ws = at::empty({chunk * state_stride}, f.options().dtype(at::kByte));

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (shared_state) {
    // Raised once per device to the largest size asked so far: no API call on later (possibly graph-captured) calls.
    static int64_t configured[64] = {0};
    const int dev = f.get_device();
    if (dev >= 64 || configured[dev] < layout.bytes) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(granularity_cluster_kernel<kSharedThreads, true>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, int(layout.bytes)));
      if (dev < 64) configured[dev] = layout.bytes;
    }
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
