# Homework 3, from the course data to hw3_report.pdf, as one graph of result files.
# `make` (or `make help`) lists the targets and variables; `make -n TARGET` prints its commands without
# running them. Apart from the targets `make help` names, every target is a file, rebuilt only when what
# it depends on changed. Paths and the device are variables: `make report DATA=/data/hw3_data DEVICE=cuda`.

.DEFAULT_GOAL := help

PYTHON ?= python3
DATA ?= hw3_data
OUT ?= outputs
CKPT ?= checkpoints
FEATURES ?= cache/features
DEVICE ?= auto
REPORT ?= hw3_report.pdf
NOTES ?= report_notes.md
# extra options: every p2_train.py run, p2_evaluate.py, build_report.py, selfcheck.py
TRAIN_ARGS ?=
EVAL_ARGS ?=
REPORT_ARGS ?=
CHECK_ARGS ?=
# GPUS=0,1,...: `make -j train` gives each training run one of these GPUs, round robin
# (CUDA_VISIBLE_DEVICES per run); empty: every run sees the machine's GPUs, i.e. uses the first.
GPUS ?=

# `make test-graders`: the tests on the graders' stack, in a virtual environment of its own. A Python 3.8
# on PATH or installed by pyenv; PyPI's torch 1.12.1 (a CUDA 10.2 build, which also runs on the CPU).
GRADERS_PYTHON ?= $(firstword $(shell for p in python3.8 $$HOME/.pyenv/versions/3.8*/bin/python3.8; do \
    "$$p" -c "" 2>/dev/null && echo "$$p"; done))
GRADERS_VENV ?= .venv-graders
GRADERS_STACK := torch==1.12.1 torchvision==0.13.1

# The course data (Google Drive, fetched with gdown). GPT-2's vocabulary is committed (encoder.json, vocab.bpe).
DATA_GDRIVE_ID := 11rP6KmR5Qwjhx0rfag0b5TZGBTRuPtQR

# `make demo` reruns this Makefile with DEMO=1: same graph, demo/ paths, tiny models.
DEMO_DIR ?= demo
ifeq ($(DEMO),1)
# The demo is its own world: no HW3_* setting of the user's shell (a checkpoint, an encoder file, CLIP
# models, a cache, batch sizes...) reaches its commands, and its paths and options win over the command
# line's (only DEMO_DIR and PYTHON are the user's); it exports only its own settings, below.
unexport $(filter HW3_%,$(.VARIABLES))
override DATA := $(DEMO_DIR)/hw3_data
override OUT := $(DEMO_DIR)/outputs
override CKPT := $(DEMO_DIR)/checkpoints
override FEATURES := $(DEMO_DIR)/features
override DEVICE := cpu
override REPORT := $(DEMO_DIR)/hw3_report.pdf
override NOTES := $(DEMO_DIR)/report_notes.md
# demo.py's tiny ViT (DEMO_ENCODER, DEMO_ENCODER_KWARGS); 80 steps of 16 captions a run, no SCST,
# decoding chosen between greedy and beam 3
override TRAIN_ARGS := --encoder vit_tiny_patch16_224 \
    --encoder-kwargs '{"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}' \
    --epochs 3 --max-steps 80 --batch-size 16 --lr 3e-3 --warmup-steps 5 --val-every 40 --log-every 10 \
    --scst-epochs 0 --decode-beams 1 3 --decode-length-penalties 0 --max-len 16
override EVAL_ARGS := --clip-model $(DEMO_DIR)/models/tiny_clip.pt
override REPORT_ARGS := --synthetic
override CHECK_ARGS := --samples 4
export HW3_CACHE := $(abspath $(DEMO_DIR)/cache)
export HW3_P1_CLIP := $(abspath $(DEMO_DIR)/models/tiny_clip.pt)
export HF_HUB_OFFLINE := 1
endif

RUNS := none adapter prefix lora
TRAIN_RUNS := $(RUNS) baseline
P1 := $(DATA)/p1_data
P2 := $(DATA)/p2_data
ID2LABEL := $(P1)/id2label.json
DECODER := $(P2)/decoder_model.bin
TRAIN_JSON := $(P2)/train.json
VAL_JSON := $(P2)/val.json
VAL_IMAGES := $(P2)/images/val
P3_IMAGES := $(addprefix $(DATA)/p3_data/images/,bike.jpg girl.jpg sheep.jpg ski.jpg umbrella.jpg)
# the top-5 charts: three validation images of three different classes, the same three every run (p1_report.py)
P1_TOP5_IMAGES = --pick-from $(P1)/val
ATT := $(OUT)
BEST := $(OUT)/p2_ckpt_best.txt

