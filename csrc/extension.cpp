// distreward._C, the C++ extension's Python module (pybind11). Importing it loads this shared library, whose
// static initialisers register the ops of csrc/*.cpp with PyTorch's dispatcher (TORCH_LIBRARY in logprobs.cpp,
// TORCH_LIBRARY_FRAGMENT in bin_ops.cpp): Python calls them as torch.ops.distreward.* (distreward/ops/cpp.py,
// distreward/ops/cpp_bins.py), which torch.compile and opcheck see. The module itself tells a caller how the
// kernels run; how they were compiled (the -march flag and vector ISA) is distreward/_build_info.py, which
// setup.py writes beside it.
#include <omp.h>
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "distreward's C++ kernels: importing this module registers torch.ops.distreward.*";
  m.def("omp_max_threads", [] { return omp_get_max_threads(); },
        "Threads the kernels' OpenMP loops use (omp_get_max_threads). The extension shares torch's OpenMP "
        "runtime, so torch.set_num_threads and OMP_NUM_THREADS set it.");
}
