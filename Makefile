# abf: the two commands a fresh machine needs are `make demo` and `make test`.
CARGO    ?= cargo
# llama.cpp (CPU build, through llama-cpp-2) is part of the full test suite.
FEATURES ?= llamacpp
PROPTEST_CASES ?= 256

.PHONY: all build test lint bench demo fetch fixture-model clean

all: build

build:
	$(CARGO) build --release --features $(FEATURES)

# Real model and cross-check tools, cached in .cache/ (never committed).
fetch:
	bash scripts/fetch-data.sh

# The whole suite. ABF_REQUIRE_DATA makes tests that need the fetched model fail, not skip.
test: fetch
	ABF_REQUIRE_DATA=1 PROPTEST_CASES=$(PROPTEST_CASES) $(CARGO) test --features $(FEATURES)

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --features $(FEATURES) -- -D warnings

bench: fetch
	bash scripts/bench.sh

demo: fetch
	bash scripts/demo.sh

clean:
	$(CARGO) clean
	rm -rf out
