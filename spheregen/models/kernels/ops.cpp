// The sampling kernels as torch ops: torch.ops.spheregen_kernels.flow_steps and .decode_step.

#include <torch/library.h>

#include "common.h"

TORCH_LIBRARY(spheregen_kernels, lib) {
  lib.def("flow_steps(Tensor(a!) x, Tensor mods, float[] coefs, Tensor? noise, Tensor[] weights, int per, "
          "int hidden, float eps, float? scale) -> Tensor(a!)");
  lib.def("decode_step(Tensor x, Tensor rot, Tensor[] weights, Tensor(a!)[] keys, Tensor(b!)[] values, int pos, "
          "int n_heads, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(spheregen_kernels, CPU, lib) {
  lib.impl("flow_steps", &spheregen_kernels::flow_steps);
  lib.impl("decode_step", &spheregen_kernels::decode_step);
}