ifeq ($(DEMO),1)
DATA_FILES := $(DATA)/demo.json
else
DATA_FILES := $(ID2LABEL) $(TRAIN_JSON) $(VAL_JSON) $(DECODER) $(P3_IMAGES)
endif

.DELETE_ON_ERROR:
.PHONY: help data weights train report check demo test test-graders print-graders-python
# checkpoints, predictions and scores are results, never intermediates to delete
.SECONDARY:

# ---------------------------------------------------------------- help (the default goal)

help:
	@echo "Homework 3 as one graph of result files: make TARGET [VARIABLE=value ...]; make -n TARGET prints the commands."
	@echo ""
	@echo "  make data     the course data into \$$(DATA) with gdown (skipped when there); download-bound, minutes"
	@echo "  make weights  CLIP ViT-L/14 + @336px (converted to plain weights) and the timm encoder into cache/ (as"
	@echo "                hw3_download.sh; no input); download-bound, minutes"
	@echo "  make train    p2_train.py for $(RUNS) from \$$(DATA)/p2_data into \$$(CKPT)/RUN.pt, resuming an"
	@echo "                interrupted run; hours per run on a 2080 Ti (make -j train GPUS=0,1,... runs them in parallel)"
	@echo "  make report   hw3_report.pdf from \$$(DATA) and the trained runs (Problem 1 predictions and report numbers,"
	@echo "                each run's validation captions and scores, the baseline, the best run, attention figures);"
	@echo "                under an hour on a GPU after training"
	@echo "  make check    selfcheck.py on the result (\$$(DATA)/p2_data/decoder_model.bin, the cache); minutes"
	@echo "  make demo     all of the above on synthetic data and tiny random models into \$$(DEMO_DIR)/, offline on a"
	@echo "                CPU (no input; clears every HW3_* variable of your shell); about 10-20 minutes"
	@echo "  make test     the tests (python3 -m pytest -q); tens of minutes on 2 CPU cores"
	@echo "  make test-graders  the same tests on the graders' stack (Python 3.8, $(GRADERS_STACK), timm"
	@echo "                0.9.10) in \$$(GRADERS_VENV), made on first use (about 2 GB, a minute); tens of minutes"
	@echo "  make help     this list (also plain make)"
	@echo ""
	@echo "Variables (now):"
	@echo "  DATA=$(DATA)  OUT=$(OUT)  CKPT=$(CKPT)  FEATURES=$(FEATURES)  DEVICE=$(DEVICE)"
	@echo "  REPORT=$(REPORT)  NOTES=$(NOTES)  PYTHON=$(PYTHON)  DEMO_DIR=$(DEMO_DIR)"
	@echo "  GPUS=$(GPUS)  (0,1,...: one GPU per training run, round robin; empty: the default GPU)"
	@echo "  GRADERS_PYTHON=$(GRADERS_PYTHON)  GRADERS_VENV=$(GRADERS_VENV)"
	@echo "  TRAIN_ARGS, EVAL_ARGS, REPORT_ARGS, CHECK_ARGS: extra options of p2_train.py, p2_evaluate.py,"
	@echo "  build_report.py, selfcheck.py"

# ---------------------------------------------------------------- data and weights

data:
	@if [ -f $(VAL_JSON) ] && [ -f $(ID2LABEL) ]; then echo "$(DATA) is there; nothing to fetch"; else \
	  set -e; gdown -O $(DATA).zip $(DATA_GDRIVE_ID); rm -rf $(DATA).unzip; \
	  $(PYTHON) -m zipfile -e $(DATA).zip $(DATA).unzip; \
	  src=$$(dirname "$$(find $(DATA).unzip -type d -name p1_data | head -n 1)"); \
	  mv "$$src" $(DATA); rm -rf $(DATA).zip $(DATA).unzip; echo "course data in $(DATA)"; fi

