# Two commands do all set-up on a fresh machine (each creates .venv if absent):
#   make pipeline   the main job: SFT -> RLVR -> GenRM -> RLHF on smollm2-135m-instruct, then the report
#   make test       the fast test suite (what CI runs)
VENV ?= .venv
EXTRAS ?= cpu,dev
BIN := $(VENV)/bin
export OMP_NUM_THREADS ?= 1

.PHONY: install pipeline demo test test-all clean-venv
RUN ?= runs/pipeline-smollm2

$(VENV)/.posttrain-installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV) $(EXTRAS)

install: $(VENV)/.posttrain-installed

pipeline: install
	$(BIN)/posttrain pipeline --config configs/pipeline/smollm2.yaml run_dir=$(RUN)

demo: install
	$(BIN)/posttrain models prepare smollm2-135m-instruct
	$(BIN)/posttrain chat --model smollm2-135m-instruct --no-think "What is the capital of France? Answer in one sentence."
	$(BIN)/posttrain chat --model smollm2-135m-instruct --budget 32 --max-new-tokens 96 "Write a Python function that returns the square of a number."

test: install
	$(BIN)/python -m pytest -m "not slow and not gpu" -q --durations=20

test-all: install
	$(BIN)/python -m pytest -m "not gpu" -q

clean-venv:
	rm -rf $(VENV)
