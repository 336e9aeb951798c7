// foremoe's one error type and the check macro used for bad input and broken
// invariants. Messages name the file / key / offset and what was expected.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace fm {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace fm

// FM_CHECK(cond, "fmt string", args...) throws fm::Error with the formatted message.
#define FM_CHECK(cond, ...)                                     \
  do {                                                          \
    if (!(cond)) throw ::fm::Error(::fmt::format(__VA_ARGS__)); \
  } while (0)
