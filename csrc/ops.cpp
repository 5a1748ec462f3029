// Registers tgolf's CUDA kernels as torch ops (torch.ops.tgolf.*) and makes `tgolf._C` an importable module.
//
// Schemas live in a FRAGMENT because Python ops (torch.library.custom_op) share the "tgolf" namespace. Only CUDA
// kernels are registered here; the fake (meta) implementations that torch.compile traces with are Python ones,
// registered by tgolf/_extension.py, which this module's init imports so that they exist whoever loads it first.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launchers.h"
#include "message.h"

namespace tgolf {
namespace {

void check_cuda(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), message(name, " must be a CUDA tensor, got device ", t.device()));
  TORCH_CHECK(t.scalar_type() == dtype, message(name, " must have dtype ", dtype, ", got ", t.scalar_type()));
  TORCH_CHECK(t.dim() == dim, message(name, " must be ", dim, "-D, got shape ", t.sizes()));
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK(a.device() == b.device(), message(name, " must be on ", a.device(), ", got ", b.device()));
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, message("tgolf::", op, ": kernel launch failed: ", cudaGetErrorString(err)));
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

at::Tensor ternary_packed_mm(const at::Tensor& x_in, const at::Tensor& packed_in, const at::Tensor& scales_in,
                             int64_t group_size) {
  check_cuda(x_in, "x", at::kBFloat16, 2);
  check_cuda(packed_in, "packed", at::kByte, 2);
  check_cuda(scales_in, "scales", at::kFloat, 2);
  check_same_device(x_in, packed_in, "packed");
  check_same_device(x_in, scales_in, "scales");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = packed_in.size(0);
  TORCH_CHECK(packed_in.size(1) == (K + 3) / 4, message("packed must be [N, ceil(K/4)] = [", N, ", ", (K + 3) / 4,
              "] for x of shape ", x_in.sizes(), ", got ", packed_in.sizes()));
  TORCH_CHECK(group_size == 0 || (group_size > 0 && group_size % 64 == 0),
              message("group_size must be 0 (one scale per row) or a positive multiple of 64, got ", group_size));
  const int64_t G = group_size > 0 ? (K + group_size - 1) / group_size : 1;
  TORCH_CHECK(scales_in.size(0) == N && scales_in.size(1) == G, message("scales must be [N, G] = [", N, ", ", G,
              "] for group_size ", group_size, ", got ", scales_in.sizes()));
  TORCH_CHECK((M + 63) / 64 <= 65535, message("x has too many rows for this kernel (M = ", M, ")"));
  if (M == 0 || N == 0 || K == 0) return at::zeros({M, N}, x_in.options());

  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), packed = packed_in.contiguous(), scales = scales_in.contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  check_launch(launch_ternary_packed_mm(cptr<uint16_t>(x), cptr<uint8_t>(packed), cptr<float>(scales),
                                        reinterpret_cast<uint16_t*>(out.mutable_data_ptr()), M, N, K, group_size,
                                        c10::cuda::getCurrentCUDAStream()),
               "ternary_packed_mm_cuda");
  return out;
}

at::Tensor ternary_int8_linear(const at::Tensor& x_in, const at::Tensor& codes_in, const at::Tensor& scales_in) {
  check_cuda(x_in, "x", at::kBFloat16, 2);
  check_cuda(codes_in, "codes", at::kChar, 2);
  check_cuda(scales_in, "scales", at::kFloat, 1);
  check_same_device(x_in, codes_in, "codes");
  check_same_device(x_in, scales_in, "scales");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = codes_in.size(0);
  TORCH_CHECK(codes_in.size(1) == K, message("codes must be [N, K] with K = ", K, " (x's last dimension), got ",
              codes_in.sizes()));
  TORCH_CHECK(scales_in.size(0) == N, message("scales must be [N] = [", N, "], got ", scales_in.sizes()));
  TORCH_CHECK((M + 127) / 128 <= 65535, message("x has too many rows for this kernel (M = ", M, ")"));
  if (M == 0 || N == 0 || K == 0) return at::zeros({M, N}, x_in.options());

  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), codes = codes_in.contiguous(), scales = scales_in.contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  check_launch(launch_ternary_int8_linear(cptr<uint16_t>(x), cptr<int8_t>(codes), cptr<float>(scales),
                                          reinterpret_cast<uint16_t*>(out.mutable_data_ptr()), M, N, K,
                                          c10::cuda::getCurrentCUDAStream()),
               "ternary_int8_linear_cuda");
  return out;
}