ifneq ($(DEMO),1)
# A missing data file is not made here: its rule says how to get it.
$(DATA_FILES):
	@echo "error: $@ is missing: run \`make data\` first (or set DATA=folder of the course data)" >&2; exit 1
endif

# What inference needs besides the trained checkpoint, into the cache (as hw3_download.sh does).
weights:
	$(PYTHON) hw3_cache.py clip
	$(PYTHON) hw3_cache.py encoder

# ---------------------------------------------------------------- Problem 2 training

train: $(RUNS:%=$(CKPT)/%.pt)

# GPUS round robin: run number i of TRAIN_RUNS gets word i of the GPU list repeated once per run.
comma := ,
GPU_LIST := $(subst $(comma), ,$(GPUS))
GPU_CYCLE := $(foreach run,$(TRAIN_RUNS),$(GPU_LIST))
# position of $(1) in the list $(2) (1 when absent), counted in the words of $(3)
position = $(if $(2),$(if $(filter $(1),$(firstword $(2))),$(words $(3) x),$(call position,$(1),$(wordlist 2,$(words $(2)),$(2)),$(3) x)),1)
gpu_of = $(if $(GPU_LIST),CUDA_VISIBLE_DEVICES=$(word $(call position,$(1),$(TRAIN_RUNS)),$(GPU_CYCLE)) )

# An interrupted run continues from its .state (make deletes the half-made checkpoint on an interrupt).
$(CKPT)/%.pt: $(DATA_FILES)
	$(call gpu_of,$*)$(PYTHON) p2_train.py --data-root $(P2) --decoder-weights $(DECODER) --peft $* --out $@ \
	    --cache-features $(FEATURES) --device $(DEVICE) $(TRAIN_ARGS) $(if $(wildcard $@.state),--resume)

# The language-model-only baseline: the untrained captioner (new modules at their identity start) is GPT-2.
$(CKPT)/baseline.pt: $(DATA_FILES)
	$(call gpu_of,baseline)$(PYTHON) p2_train.py --data-root $(P2) --decoder-weights $(DECODER) --peft none --out $@ \
	    --cache-features $(FEATURES) --device $(DEVICE) $(TRAIN_ARGS) \
	    --epochs 0 --max-steps 0 --scst-epochs 0 --scst-max-steps 0 --decode-beams 1 --decode-length-penalties 0 \
	    $(if $(wildcard $@.state),--resume)

# ---------------------------------------------------------------- report

report: $(REPORT)

$(OUT)/p1_pred.csv: $(DATA_FILES)
	bash hw3_1.sh $(P1)/val $(ID2LABEL) $@

$(OUT)/p1_prompts.json: $(DATA_FILES)
	$(PYTHON) p1_report.py accuracy --val-dir $(P1)/val --id2label $(ID2LABEL) --out-dir $(OUT)

$(OUT)/p1_top5.json: $(DATA_FILES)
	$(PYTHON) p1_report.py top5 --id2label $(ID2LABEL) --out-dir $(OUT) $(P1_TOP5_IMAGES)

# validation captions of a run through the graders' script, then their scores
$(OUT)/p2_pred_%.json: $(CKPT)/%.pt
	HW3_P2_CKPT=$< bash hw3_2.sh $(VAL_IMAGES) $@ $(DECODER)

$(OUT)/p2_metrics_%.json: $(OUT)/p2_pred_%.json
	$(PYTHON) p2_evaluate.py --pred_file $< --images_root $(VAL_IMAGES) --annotation_file $(VAL_JSON) \
	    --device $(DEVICE) --metrics-out $@ --per-image $(OUT)/p2_per_image_$*.json $(EVAL_ARGS)

$(OUT)/p2_ckpt_%.txt: $(CKPT)/%.pt
	@mkdir -p $(@D)
	echo $< > $@

# the submitted run, chosen by validation CIDEr; also installed as the cache's p2_checkpoint.pt
$(BEST): $(RUNS:%=$(OUT)/p2_metrics_%.json) $(RUNS:%=$(OUT)/p2_ckpt_%.txt)
	$(PYTHON) p2_select.py --results $(OUT) --runs $(RUNS)

