// The one registration file: the four ops of the glmix_kernels torch.library namespace, their
// CPU kernels, their CUDA kernels in builds with WITH_CUDA, and the Python module glmix_kernels._C.
// Shapes, dtypes and strides: see glmix_kernels.h. Abstract (fake) implementations for
// torch.compile are registered in Python, in glmix_kernels/backends/cpp.py.
#include <torch/library.h>

#include "glmix_kernels.h"

#ifdef GLMIX_PYTHON_MODULE
#include <Python.h>

// An empty module: importing glmix_kernels._C loads this library, whose static initialisers
// below register the ops with the dispatcher. The CMake build leaves it out (no Python needed).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "glmix_kernels ops (torch.ops.glmix_kernels)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
#endif

// The four schemas, for the glmix_kernels namespace and the emulation's glmix_emulated.
#define GLMIX_DEFINE_OPS(ns)                                                                            \
  TORCH_LIBRARY(ns, m) {                                                                                \
    const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};                                        \
    m.def("cluster_fwd(Tensor x, Tensor qs) -> (Tensor slots, Tensor lse)", tags);                      \
    m.def("cluster_bwd(Tensor grad, Tensor x, Tensor qs, Tensor slots, Tensor lse) -> (Tensor dx, Tensor dqs)", \
          tags);                                                                                        \
    m.def("dispatch_fwd(Tensor x, Tensor qs, Tensor slots) -> (Tensor out, Tensor lse)", tags);         \
    m.def("dispatch_bwd(Tensor grad, Tensor x, Tensor qs, Tensor slots, Tensor lse)"                    \
          " -> (Tensor dx, Tensor dqs, Tensor dslots)",                                                 \
          tags);                                                                                        \
  }

GLMIX_DEFINE_OPS(glmix_kernels)
#ifdef WITH_CUDA_EMULATION
GLMIX_DEFINE_OPS(glmix_emulated)
#endif

#define GLMIX_REGISTER_KERNELS(ns, key, device)          \
  TORCH_LIBRARY_IMPL(ns, key, m) {                       \
    m.impl("cluster_fwd", &glmix::cluster_fwd_##device);   \
    m.impl("cluster_bwd", &glmix::cluster_bwd_##device);   \
    m.impl("dispatch_fwd", &glmix::dispatch_fwd_##device); \
    m.impl("dispatch_bwd", &glmix::dispatch_bwd_##device); \
  }

GLMIX_REGISTER_KERNELS(glmix_kernels, CPU, cpu)
#ifdef WITH_CUDA
GLMIX_REGISTER_KERNELS(glmix_kernels, CUDA, cuda)
#endif
#ifdef WITH_CUDA_EMULATION
// The CUDA kernels run on CPU tensors under the host emulation (docs/emulation.md).
GLMIX_REGISTER_KERNELS(glmix_emulated, CPU, cuda_emulated)
#endif
