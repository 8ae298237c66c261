// granularity_cluster, CPU: the official greedy pairwise clustering (spec/nvg-method.md §1.1), one image per task.
//
// For each round (M = N, N/2, ..., 2 clusters -> M/2):
//   * every cluster is represented by the mean of the ORIGINAL features of its members, summed in member order;
//   * official matching: the pair with the globally smallest distance is merged, both are removed, repeated M/2
//     times. Ties go to the first entry of the row-major flattened distance matrix, i.e. the smallest (row, col)
//     with row < col; the new cluster's members are the row cluster's followed by the column cluster's, and its raw
//     label is the merge counter.
// Then labels are renumbered top-down: the child with the smaller raw label of parent p becomes 2p, the other 2p+1.
//
// Distances are squared L2 in double precision (the ordering equals that of L2; double keeps near-ties and large
// magnitudes exact where the official float32 cdist would round); a NaN distance counts as +inf.
//
// Matching in rounds of mutual nearest neighbours, with the official result. Order the pairs {i < j} by the key
// (d(i,j), i, j): a strict total order, and the official step takes the smallest key among alive pairs. For a row r,
// comparing its pairs by key is comparing (d(r,c), c): its nearest alive column, smallest index on ties, is nn(r).
//   (a) If nn(i) = j and nn(j) = i, the official loop merges {i, j}: every pair it merges before {i, j} has a smaller
//       key, so touches neither i nor j (their pairs all have larger keys), and {i, j} is then the smallest alive key.
//   (b) The official loop restricted to the other clusters is the official loop on them alone: the only merges that
//       touch i or j are {i, j} itself, so the others see the same alive sets at every step.
//   (c) The smallest alive key is always a mutual pair, so each round merges at least one pair.
// So a round merges every mutual pair at once, and repeats on the rest. The official loop merges pairs in increasing
// key order, so the merge counter of a pair is its rank among all merged pairs sorted by (d, i, j): the raw labels.
// Cost per level: the M x M distances (register-tiled, vectorised over columns), then a few vectorised row rescans.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "checks.h"

