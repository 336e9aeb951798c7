# Third-party dependencies, all from Debian packages. Each missing one stops
# configuration with the package to install (`make deps` installs them all).

function(fm_require found what package)
  if(NOT ${found})
    message(FATAL_ERROR "foremoe: ${what} not found. Install the Debian package '${package}' "
                        "(or run `make deps`, which installs every missing dependency).")
  endif()
endfunction()

find_package(PkgConfig)
fm_require(PkgConfig_FOUND "pkg-config" "pkg-config")

find_package(Threads REQUIRED)

find_package(OpenMP)
fm_require(OpenMP_CXX_FOUND "OpenMP (C++)" "libgomp1 (part of g++)")

# OpenBLAS: the pthread build, called single-threaded from our own fixed
# OpenMP partition so results do not depend on the thread count.
find_path(OPENBLAS_INCLUDE_DIR cblas.h PATH_SUFFIXES openblas-pthread openblas
          PATHS /usr/include/x86_64-linux-gnu /usr/include/aarch64-linux-gnu /usr/include)
find_library(OPENBLAS_LIBRARY NAMES openblas)
if(OPENBLAS_INCLUDE_DIR AND OPENBLAS_LIBRARY)
  set(OPENBLAS_FOUND TRUE)
endif()
fm_require(OPENBLAS_FOUND "OpenBLAS" "libopenblas-dev")
add_library(fm_openblas INTERFACE)
target_include_directories(fm_openblas SYSTEM INTERFACE ${OPENBLAS_INCLUDE_DIR})
target_link_libraries(fm_openblas INTERFACE ${OPENBLAS_LIBRARY})

find_package(yaml-cpp CONFIG QUIET)
fm_require(yaml-cpp_FOUND "yaml-cpp" "libyaml-cpp-dev")

find_package(CLI11 CONFIG QUIET)
fm_require(CLI11_FOUND "CLI11" "libcli11-dev")

find_package(fmt CONFIG QUIET)
fm_require(fmt_FOUND "fmt" "libfmt-dev")

find_package(spdlog CONFIG QUIET)
fm_require(spdlog_FOUND "spdlog" "libspdlog-dev")

find_package(nlohmann_json CONFIG QUIET)
fm_require(nlohmann_json_FOUND "nlohmann-json" "nlohmann-json3-dev")

find_package(OpenSSL QUIET)
fm_require(OpenSSL_FOUND "OpenSSL libcrypto (SHA-256 checksums)" "libssl-dev")

pkg_check_modules(SENTENCEPIECE QUIET IMPORTED_TARGET sentencepiece)
fm_require(SENTENCEPIECE_FOUND "SentencePiece" "libsentencepiece-dev")

find_package(Boost 1.74 QUIET)
fm_require(Boost_FOUND "Boost (Asio)" "libboost-dev")

if(FOREMOE_BUILD_TESTS)
  find_package(GTest CONFIG QUIET)
  fm_require(GTest_FOUND "GoogleTest" "libgtest-dev and libgmock-dev")
endif()
if(FOREMOE_BUILD_BENCH)
  find_package(benchmark CONFIG QUIET)
  fm_require(benchmark_FOUND "Google Benchmark" "libbenchmark-dev")
endif()
