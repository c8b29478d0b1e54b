# glm3-pipeline. `make run`: set up and run the embedded default; `make test`: set up and run the tests.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export GLOG_v ?= 3
export DVC_NO_ANALYTICS := 1
# The venv's bin first: DVC stages run `python -m stages.<name>`, msrun starts `python` workers.
IN_VENV := PATH="$(abspath $(BIN)):$$PATH"

.PHONY: setup run serve prefect lint test test-fast bench bench-6b rehearsal-6b rehearsal-6b-args clean

setup: $(STAMP)

# Re-installs only when the dependency pins change; a no-op (well under a second) otherwise.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e . 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import glm3, mindspore, torch, sentencepiece, safetensors, huggingface_hub, dvc, prefect"
	touch $(STAMP)

# The main job: the DVC pipeline (dvc.yaml) on the embedded default of params.yaml, offline; a second run
# is a no-op. Then where its results are.
run: setup
	$(IN_VENV) dvc repro
	$(IN_VENV) dvc metrics show
	$(IN_VENV) dvc plots show >/dev/null
	@echo
	@echo "metrics:        metrics/finetune.json, metrics/ceval.json, metrics/adgen.json (dvc metrics show)"
	@echo "plots:          metrics/loss.png, metrics/ceval_categories.png (all in dvc_plots/index.html, offline)"
	@echo "exported model: models/export (prefill.mindir, decode.mindir; try: .venv/bin/glm3 infer --model models/export --prompt 你好)"
	@echo "fine-tuned:     models/finetune (run, checkpoints, train_log.tsv), models/merged (merged model)"

# The pipeline's export behind the OpenAI-compatible API on http://127.0.0.1:8000/v1 (Ctrl-C stops it);
# SERVE_ARGS for more flags (`glm3 serve --help`), e.g. SERVE_ARGS="--port 9000 --api-key KEY".
serve: setup
	@test -f models/export/export_config.json || { echo "no models/export yet: run 'make run' first"; exit 2; }
	$(IN_VENV) glm3 serve --model models/export $(SERVE_ARGS)

# A local Prefect server serving glm3/pipeline and glm3/finetune (Ctrl-C stops it).
prefect: setup
	$(IN_VENV) glm3 prefect up

# Test files run in parallel (pytest-xdist), each file on one worker, as its module fixtures (a DVC project, a
# Prefect server) are shared by its tests. TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= 2
test: setup
	$(IN_VENV) python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The unit tests only: everything but the real DVC pipelines and the Prefect server (about half the time).
test-fast: setup
	$(IN_VENV) python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not integration" tests

# ruff: lint rules and formatting as configured in pyproject.toml (`ruff format .` applies the formatting).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The rehearsal at the real size: the whole pipeline on the ChatGLM3-6B shape (random weights, float16),
# LoRA, C-Eval on the shipped sample, two ADGEN records; an experiment, so params.yaml stays as it is. The
# export's paged cache is sized for its one 256-token context at a time (16 blocks and the scratch block).
# About 12 min and 25 GB of disk beside the 12.5 GB synthetic source (written once, in about 3 min, into
# ~/.cache/glm3/synthetic).
REHEARSAL_6B := -S download.synthetic_preset=glm3_6b -S convert.dtype=float16 -S finetune.lora.enabled=true \
	-S finetune.steps=2 -S finetune.warmup_steps=1 -S finetune.batch_size=1 -S finetune.save_every=0 -S export.prompt_length=128 \
	-S export.seq_length=256 -S export.num_blocks=17 -S evaluate.batch_size=1 -S adgen_eval.limit=2 -S adgen_eval.batch_size=1 \
	-S adgen_eval.max_new_tokens=8

rehearsal-6b: setup
	$(IN_VENV) dvc exp run $(REHEARSAL_6B)

rehearsal-6b-args:
	@echo $(REHEARSAL_6B)

bench: setup
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/serve.py
	$(BIN)/python benchmarks/convert_6b.py
	$(IN_VENV) python benchmarks/train.py
	$(IN_VENV) python benchmarks/pipeline.py

# The rehearsal in a scratch clone, measured stage by stage (benchmarks/pipeline_6b.py).
bench-6b: setup
	$(IN_VENV) python benchmarks/pipeline_6b.py

clean:
	rm -rf $(VENV) .pytest_cache dvc_plots .prefect models/hf models/ms models/rank_table models/finetune \
		models/merged models/export models/ceval models/adgen_eval models/.work models/prefect
