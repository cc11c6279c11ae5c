# Stages of the pipeline as make targets. `make help` lists them.
# Real data: make folds train-all infer        Embedded synthetic demo: make demo
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build to install; on a GPU box pick yours, e.g. TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1
# keyed on the torch choice too: `make install TORCH=...` after a first install takes effect
STAMP := $(VENV)/.installed-$(shell printf '%s' '$(TORCH)' | cksum | cut -d' ' -f1)
CONFIG ?= configs/effnet_b5_512.yaml
FOLDS_CSV ?= folds/folds.csv
ARGS ?=
FOLD ?= 0
FOLDS ?=
GPUS ?=
MSG ?= submission
DEMO_CONFIG := configs/demo.yaml
RUN = $(BIN)/python scripts/$(1).py --config $(CONFIG) folds.output=$(FOLDS_CSV) $(ARGS)

# offline by default; the first run with pretrained weights on your machine: HF_HUB_OFFLINE=0
NO_ALBUMENTATIONS_UPDATE ?= 1
HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE HF_HUB_OFFLINE
export PYTHONUNBUFFERED := 1

.DEFAULT_GOAL := help
.PHONY: help install demo data-demo folds train train-all infer ensemble check-submission \
        submit report download bench compare experiments scores slurm test test-slow lint clean-demo

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  make %-17s %s\n", $$1, $$2}'
	@echo "  variables: CONFIG=$(CONFIG) ARGS='section.key=value ...' FOLD=k FOLDS='0 1' MSG='...' TORCH='$(TORCH)'"

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP) ## create .venv and install the project (skipped when setup.cfg is unchanged)

demo: $(STAMP) ## the whole chain on generated data, CPU, a few minutes
	$(MAKE) --no-print-directory data-demo folds train-all infer check-submission report \
	  CONFIG=$(DEMO_CONFIG) FOLDS_CSV=folds/demo.csv

data-demo: $(STAMP) ## generate the synthetic data set in Kaggle layout (configs/demo.yaml)
	$(BIN)/python scripts/make_synthetic.py --config $(DEMO_CONFIG) $(ARGS)

folds: $(FOLDS_CSV) ## merge the CSVs and write stratified patient-grouped folds

$(FOLDS_CSV): $(STAMP) $(CONFIG) pipeline/folds.py pipeline/merge.py
	$(call RUN,make_folds)

train: $(FOLDS_CSV) ## train one fold: make train FOLD=k
	$(call RUN,train) --folds $(FOLD)

train-all: $(FOLDS_CSV) ## train every fold (or FOLDS="0 1"; GPUS="0 1 2 3": one fold per GPU at a time); finished folds are skipped, killed ones resume
	$(call RUN,train) $(if $(FOLDS),--folds $(FOLDS)) $(if $(GPUS),--gpus $(GPUS))

slurm: $(FOLDS_CSV) ## SLURM job array over folds (one GPU each) + a summary job: runs/<experiment>/slurm/submit.sh
	$(BIN)/python scripts/slurm/make_jobs.py --config $(CONFIG) folds.output=$(FOLDS_CSV) $(ARGS)

infer: $(STAMP) ## TTA inference of every fold model into numbered submissions, then the ensemble (GPUS="0 1": shard the models)
	$(call RUN,infer) $(if $(GPUS),--gpus $(GPUS))

ensemble: $(STAMP) ## combine numbered submissions (mean | rank | weighted) into the ensemble CSV
	$(call RUN,ensemble)

check-submission: $(STAMP) ## check the ensemble CSV against sample_submission.csv
	$(call RUN,check_submission)

report: $(STAMP) ## CV AUC, TTA gain on OOF, final CSV (and hidden test AUC on generated data)
	$(call RUN,report)

submit: $(STAMP) ## check, then kaggle competitions submit: make submit MSG="..."
	$(call RUN,submit) --message "$(MSG)"

scores: $(STAMP) ## read Kaggle's scores into pending rows of submissions/scores.csv and print the table
	$(call RUN,scores)

experiments: $(STAMP) ## every experiment under runs_dir in one table: CV, TTA gain, settings, commit, Kaggle scores (runs/experiments.{csv,html})
	$(call RUN,experiments)

download: $(STAMP) ## kaggle CLI: competition CSVs + 512-px 2020 and ISIC 2019 JPEGs into data/
	$(call RUN,download)

compare: $(FOLDS_CSV) ## options side by side over seeds (compare.variants), e.g. CONFIG=configs/demo.yaml FOLDS_CSV=folds/demo.csv
	$(call RUN,compare)

bench: $(STAMP) ## speed figures: Lightning vs plain loop, loader vs cv2, TTA vs forward rate
	$(call RUN,bench)

test: $(STAMP) ## the fast test suite
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) ## the slow tests (end to end)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP) ## ruff check
	$(BIN)/ruff check pipeline scripts tests

clean-demo: ## remove the demo's data, folds, runs and submissions
	rm -rf data/synthetic folds/demo.csv folds/demo.config.yaml runs/demo submissions/demo