namespace nvg {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int64_t kCols = 16;  // columns per register tile of the distance pass (two 8-double vectors)
typedef double v8d __attribute__((vector_size(64)));  // GCC vector extension: AVX-512, 2x AVX2 or 4x SSE2

struct Workspace {
  std::vector<double> mean_t;   // [C, Mp] cluster means, channel-major, columns padded to a multiple of kCols
  std::vector<double> dist;     // [M, Mp] squared distances, exactly symmetric, +inf on the diagonal
  std::vector<double> dead;     // [Mp] 0 for an alive column, +inf for a merged one (added to distances)
  std::vector<int32_t> nn;      // [M] nearest alive column of each row (smallest index on ties)
  std::vector<int32_t> active, pairs;  // alive rows (ascending); merged pairs (i, j), i < j
  std::vector<int32_t> order;   // merge order of the pairs
  std::vector<int32_t> members, next_members;  // [N] members of cluster l at [l*S, (l+1)*S)
  std::vector<double> acc;      // [C]
};

// Squared distances of all pairs: dist[i][c] = sum over channels, in order, of (mean[c] - mean[i])^2, separate
// roundings (-ffp-contract=off), so dist[i][c] == dist[c][i] bitwise. Blocks of kRows rows x kCols columns are kept
// in registers over the channel loop; only column tiles reaching the upper triangle are computed, the rest of each
// row is filled by mirroring. Padded columns (means 0) get finite values but are never candidates (dead = +inf).
constexpr int64_t kRows = 4;
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void distances(const double* mean_t, int64_t M, int64_t Mp, int64_t C, double* dist) {
  for (int64_t i0 = 0; i0 < M; i0 += kRows) {
    int64_t rows[kRows];
    for (int64_t r = 0; r < kRows; ++r) rows[r] = std::min(i0 + r, M - 1);  // M = 2: rows repeat, stored once
    for (int64_t c0 = i0 / kCols * kCols; c0 < Mp; c0 += kCols) {
      v8d a[kRows][2] = {};
      for (int64_t ch = 0; ch < C; ++ch) {
        const double* mc = mean_t + ch * Mp;
        v8d m0, m1;
        std::memcpy(&m0, mc + c0, sizeof(v8d));
        std::memcpy(&m1, mc + c0 + 8, sizeof(v8d));
        for (int64_t r = 0; r < kRows; ++r) {
          const double xi = mc[rows[r]];
          const v8d t0 = m0 - xi, t1 = m1 - xi;
          a[r][0] = a[r][0] + t0 * t0;
          a[r][1] = a[r][1] + t1 * t1;
        }
      }
      for (int64_t r = 0; r < kRows && i0 + r < M; ++r) {
        // NaN (only from unvalidated non-finite input) -> +inf: the key order stays total.
        const v8d b0 = a[r][0] < kInf ? a[r][0] : kInf, b1 = a[r][1] < kInf ? a[r][1] : kInf;
        std::memcpy(dist + (i0 + r) * Mp + c0, &b0, sizeof(v8d));
        std::memcpy(dist + (i0 + r) * Mp + c0 + 8, &b1, sizeof(v8d));
      }
    }
    const int64_t nr = std::min(kRows, M - i0);
    for (int64_t c = i0 + nr; c < M; ++c) {
      for (int64_t r = 0; r < nr; ++r) dist[c * Mp + i0 + r] = dist[(i0 + r) * Mp + c];
    }
  }
  for (int64_t i = 0; i < M; ++i) dist[i * Mp + i] = kInf;
}

// Nearest alive column of row r: smallest (distance, column) over alive columns c != r (the diagonal holds +inf).
// Mp is a multiple of kCols. Lane-wise minima are exact (no NaN here), so the vector reduction is order-free.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
int32_t nearest(const double* d, const double* dead, int64_t Mp, int64_t r) {
  v8d m0, m1;
  for (int k = 0; k < 8; ++k) m0[k] = m1[k] = kInf;
  for (int64_t c = 0; c < Mp; c += kCols) {
    v8d d0, d1, p0, p1;
    std::memcpy(&d0, d + c, sizeof(v8d));
    std::memcpy(&d1, d + c + 8, sizeof(v8d));
    std::memcpy(&p0, dead + c, sizeof(v8d));
    std::memcpy(&p1, dead + c + 8, sizeof(v8d));
    d0 = d0 + p0;
    d1 = d1 + p1;
    m0 = d0 < m0 ? d0 : m0;
    m1 = d1 < m1 ? d1 : m1;
  }
  m0 = m1 < m0 ? m1 : m0;
  double best = m0[0];
  for (int k = 1; k < 8; ++k) best = m0[k] < best ? m0[k] : best;
  if (best < kInf) {
    for (int64_t c = 0;; ++c) {
      if (d[c] + dead[c] == best) return static_cast<int32_t>(c);
    }
  }
  // Every alive distance is +inf (overflowed or NaN inputs): the first alive column other than r, as the official
  // loop's first row-major entry.
  for (int64_t c = 0; c < Mp; ++c) {
    if (c != r && dead[c] == 0.0) return static_cast<int32_t>(c);
  }
  return -1;  // unreachable: at least two rows are alive whenever a row is rescanned
}

// One image: x [N, C] (double), raw labels out [K+1, N] (level K = position index), then relabelled in place.
void cluster_one(const double* x, int64_t N, int64_t C, int64_t K, int64_t* out, Workspace& w) {
  w.members.resize(N);
  w.next_members.resize(N);
  w.acc.resize(C);
  for (int64_t p = 0; p < N; ++p) {
    w.members[p] = static_cast<int32_t>(p);
    out[K * N + p] = p;
  }
  for (int64_t level = K; level >= 1; --level) {
    const int64_t M = int64_t(1) << level, S = N / M;
    const int64_t Mp = (M + kCols - 1) / kCols * kCols;
    // cluster means of the original features, members summed in member order, then divided by S
    w.mean_t.assign(C * Mp, 0.0);
    for (int64_t l = 0; l < M; ++l) {
      double* acc = w.acc.data();
      std::fill(acc, acc + C, 0.0);
      for (int64_t s = 0; s < S; ++s) {
        const double* xp = x + int64_t(w.members[l * S + s]) * C;
        for (int64_t c = 0; c < C; ++c) acc[c] += xp[c];
      }
      for (int64_t c = 0; c < C; ++c) w.mean_t[c * Mp + l] = acc[c] / double(S);
    }
    w.dist.resize(M * Mp);
    distances(w.mean_t.data(), M, Mp, C, w.dist.data());
    w.dead.assign(Mp, kInf);
    std::fill(w.dead.begin(), w.dead.begin() + M, 0.0);
    w.nn.resize(M);
    w.active.resize(M);
    for (int64_t r = 0; r < M; ++r) {
      w.active[r] = static_cast<int32_t>(r);
      w.nn[r] = nearest(w.dist.data() + r * Mp, w.dead.data(), Mp, r);
    }
    // rounds: merge every mutual nearest pair, rescan the rows whose nearest column was merged
    w.pairs.clear();
    while (!w.active.empty()) {
      for (const int32_t i : w.active) {
        const int32_t j = w.nn[i];
        if (j > i && w.nn[j] == i) {
          w.pairs.push_back(i);
          w.pairs.push_back(j);
          w.dead[i] = w.dead[j] = kInf;
        }
      }
      size_t kept = 0;
      for (const int32_t r : w.active) {
        if (w.dead[r] == 0.0) w.active[kept++] = r;
      }
      w.active.resize(kept);
      for (const int32_t r : w.active) {
        if (w.dead[w.nn[r]] != 0.0) w.nn[r] = nearest(w.dist.data() + r * Mp, w.dead.data(), Mp, r);
      }
    }
    // merge order: pairs sorted by (distance, row, column)
    const int64_t P = M / 2;
    w.order.resize(P);
    for (int64_t p = 0; p < P; ++p) w.order[p] = static_cast<int32_t>(p);
    const int32_t* pr = w.pairs.data();
    const double* dist = w.dist.data();
    std::sort(w.order.begin(), w.order.end(), [&](int32_t a, int32_t b) {
      const double da = dist[pr[2 * a] * Mp + pr[2 * a + 1]], db = dist[pr[2 * b] * Mp + pr[2 * b + 1]];
      if (da != db) return da < db;
      return pr[2 * a] < pr[2 * b];  // distinct pairs have distinct rows i (each row is merged once)
    });
    int64_t* raw = out + (level - 1) * N;
    for (int64_t match = 0; match < P; ++match) {
      const int32_t i = pr[2 * w.order[match]], j = pr[2 * w.order[match] + 1];
      int32_t* dst = w.next_members.data() + match * 2 * S;
      for (int64_t s = 0; s < S; ++s) {
        dst[s] = w.members[i * S + s];
        dst[S + s] = w.members[j * S + s];
      }
      for (int64_t s = 0; s < 2 * S; ++s) raw[dst[s]] = match;
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

at::Tensor granularity_cluster_cpu(const at::Tensor& f, bool validate) {
  check_granularity_cluster(f);
  const int64_t B = f.size(0), N = f.size(1), C = f.size(2);
  int64_t K = 0;
  while ((int64_t(1) << K) < N) ++K;
  const at::Tensor x = f.to(at::kDouble).contiguous();
  if (validate) check_finite(x, "granularity_cluster", "f");
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
