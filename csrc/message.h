// Numbers and shapes as text for the native ops' error messages.
//
// The messages never pass a number to std::ostream (TORCH_CHECK formats its arguments with
// c10::str, an ostringstream): they format numbers here with std::to_string / snprintf and hand
// TORCH_CHECK strings only. Numeric stream insertion goes through std::ostream::_M_insert<T> and
// the locale's num_put facet; one CUDA build of this extension carried its own copy of
// _M_insert<long> and crashed in it while formatting a message (benchmarks/GPU_NOTES.md), where
// strings take the plain character path. torch's inline headers still insert numbers on their own
// internal-invariant checks; those are not ours to change. The text is the same as
// the stream would give: integers in decimal, doubles as "%g" (the stream's default precision 6),
// shapes as "[2, 3]" like c10's ArrayRef printer.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

namespace sara_kernels_msg {

template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
inline std::string num(T value) {
  return std::to_string(value);
}

inline std::string num(double value) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%g", value);
  return buffer;
}

inline std::string shape(c10::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(sizes[i]);
  }
  return out + "]";
}

}  // namespace sara_kernels_msg
