# Homework 3, from the course data to hw3_report.pdf, as one graph of result files.
#
#   make data weights train report check    the course workflow (GPU; see the README for times)
#   make demo                               the same graph on synthetic data and tiny random models,
#                                           offline on a CPU, into demo/ (ends with demo/hw3_report.pdf)
#   make test                               the tests (the README's command)
#   make -n report                          print the commands without running them
#
# Apart from the targets named above, every target is a file, rebuilt only when what it depends on changed.
# Paths and the device are variables: `make report DATA=/data/hw3_data OUT=results DEVICE=cuda`.

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

# The course data (Google Drive, fetched with gdown) and GPT-2's vocabulary (the files hw3_download.sh fetches).
DATA_GDRIVE_ID := 11rP6KmR5Qwjhx0rfag0b5TZGBTRuPtQR
GPT2_URL := https://openaipublic.blob.core.windows.net/gpt-2/models/124M

# `make demo` reruns this Makefile with DEMO=1: same graph, demo/ paths, tiny models.
DEMO_DIR := demo
ifeq ($(DEMO),1)
DATA := $(DEMO_DIR)/hw3_data
OUT := $(DEMO_DIR)/outputs
CKPT := $(DEMO_DIR)/checkpoints
FEATURES := $(DEMO_DIR)/features
DEVICE := cpu
REPORT := $(DEMO_DIR)/hw3_report.pdf
NOTES := $(DEMO_DIR)/report_notes.md
# demo.py's tiny ViT (DEMO_ENCODER, DEMO_ENCODER_KWARGS); 80 steps of 16 captions a run, no SCST,
# decoding chosen between greedy and beam 3
TRAIN_ARGS := --encoder vit_tiny_patch16_224 \
    --encoder-kwargs '{"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}' \
    --epochs 3 --max-steps 80 --batch-size 16 --lr 3e-3 --warmup-steps 5 --val-every 40 --log-every 10 \
    --scst-epochs 0 --decode-beams 1 3 --decode-length-penalties 0 --max-len 16
EVAL_ARGS := --clip-model $(DEMO_DIR)/models/tiny_clip.pt
REPORT_ARGS := --synthetic
CHECK_ARGS := --samples 4
export HW3_CACHE := $(abspath $(DEMO_DIR)/cache)
export HW3_P1_CLIP := $(abspath $(DEMO_DIR)/models/tiny_clip.pt)
export HF_HUB_OFFLINE := 1
endif

RUNS := none adapter prefix lora
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
.PHONY: data weights vocab train report check demo test
# checkpoints, predictions and scores are results, never intermediates to delete
.SECONDARY:

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
weights: vocab
	$(PYTHON) hw3_cache.py clip
	$(PYTHON) hw3_cache.py encoder

# GPT-2's vocabulary, unless the tokenizer already finds it ($$HW3_BPE_DIR, the repository, the cache).
vocab:
	@$(PYTHON) hw3_cache.py has gpt2 || { \
	  wget -O "$$($(PYTHON) hw3_cache.py part encoder.json)" $(GPT2_URL)/encoder.json && \
	  wget -O "$$($(PYTHON) hw3_cache.py part vocab.bpe)" $(GPT2_URL)/vocab.bpe && \
	  $(PYTHON) hw3_cache.py install gpt2; }

# ---------------------------------------------------------------- Problem 2 training

train: $(RUNS:%=$(CKPT)/%.pt)

# An interrupted run continues from its .state (make deletes the half-made checkpoint on an interrupt).
$(CKPT)/%.pt: $(DATA_FILES)
	$(PYTHON) p2_train.py --data-root $(P2) --decoder-weights $(DECODER) --peft $* --out $@ \
	    --cache-features $(FEATURES) --device $(DEVICE) $(TRAIN_ARGS) $(if $(wildcard $@.state),--resume)

# The language-model-only baseline: the untrained captioner (new modules at their identity start) is GPT-2.
$(CKPT)/baseline.pt: $(DATA_FILES)
	$(PYTHON) p2_train.py --data-root $(P2) --decoder-weights $(DECODER) --peft none --out $@ \
	    --cache-features $(FEATURES) --device $(DEVICE) $(TRAIN_ARGS) \
	    --epochs 0 --scst-epochs 0 --decode-beams 1 --decode-length-penalties 0 $(if $(wildcard $@.state),--resume)

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

# ---------------------------------------------------------------- the demo

ifeq ($(DEMO),1)
$(DATA)/demo.json: | vocab
	$(PYTHON) demo.py $(DEMO_DIR)

$(NOTES): | $(DATA)/demo.json
endif

demo:
	$(MAKE) --no-print-directory DEMO=1 report check
	@echo "demo: wrote $(DEMO_DIR)/hw3_report.pdf"
