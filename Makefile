# abf: the two commands a fresh machine needs are `make demo` and `make test`.
CARGO    ?= cargo
# llama.cpp (CPU build, through llama-cpp-2) is part of the full test suite.
FEATURES ?= llamacpp
PROPTEST_CASES ?= 256

.PHONY: all build prereqs test lint bench demo experiment fetch fixture-model clean

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

# A fixture model, pre-trained by abf from a seeded initialization on the King James Bible
# (Debian's bible-kjv: apt-get install bible-kjv). One thread, so the float summation order, and
# with it every weight, is the same on any machine of the same build.
# FIXTURE=kjv-tiny (the default; 263k parameters, 200 steps, about 4 minutes) or kjv-passkey
# (3.8M parameters, 1500 + 700 steps of the passkey mixture, about 55 minutes on one core): see
# fixtures/$(FIXTURE)/README.md. FIXTURE_STEPS overrides the fixture's number of steps.
FIXTURE ?= kjv-tiny
FIXTURE_STEPS ?=
fixture-model:
	python3 scripts/fixture_text.py out/fixture-model/text
	$(CARGO) build --quiet --example fixture_model
	RAYON_NUM_THREADS=1 target/debug/examples/fixture_model pretrain --fixture $(FIXTURE) --seed 42 \
	  $(if $(FIXTURE_STEPS),--steps $(FIXTURE_STEPS)) \
	  --text out/fixture-model/text/train.txt --out out/fixture-model/$(FIXTURE)
	# kjv-passkey's second stage (retrieval over the whole window) starts from the first one
	if [ "$(FIXTURE)" = kjv-passkey ]; then \
	  RAYON_NUM_THREADS=1 target/debug/examples/fixture_model pretrain --fixture kjv-passkey --seed 42 \
	    --init out/fixture-model/kjv-passkey --text out/fixture-model/text/train.txt \
	    --out out/fixture-model/kjv-passkey-stage2 && \
	  cp out/fixture-model/kjv-passkey/pretrain_log.jsonl out/fixture-model/kjv-passkey-stage2/pretrain_log_stage1.jsonl && \
	  rm -rf out/fixture-model/kjv-passkey && mv out/fixture-model/kjv-passkey-stage2 out/fixture-model/kjv-passkey; \
	fi
	mkdir -p fixtures/$(FIXTURE)
	cd out/fixture-model/$(FIXTURE) && cp config.json generation_config.json model.safetensors tokenizer.json \
	  tokenizer_config.json pretrain_log*.jsonl ../../../fixtures/$(FIXTURE)/
	cp out/fixture-model/text/heldout.txt fixtures/$(FIXTURE)/heldout-john.txt

# The paper's experiment on fixtures/kjv-passkey: 6 methods x 3 fine-tune seeds, perplexity,
# passkey and attention entropy, mean and spread (scripts/experiment.sh; docs/results.md).
# SAMPLES="32 100 400" adds the data-efficiency runs.
experiment:
	FEATURES=$(FEATURES) bash scripts/experiment.sh

clean:
	$(CARGO) clean
	rm -rf out
