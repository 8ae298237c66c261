// Input checks shared by the CPU and CUDA kernels: every failure names the op, the argument and what is wrong.
#pragma once
#include <ATen/ATen.h>

#include <initializer_list>
#include <vector>

namespace nvg {

// Non-finite values would make every distance comparison false: reject them instead of returning arbitrary labels.
inline void check_finite(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isfinite(t).all().item<bool>(), op, ": ", name, " contains NaN or infinite values");
}

inline void check_granularity_cluster(const at::Tensor& f) {
  TORCH_CHECK(f.dim() == 3, "granularity_cluster: f must be a 3-D tensor [B, N, C], got shape ", f.sizes());
  TORCH_CHECK(at::isFloatingType(f.scalar_type()), "granularity_cluster: f must be a floating-point tensor, got ",
              f.scalar_type());
  const int64_t B = f.size(0), N = f.size(1), C = f.size(2);
  TORCH_CHECK(B > 0, "granularity_cluster: empty batch (B = 0) in f of shape ", f.sizes());
  TORCH_CHECK(N > 0 && (N & (N - 1)) == 0, "granularity_cluster: N = f.size(1) must be a power of two, got N = ", N);
  TORCH_CHECK(N <= 65536, "granularity_cluster: N = ", N, " is larger than the supported 65536 positions");
  TORCH_CHECK(C > 0, "granularity_cluster: f has no channels (C = 0)");
  TORCH_CHECK(f.is_contiguous(), "granularity_cluster: f must be contiguous (got a non-contiguous view with strides ",
              f.strides(), "); call .contiguous() first");
}

inline void check_cluster_quantize(const at::Tensor& residual, const at::Tensor& labels, int64_t num_clusters,
                                   const at::Tensor& codebook) {
  TORCH_CHECK(residual.dim() == 3, "cluster_quantize: residual must be a 3-D tensor [B, N, C], got shape ",
              residual.sizes());
  TORCH_CHECK(labels.dim() == 2, "cluster_quantize: labels must be a 2-D tensor [B, N], got shape ", labels.sizes());
  TORCH_CHECK(codebook.dim() == 2, "cluster_quantize: codebook must be a 2-D tensor [V, C], got shape ",
              codebook.sizes());
  TORCH_CHECK(at::isFloatingType(residual.scalar_type()), "cluster_quantize: residual must be floating-point, got ",
              residual.scalar_type());
  TORCH_CHECK(at::isFloatingType(codebook.scalar_type()), "cluster_quantize: codebook must be floating-point, got ",
              codebook.scalar_type());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "cluster_quantize: labels must be int64 (long), got ",
              labels.scalar_type());
  TORCH_CHECK(residual.size(0) > 0, "cluster_quantize: empty batch (B = 0) in residual of shape ", residual.sizes());
  TORCH_CHECK(labels.size(0) == residual.size(0) && labels.size(1) == residual.size(1),
              "cluster_quantize: labels shape ", labels.sizes(), " does not match residual [B, N] = [",
              residual.size(0), ", ", residual.size(1), "]");
  TORCH_CHECK(codebook.size(1) == residual.size(2), "cluster_quantize: codebook has C = ", codebook.size(1),
              " channels but residual has C = ", residual.size(2));
  TORCH_CHECK(codebook.size(0) > 0, "cluster_quantize: the codebook is empty (V = 0)");
  TORCH_CHECK(num_clusters > 0, "cluster_quantize: num_clusters must be positive, got ", num_clusters);
  TORCH_CHECK(residual.is_contiguous() && labels.is_contiguous() && codebook.is_contiguous(),
              "cluster_quantize: residual, labels and codebook must be contiguous (non-contiguous: ",
              residual.is_contiguous() ? "" : "residual ", labels.is_contiguous() ? "" : "labels ",
              codebook.is_contiguous() ? "" : "codebook", "); call .contiguous() first");
  TORCH_CHECK(residual.device() == labels.device() && residual.device() == codebook.device(),
              "cluster_quantize: residual (", residual.device(), "), labels (", labels.device(), ") and codebook (",
              codebook.device(), ") must be on the same device");
}

inline void check_codebook(const at::Tensor& codebook) {
  TORCH_CHECK(codebook.dim() == 2, "cluster_quantize_prepare: codebook must be a 2-D tensor [V, C], got shape ",
              codebook.sizes());
  TORCH_CHECK(at::isFloatingType(codebook.scalar_type()),
              "cluster_quantize_prepare: codebook must be floating-point, got ", codebook.scalar_type());
  TORCH_CHECK(codebook.size(0) > 0, "cluster_quantize_prepare: the codebook is empty (V = 0)");
  TORCH_CHECK(codebook.is_contiguous(), "cluster_quantize_prepare: codebook must be contiguous; call .contiguous()");
}

// The `prepared` list of cluster_quantize must come from cluster_quantize_prepare of this codebook on this device:
// metadata only (shapes, dtypes, device), no device sync. Stale values (a codebook changed in place after
// preparing) cannot be detected here: prepare again after every codebook update.
inline void check_prepared(const std::vector<at::Tensor>& prep, const at::Tensor& codebook,
                           std::initializer_list<std::vector<int64_t>> shapes,
                           std::initializer_list<at::ScalarType> dtypes) {
  TORCH_CHECK(prep.size() == shapes.size(), "cluster_quantize: prepared must be the ", shapes.size(),
              " tensors returned by cluster_quantize_prepare(codebook), got ", prep.size());
  size_t i = 0;
  auto dt = dtypes.begin();
  for (const auto& shape : shapes) {
    const at::Tensor& t = prep[i];
    TORCH_CHECK(t.device() == codebook.device() && t.sizes() == at::IntArrayRef(shape) && t.scalar_type() == *dt &&
                    t.is_contiguous(),
                "cluster_quantize: prepared[", i, "] (", t.scalar_type(), " ", t.sizes(), " on ", t.device(),
                ") does not belong to a codebook of shape ", codebook.sizes(), " on ", codebook.device(),
                ": prepare it with cluster_quantize_prepare(codebook) on the same device");
    ++i;
    ++dt;
  }
}

}  // namespace nvg
