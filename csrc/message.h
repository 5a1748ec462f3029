// Error messages for TORCH_CHECK, built as one std::string without any iostream.
//
// Why: on the GPU machines' image (GCC 13 headers, torch 2.11.0+cu130, the extension built there), writing an
// integer into the ostringstream that TORCH_CHECK formats its arguments with crashed the process (SIGSEGV in
// std::basic_ostream<char>::_M_insert<long>, reached from c10::str; both GPU runs, 2026-11-27 on an H100 and
// 2026-11-28 on an H200, backtrace in profiles/2026-11-28-NVIDIA-H200/crash_backtrace.log). Messages that held only
// text and dtypes were raised cleanly there, so the stream's number formatting is what fails. A TORCH_CHECK whose
// message is a single std::string hands it to c10 as it is (c10::detail::_str_wrapper<std::string>), and
// std::to_string formats integers without a locale, so a bad argument is reported instead of killing the process.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <string>
#include <type_traits>

namespace tgolf {

inline void append_to(std::string& out, const char* text) { out += text; }
inline void append_to(std::string& out, const std::string& text) { out += text; }
inline void append_to(std::string& out, c10::ScalarType dtype) { out += c10::toString(dtype); }
inline void append_to(std::string& out, const c10::Device& device) { out += device.str(); }

template <typename Int, std::enable_if_t<std::is_integral_v<Int>, int> = 0>
void append_to(std::string& out, Int value) {
  out += std::to_string(value);
}

// A shape or strides, written as torch prints them: [2, 3].
inline void append_to(std::string& out, c10::IntArrayRef values) {
  out += '[';
  for (size_t i = 0; i < values.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(values[i]);
  }
  out += ']';
}

// message("x must be ", 2, "-D, got shape ", t.sizes()): the pieces joined into one string.
template <typename... Pieces>
std::string message(const Pieces&... pieces) {
  std::string out;
  (append_to(out, pieces), ...);
  return out;
}

}  // namespace tgolf