# the five p3_data images and the top-1 / last-1 validation images of the best run
$(ATT)/attention.json: $(BEST) $(DATA_FILES)
	$(PYTHON) p2_attention.py --images $(P3_IMAGES) --per-image $(OUT)/p2_per_image.json \
	    --images-root $(VAL_IMAGES) --out-dir $(ATT) --checkpoint $$(cat $(BEST)) --decoder-weights $(DECODER)

$(REPORT): $(OUT)/p1_pred.csv $(OUT)/p1_prompts.json $(OUT)/p1_top5.json $(BEST) \
           $(OUT)/p2_metrics_baseline.json $(ATT)/attention.json $(NOTES)
	$(PYTHON) build_report.py --results $(OUT) --attention-dir $(ATT) --notes $(NOTES) --out $@ $(REPORT_ARGS)

# ---------------------------------------------------------------- checks

ifneq ($(DEMO),1)
check:
	$(PYTHON) selfcheck.py --decoder-weights $(DECODER) $(CHECK_ARGS)
else
# The demo has no uploaded checkpoint URL, its report is not at the repository root and the static
# Python 3.8 tools are test requirements: those FAILs are expected; any other fails the demo.
DEMO_EXPECTED_FAILS := '^FAIL +(download URL|report PDF|Python 3\.8):'
check: $(BEST)
	$(PYTHON) selfcheck.py --decoder-weights $(DECODER) $(CHECK_ARGS) > $(DEMO_DIR)/selfcheck.txt 2>&1 || true
	@cat $(DEMO_DIR)/selfcheck.txt
	@if grep '^FAIL' $(DEMO_DIR)/selfcheck.txt | grep -v -E $(DEMO_EXPECTED_FAILS); then \
	  echo "error: selfcheck failed on the demo (above)" >&2; exit 1; fi
	@echo "demo: selfcheck done (download URL, report PDF and Python 3.8 FAILs are expected in the demo)"
endif

test:
	$(PYTHON) -m pytest -q

# The venv is a result file like the others: remade when the requirements change. The tests' own
# `python3` and `bash hw3_*.sh` find the venv's interpreter first on PATH.
$(GRADERS_VENV)/installed: requirements.txt requirements-dev.txt
	@if [ -z "$(GRADERS_PYTHON)" ]; then echo "error: no Python 3.8 found (python3.8 on PATH or" \
	  "~/.pyenv/versions/3.8*); install one (e.g. pyenv install 3.8) or set GRADERS_PYTHON=/path/to/python3.8" >&2; exit 1; fi
	@"$(GRADERS_PYTHON)" -c "import sys; sys.exit(sys.version_info[:2] != (3, 8))" || { \
	  echo "error: GRADERS_PYTHON=$(GRADERS_PYTHON) is not Python 3.8" >&2; exit 1; }
	"$(GRADERS_PYTHON)" -m venv --clear $(GRADERS_VENV)
	$(GRADERS_VENV)/bin/python -m pip install -q --disable-pip-version-check $(GRADERS_STACK) -r requirements-dev.txt
	$(GRADERS_VENV)/bin/python -c "import torch, timm; assert (torch.__version__.split('+')[0], timm.__version__) \
	  == ('1.12.1', '0.9.10'), (torch.__version__, timm.__version__)"
	touch $@

print-graders-python:
	@echo $(GRADERS_PYTHON)

test-graders: $(GRADERS_VENV)/installed
	PATH="$(abspath $(GRADERS_VENV))/bin:$$PATH" python3 -m pytest -q

# ---------------------------------------------------------------- the demo

ifeq ($(DEMO),1)
$(DATA)/demo.json:
	$(PYTHON) demo.py $(DEMO_DIR)

$(NOTES): | $(DATA)/demo.json
endif

# "up to date" when the report needed no rebuild (asked with make -q before building)
demo:
	@if $(MAKE) --no-print-directory -q DEMO=1 DEMO_DIR=$(DEMO_DIR) $(DEMO_DIR)/hw3_report.pdf 2>/dev/null; \
	  then fresh=1; else fresh=0; fi; \
	$(MAKE) --no-print-directory DEMO=1 DEMO_DIR=$(DEMO_DIR) report check || exit 1; \
	if [ $$fresh = 1 ]; then echo "demo: up to date ($(DEMO_DIR)/hw3_report.pdf)"; \
	else echo "demo: wrote $(DEMO_DIR)/hw3_report.pdf"; fi
