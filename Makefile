# foremoe: the two set-up commands are `make demo` and `make test`.
# Both install missing Debian packages first (as root, or through sudo).

BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
CTEST_FLAGS ?=

# Debian 12 packages the build needs (the CUDA toolkit is optional and not installed here).
DEBS := build-essential cmake ninja-build pkg-config git \
        libopenblas-dev libyaml-cpp-dev libcli11-dev libspdlog-dev libfmt-dev \
        nlohmann-json3-dev libsentencepiece-dev libboost-dev libssl-dev \
        libgtest-dev libgmock-dev libbenchmark-dev python3-matplotlib libgloo-dev

.PHONY: deps configure build test test-fast demo bench format clean

deps:
	@missing=""; \
	for p in $(DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi; \
	  echo "installing:$$missing"; \
	  $$sudo apt-get update && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y --no-install-recommends $$missing; \
	else \
	  echo "all Debian dependencies present"; \
	fi

configure: deps
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

build: configure
	cmake --build $(BUILD) -j $(JOBS)

# The whole suite (GPU tests skip themselves without a GPU).
test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS) $(CTEST_FLAGS)

# Everything but the tests labelled slow.
test-fast: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS) -LE slow

# The main job on its embedded default config.
demo: build
	$(BUILD)/tools/foremoe train

bench: build
	$(BUILD)/bench/bench_model_cpu
	$(BUILD)/bench/bench_generation_cpu

format:
	git ls-files '*.h' '*.cpp' '*.cu' '*.cuh' | xargs clang-format -i

clean:
	rm -rf $(BUILD)
