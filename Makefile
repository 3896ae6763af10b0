# abf: the two commands a fresh machine needs are `make demo` and `make test`.
CARGO    ?= cargo
# llama.cpp (CPU build, through llama-cpp-2) is part of the full test suite.
FEATURES ?= llamacpp
PROPTEST_CASES ?= 256

.PHONY: all build prereqs test lint bench demo fetch fixture-model clean

all: build

build: prereqs
	$(CARGO) build --release --features $(FEATURES)

# cmake, clang/libclang (llama.cpp's build), Python with pip: installed when possible, else a
# failure in the first seconds with the command to run. The same step .ci/run uses.
prereqs:
	@bash scripts/prereqs.sh

# Real model and cross-check tools, cached in .cache/ (never committed).
fetch: prereqs
	bash scripts/fetch-data.sh

# The whole suite. ABF_REQUIRE_DATA makes tests that need the fetched model fail, not skip.
test: fetch
	ABF_REQUIRE_DATA=1 PROPTEST_CASES=$(PROPTEST_CASES) $(CARGO) test --features $(FEATURES)

lint: prereqs
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --features $(FEATURES) -- -D warnings

bench: fetch
	bash scripts/bench.sh

demo: fetch
	FEATURES=$(FEATURES) bash scripts/demo.sh

# The demo's tiny model (fixtures/kjv-tiny), pre-trained by abf from a seeded initialization on the
# King James Bible (Debian's bible-kjv: apt-get install bible-kjv). One thread, so the float
# summation order, and with it every weight, is the same on any machine of the same build.
FIXTURE_STEPS ?= 200
fixture-model:
	python3 scripts/fixture_text.py out/fixture-model/text
	$(CARGO) build --quiet --example fixture_model
	RAYON_NUM_THREADS=1 target/debug/examples/fixture_model pretrain --seed 42 --steps $(FIXTURE_STEPS) \
	  --text out/fixture-model/text/train.txt --out out/fixture-model/model
	mkdir -p fixtures/kjv-tiny
	cd out/fixture-model/model && cp config.json generation_config.json model.safetensors tokenizer.json \
	  tokenizer_config.json pretrain_log.jsonl ../../../fixtures/kjv-tiny/
	cp out/fixture-model/text/heldout.txt fixtures/kjv-tiny/heldout-john.txt

clean:
	$(CARGO) clean
	rm -rf out
