# glm3-pipeline. `make run`: set up and run the embedded default; `make test`: set up and run the tests.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_HF := models/demo-tiny-hf
DEMO := models/demo-tiny
export GLOG_v ?= 3

.PHONY: setup run test bench clean

setup: $(STAMP)

# Re-installs only when the dependency pins change; a no-op (well under a second) otherwise.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e . 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import glm3, mindspore, torch, sentencepiece, safetensors, huggingface_hub"
	touch $(STAMP)

# Embedded default (until the DVC pipeline lands): a random-weight tiny ChatGLM3 in HuggingFace layout
# with a tokenizer trained from the shipped corpus, converted to MindSpore, chatted with, offline.
run: setup
	$(BIN)/glm3 download --synthetic tiny --dst $(DEMO_HF) --overwrite --quiet
	$(BIN)/glm3 convert --src $(DEMO_HF) --dst $(DEMO) --overwrite --quiet
	printf '你好\n请介绍一下你自己。\n' | $(BIN)/glm3 chat --model $(DEMO) --seed 0 --max-new-tokens 24
	$(BIN)/glm3 generate --model $(DEMO) --prompt "这款连衣裙" --prompt "Hello" --max-new-tokens 16 --json
	$(BIN)/glm3 finetune --model $(DEMO) --data data/adgen_sample.json --output models/demo-finetune --resume never \
		--steps 30 --lr 2e-3 --batch-size 4 --max-source-length 32 --max-target-length 32 --seq-length 65 --quiet

test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/convert_6b.py
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python benchmarks/train.py

clean:
	rm -rf $(VENV) $(DEMO) $(DEMO_HF) models/demo-finetune .pytest_cache
