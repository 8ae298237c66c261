// granularity_cluster, CPU: the official greedy pairwise clustering (spec/nvg-method.md §1.1), one image per task.
//
// For each round (M = N, N/2, ..., 2 clusters -> M/2):
//   * every cluster is represented by the mean of the ORIGINAL features of its members, summed in member order;
//   * the pair with the globally smallest distance is merged, both are removed, repeated M/2 times. Ties go to the
//     first entry of the row-major flattened distance matrix, i.e. the smallest (row, col) with row < col;
//   * the new cluster's members are the row cluster's members followed by the column cluster's; its raw label is
//     the merge counter.
// Then labels are renumbered top-down: the child with the smaller raw label of parent p becomes 2p, the other 2p+1.
//
// Distances are squared L2 in double precision (the ordering equals that of L2; double keeps near-ties and large
// magnitudes exact where the official float32 cdist would round). The greedy loop keeps each row's nearest alive
// column and rescans only rows whose nearest column was just removed: O(M^2) per round instead of O(M^3).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"

namespace nvg {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Workspace {
  std::vector<double> mean_t;   // [C, M] cluster means, channel-major so the distance loop vectorises over clusters
  std::vector<double> dist;     // [M, M] squared distances, exactly symmetric
  std::vector<double> row_min;  // [M] distance to the nearest alive column
  std::vector<int32_t> row_arg; // [M] that column (smallest index on ties)
  std::vector<char> alive;      // [M]
  std::vector<int32_t> members, next_members;  // [N] members of cluster l at [l*S, (l+1)*S)
};

void rescan_row(Workspace& w, int64_t M, int64_t r) {
  const double* d = w.dist.data() + r * M;
  double best = kInf;
  int32_t arg = -1;
  for (int64_t c = 0; c < M; ++c) {
    // A distance that overflowed to inf (finite inputs beyond ~1e154) still names a valid partner: the first.
    if (w.alive[c] && c != r && (arg < 0 || d[c] < best)) {
      best = d[c];
      arg = static_cast<int32_t>(c);
    }
  }
  w.row_min[r] = best;
  w.row_arg[r] = arg;
}

// One image: x [N, C] (double), raw labels out [K+1, N] (level K = position index), then relabelled in place.
// Compiled twice (AVX2 and baseline x86-64), picked at load time; with -ffp-contract=off both round identically.
__attribute__((target_clones("arch=x86-64-v3", "default")))
void cluster_one(const double* x, int64_t N, int64_t C, int64_t K, int64_t* out, Workspace& w) {
  w.members.resize(N);
  w.next_members.resize(N);
  for (int64_t p = 0; p < N; ++p) {
    w.members[p] = static_cast<int32_t>(p);
    out[K * N + p] = p;
  }
  for (int64_t level = K; level >= 1; --level) {
    const int64_t M = int64_t(1) << level, S = N / M;
    // cluster means of the original features, members summed in member order
    w.mean_t.assign(C * M, 0.0);
    for (int64_t l = 0; l < M; ++l) {
      for (int64_t s = 0; s < S; ++s) {
        const double* xp = x + int64_t(w.members[l * S + s]) * C;
        for (int64_t c = 0; c < C; ++c) w.mean_t[c * M + l] += xp[c];
      }
    }
    for (auto& v : w.mean_t) v /= double(S);
    // squared distances: upper triangle computed once, mirrored so the matrix is exactly symmetric
    w.dist.assign(M * M, 0.0);
    for (int64_t i = 0; i < M; ++i) {
      double* di = w.dist.data() + i * M;
      for (int64_t c = 0; c < C; ++c) {
        const double* mc = w.mean_t.data() + c * M;
        const double xi = mc[i];
        for (int64_t j = i + 1; j < M; ++j) {
          const double t = mc[j] - xi;
          di[j] += t * t;
        }
      }
      for (int64_t j = i + 1; j < M; ++j) w.dist[j * M + i] = di[j];
    }
    w.alive.assign(M, 1);
    w.row_min.resize(M);
    w.row_arg.resize(M);
    for (int64_t r = 0; r < M; ++r) rescan_row(w, M, r);
    int64_t* raw = out + (level - 1) * N;
    for (int64_t match = 0; match < M / 2; ++match) {
      // global minimum, first in row-major order: smallest row among equal row minima (rows scanned in order)
      int64_t i = -1;
      double best = kInf;
      for (int64_t r = 0; r < M; ++r) {
        if (w.alive[r] && (i < 0 || w.row_min[r] < best)) {
          best = w.row_min[r];
          i = r;
        }
      }
      const int64_t j = w.row_arg[i];  // j > i: by symmetry row j's minimum is <= best, and rows < i lost
      w.alive[i] = w.alive[j] = 0;
      int32_t* dst = w.next_members.data() + match * 2 * S;
      for (int64_t s = 0; s < S; ++s) {
        dst[s] = w.members[i * S + s];
        dst[S + s] = w.members[j * S + s];
      }
      for (int64_t s = 0; s < 2 * S; ++s) raw[dst[s]] = match;
      for (int64_t r = 0; r < M; ++r) {
        if (w.alive[r] && (w.row_arg[r] == i || w.row_arg[r] == j)) rescan_row(w, M, r);
      }
    }
    w.members.swap(w.next_members);
  }
  // level 0 is already all zeros (match 0 of the last round). Relabel top-down: children of parent p -> 2p, 2p+1,
  // the child with the smaller raw label first.
  std::vector<int64_t> first_child, child_label;
  for (int64_t level = 1; level <= K; ++level) {
    const int64_t M = int64_t(1) << level;
    const int64_t* parent = out + (level - 1) * N;  // already relabelled
    int64_t* child = out + level * N;
    first_child.assign(M / 2, M);
    child_label.assign(M, -1);
    for (int64_t p = 0; p < N; ++p) {
      int64_t& fc = first_child[parent[p]];
      if (child[p] < fc) fc = child[p];
    }
    for (int64_t p = 0; p < N; ++p) {
      const int64_t pl = parent[p];
      child_label[child[p]] = 2 * pl + (child[p] == first_child[pl] ? 0 : 1);
    }
    for (int64_t p = 0; p < N; ++p) child[p] = child_label[child[p]];
  }
}

at::Tensor granularity_cluster_cpu(const at::Tensor& f) {
  check_granularity_cluster(f);
  const int64_t B = f.size(0), N = f.size(1), C = f.size(2);
  int64_t K = 0;
  while ((int64_t(1) << K) < N) ++K;
  const at::Tensor x = f.to(at::kDouble).contiguous();
  check_finite(x, "granularity_cluster", "f");
  at::Tensor out = at::zeros({B, K + 1, N}, f.options().dtype(at::kLong));
  const double* xp = x.data_ptr<double>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    Workspace w;
    for (int64_t b = begin; b < end; ++b) cluster_one(xp + b * N * C, N, C, K, op + b * (K + 1) * N, w);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nvg, CPU, m) { m.impl("granularity_cluster", &granularity_cluster_cpu); }

}  // namespace nvg
