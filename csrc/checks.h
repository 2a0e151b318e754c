// Argument checks of the dcal._C entry points: one macro family for every op and device, so each
// bad argument is reported the same way, "<op>: <which argument, what it is>; <what is expected>",
// before anything is allocated or launched (host code reads: checks -> device guard -> allocate
// -> dispatch).
//
//   DCAL_CHECK_SHAPE(op, cond, ...)   rank, sizes and lengths of tensors, counts of tensor lists
//   DCAL_CHECK_DTYPE(op, cond, ...)   dtypes
//   DCAL_CHECK_DEVICE(op, cond, ...)  devices
//   DCAL_CHECK_ARG(op, cond, ...)     any other argument: kernel_size, border, residual, size limits
//
// `op` is an OpName: the op's name, which starts the message, and the Python class its errors
// have. The remaining arguments are the message, concatenated as TORCH_CHECK concatenates them.
// The class is part of each op's interface and stays what callers catch: kPythonErrors ops raise
// TypeError for a dtype and ValueError otherwise, like the public dcal.ops functions;
// kRuntimeErrors ops raise RuntimeError (TORCH_CHECK's class) for every check.
#pragma once
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <cstdint>
#include <string>
#include <utility>

namespace dcal {

enum class ErrorClasses { kRuntimeErrors, kPythonErrors };

struct OpName {
  const char* name;
  ErrorClasses classes;
};

namespace check_detail {

enum class What { kShape, kDtype, kDevice, kArg };

[[noreturn]] inline void fail(const OpName& op, What what, const char* func, const char* file, uint32_t line,
                              const std::string& msg) {
  const c10::SourceLocation where{func, file, line};
  std::string text = c10::str(op.name, ": ", msg);
  if (op.classes == ErrorClasses::kRuntimeErrors) throw c10::Error(where, std::move(text));
  if (what == What::kDtype) throw c10::TypeError(where, std::move(text));
  throw c10::ValueError(where, std::move(text));
}

}  // namespace check_detail
}  // namespace dcal

#define DCAL_CHECK_WHAT_(WHAT, OP, COND, ...)                                               \
  do {                                                                                      \
    if (C10_UNLIKELY(!(COND))) {                                                            \
      ::dcal::check_detail::fail(OP, ::dcal::check_detail::What::WHAT, __func__, __FILE__,  \
                                 static_cast<uint32_t>(__LINE__), ::c10::str(__VA_ARGS__)); \
    }                                                                                       \
  } while (false)

#define DCAL_CHECK_SHAPE(OP, COND, ...) DCAL_CHECK_WHAT_(kShape, OP, COND, __VA_ARGS__)
#define DCAL_CHECK_DTYPE(OP, COND, ...) DCAL_CHECK_WHAT_(kDtype, OP, COND, __VA_ARGS__)
#define DCAL_CHECK_DEVICE(OP, COND, ...) DCAL_CHECK_WHAT_(kDevice, OP, COND, __VA_ARGS__)
#define DCAL_CHECK_ARG(OP, COND, ...) DCAL_CHECK_WHAT_(kArg, OP, COND, __VA_ARGS__)
