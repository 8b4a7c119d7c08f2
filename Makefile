# Two commands on a fresh machine: `make run` (the main job on the tiny default) and `make test`.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: run test bench clean

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	# torch first and alone: the pinned CPU file on this disk, never a multi-GB CUDA build by accident
	$(PY) -m pip install -q torch==$$(sed -n 's/^torch==//p' requirements.txt)
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

run: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) launch.py $(ARGS)

.venv/.installed-test: $(STAMP) requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch .venv/.installed-test

test: .venv/.installed-test
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench.rollout --out bench/results/rollout.json

clean:
	rm -rf .venv runs wandb