at::Tensor ternary_int8_mm(const at::Tensor& xq_in, const at::Tensor& xscale_in, const at::Tensor& codes_in,
                           const at::Tensor& scales_in) {
  check_cuda(xq_in, "xq", at::kChar, 2);
  check_cuda(xscale_in, "xscale", at::kFloat, 1);
  check_cuda(codes_in, "codes", at::kChar, 2);
  check_cuda(scales_in, "scales", at::kFloat, 1);
  check_same_device(xq_in, xscale_in, "xscale");
  check_same_device(xq_in, codes_in, "codes");
  check_same_device(xq_in, scales_in, "scales");
  const int64_t M = xq_in.size(0), K = xq_in.size(1), N = codes_in.size(0);
  TORCH_CHECK(xscale_in.size(0) == M, message("xscale must be [M] = [", M, "], got ", xscale_in.sizes()));
  TORCH_CHECK(codes_in.size(1) == K, message("codes must be [N, K] with K = ", K, " (xq's last dimension), got ",
              codes_in.sizes()));
  TORCH_CHECK(scales_in.size(0) == N, message("scales must be [N] = [", N, "], got ", scales_in.sizes()));
  TORCH_CHECK((M + 127) / 128 <= 65535, message("xq has too many rows for this kernel (M = ", M, ")"));
  const auto options = xq_in.options().dtype(at::kBFloat16);
  if (M == 0 || N == 0 || K == 0) return at::zeros({M, N}, options);

  const c10::cuda::CUDAGuard guard(xq_in.device());
  const at::Tensor xq = xq_in.contiguous(), xscale = xscale_in.contiguous(), codes = codes_in.contiguous(),
                   scales = scales_in.contiguous();
  at::Tensor out = at::empty({M, N}, options);
  check_launch(launch_ternary_int8_mm(cptr<int8_t>(xq), cptr<float>(xscale), cptr<int8_t>(codes),
                                      cptr<float>(scales), reinterpret_cast<uint16_t*>(out.mutable_data_ptr()), M,
                                      N, K, c10::cuda::getCurrentCUDAStream()),
               "ternary_int8_mm_cuda");
  return out;
}

at::Tensor softcap_ce_chunk(at::Tensor& logits, const at::Tensor& targets_in, double softcap, double grad_scale) {
  TORCH_CHECK(logits.is_cuda(), message("logits must be a CUDA tensor, got device ", logits.device()));
  TORCH_CHECK(logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kFloat,
              message("logits must be bfloat16 or float32, got ", logits.scalar_type()));
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(),
              message("logits must be a contiguous 2-D [n, V] tensor (it is overwritten in place), got shape ",
                      logits.sizes(), " strides ", logits.strides()));
  TORCH_CHECK(targets_in.dim() == 1 && targets_in.size(0) == logits.size(0),
              message("targets must be 1-D [n] with n = ", logits.size(0), ", got shape ", targets_in.sizes()));
  TORCH_CHECK(targets_in.scalar_type() == at::kLong || targets_in.scalar_type() == at::kInt,
              message("targets must be int64 or int32, got ", targets_in.scalar_type()));
  check_same_device(logits, targets_in, "targets");
  const int64_t n = logits.size(0), V = logits.size(1);
  at::Tensor loss = at::empty({n}, logits.options().dtype(at::kFloat));
  if (n == 0) return loss;
  TORCH_CHECK(V > 0, message("logits must have at least one column"));

  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor targets = targets_in.to(at::kLong).contiguous();
  check_launch(launch_softcap_ce_chunk(logits.mutable_data_ptr(), logits.scalar_type() == at::kBFloat16,
                                       cptr<int64_t>(targets), loss.mutable_data_ptr<float>(), n, V,
                                       static_cast<float>(softcap), static_cast<float>(grad_scale),
                                       c10::cuda::getCurrentCUDAStream()),
               "softcap_ce_chunk_cuda");
  return loss;
}

// Always raises, with a message that holds one of each kind of piece the checks above write: tests call it on
// any machine (it takes no tensors) to see the messages formed and raised, see message.h for why that is in doubt.
void message_selftest(int64_t value, c10::IntArrayRef shape, c10::ScalarType dtype, c10::Device device) {
  TORCH_CHECK(false, message("value ", value, ", shape ", shape, ", dtype ", dtype, ", device ", device));
}

}  // namespace
}  // namespace tgolf

TORCH_LIBRARY_FRAGMENT(tgolf, m) {
  m.def("ternary_packed_mm_cuda(Tensor x, Tensor packed, Tensor scales, int group_size) -> Tensor");
  m.def("ternary_int8_linear_cuda(Tensor x, Tensor codes, Tensor scales) -> Tensor");
  m.def("ternary_int8_mm_cuda(Tensor xq, Tensor xscale, Tensor codes, Tensor scales) -> Tensor");
  m.def("softcap_ce_chunk_cuda(Tensor(a!) logits, Tensor targets, float softcap, float grad_scale) -> Tensor");
  m.def("message_selftest(int value, int[] shape, ScalarType dtype, Device device) -> ()", &tgolf::message_selftest);
}

TORCH_LIBRARY_IMPL(tgolf, CUDA, m) {
  m.impl("ternary_packed_mm_cuda", &tgolf::ternary_packed_mm);
  m.impl("ternary_int8_linear_cuda", &tgolf::ternary_int8_linear);
  m.impl("ternary_int8_mm_cuda", &tgolf::ternary_int8_mm);
  m.impl("softcap_ce_chunk_cuda", &tgolf::softcap_ce_chunk);
}

// `import tgolf._C`: the ops above are registered when the library loads; importing tgolf._extension then
// registers their fake implementations (it does not import this module back, so there is no cycle).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "tgolf's CUDA kernels, registered as torch.ops.tgolf.*",
                            -1, nullptr};
  PyObject* module = PyModule_Create(&def);
  if (module == nullptr) return nullptr;
  PyObject* fakes = PyImport_ImportModule("tgolf._extension");
  if (fakes == nullptr) {
    Py_DECREF(module);
    return nullptr;
  }
  Py_DECREF(fakes);
  return module;
}
