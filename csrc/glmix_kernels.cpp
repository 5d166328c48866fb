// The one registration file: the four ops of the glmix_kernels torch.library namespace, their
// CPU kernels, their CUDA kernels in builds with WITH_CUDA, and the Python module glmix_kernels._C.
// The op contract (signatures, shapes, dtypes): glmix_kernels/backends/contract.py. Abstract
// (fake) implementations for torch.compile are registered in Python, in glmix_kernels/backends/cpp.py.
#include <torch/library.h>

#include "glmix_kernels.h"
#include "queries.h"

#ifdef GLMIX_PYTHON_MODULE
#include <Python.h>

// An empty module: importing glmix_kernels._C loads this library, whose static initialisers
// below register the ops with the dispatcher. The CMake build leaves it out (no Python needed).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "glmix_kernels ops (torch.ops.glmix_kernels)", -1, nullptr};
  return PyModule_Create(&module);
}
#endif

TORCH_LIBRARY(glmix_kernels, m) { glmix::define_ops(m); }

GLMIX_REGISTER_KERNELS(glmix_kernels, CPU, cpu)
#ifdef WITH_CUDA
GLMIX_REGISTER_KERNELS(glmix_kernels, CUDA, cuda)
#endif
#ifdef WITH_CUDA_EMULATION
// The CUDA kernels on CPU tensors under the host emulation (docs/emulation.md), in their own namespace.
TORCH_LIBRARY(glmix_emulated, m) { glmix::define_ops(m); }
GLMIX_REGISTER_KERNELS(glmix_emulated, CPU, cuda_emulated)
#endif
