// The nvg op library: schemas of every custom op, and the module init that makes it importable as nvg._C.
// CPU kernels live in csrc/<op>.cpp, CUDA kernels in csrc/cuda/<op>.cu; each registers itself with
// TORCH_LIBRARY_IMPL for its dispatch key.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing nvg._C runs the static TORCH_LIBRARY initialisers below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(nvg, m) {
  // f: float[B, N, C], N = 2^K  ->  long[B, K+1, N]; level i holds the nested labels in [0, 2^i).
  // validate=false skips the finiteness check (a device-to-host sync on CUDA); the shape checks always run.
  m.def("granularity_cluster(Tensor f, bool validate=True) -> Tensor");
  // residual: float[B, N, C], labels: long[B, N] in [0, num_clusters), codebook: float[V, C]
  //   -> (ids: long[B, num_clusters], means: float[B, num_clusters, C])
  // prepared: cluster_quantize_prepare(codebook), computed once per codebook version (else prepared per call);
  // validate=false skips the value checks that need a device-to-host sync (label range on CUDA, finiteness).
  m.def("cluster_quantize(Tensor residual, Tensor labels, int num_clusters, Tensor codebook, Tensor[]? prepared=None, "
        "bool validate=True) -> (Tensor, Tensor)");
  // codebook: float[V, C] -> the derived arrays of the search (layout per device; opaque to callers)
  m.def("cluster_quantize_prepare(Tensor codebook) -> Tensor[]");
}
