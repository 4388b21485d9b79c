# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# The virtual environment lives outside the clone, keyed by a hash of the dependency files and the torch choice,
# so every clone (CI included) reuses one install. Override with VENV=path, or pick another torch for a GPU:
#   make test TORCH_SPEC="torch==2.9.1 torchvision==0.24.1"
PYTHON      ?= python3
TORCH_SPEC  ?= $(shell grep -E '^[a-z]' requirements/torch.txt | tr '\n' ' ')
DEPS_HASH   := $(shell (cat requirements/base.txt requirements/dev.txt; echo "$(TORCH_SPEC)") | sha256sum | cut -c1-12)
VENV_ROOT   ?= $(HOME)/.cache/nnunet-mtl
VENV        ?= $(VENV_ROOT)/venv-$(DEPS_HASH)
BIN         := $(VENV)/bin
WORKDIR     ?= $(CURDIR)/work
STAMP       := .venv-installed

export nnUNet_def_n_proc ?= 2
export nnUNet_n_proc_DA ?= 2
# glibc hands freed blocks above a sliding threshold back to the OS, so training steps fault their activation
# buffers in again; these settings (blocks up to 32 MiB, glibc's maximum, stay in the heap) made a bfloat16 CPU
# training step of the demo network 8 % faster here (0.212 -> 0.195 s, two alternating runs of three).
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 68719476736
export MALLOC_TOP_PAD_ ?= 1073741824

.PHONY: venv demo test lint bench real-scale gpu-check-dry-run clean-demo help chromium mutation

help:
	@echo "make demo   - install (if needed) and run the whole pipeline on embedded phantom data"
	@echo "make test   - install (if needed) and run the test suite"
	@echo "make lint   - ruff"
	@echo "make mutation - mutation testing (mutmut) of the numeric and defensive modules; kill rate per module"
	@echo "make real-scale - the full-size rehearsal (bench/real_scale.py; hours on 2 CPU cores, resumable)"
	@echo "venv: $(VENV)"

# The venv itself: torch pair first, then everything else with torch pinned by a constraints file.
# The marker file is written last, so an interrupted install is detected and redone from scratch.
$(BIN)/.deps-ok:
	@echo ">> creating virtual environment $(VENV) (once per dependency set)"
	rm -rf "$(VENV)" && mkdir -p "$(VENV_ROOT)"
	$(PYTHON) -m venv "$(VENV)"
	"$(BIN)/python" -m pip install -q --upgrade pip
	"$(BIN)/python" -m pip install -q $(TORCH_SPEC)
	"$(BIN)/python" -m pip freeze | grep -iE '^(torch|torchvision)==' > "$(VENV)/torch-constraints.txt"
	"$(BIN)/python" -m pip install -q -c "$(VENV)/torch-constraints.txt" \
		-r requirements/base.txt -r requirements/dev.txt
	touch "$(BIN)/.deps-ok"

# Our package, editable, re-pointed at this clone whenever the venv or the clone changes.
$(STAMP): $(BIN)/.deps-ok pyproject.toml
	"$(BIN)/python" -m pip install -q --no-deps --no-build-isolation -e .
	echo "$(VENV)" > $(STAMP)

# The venv is shared by every clone, so its editable install points at whichever clone installed last:
# re-point it when it does not import this clone's package (a few seconds).
venv: $(STAMP)
	@grep -qx "$(VENV)" $(STAMP) && "$(BIN)/python" -c "import sys, nnunet_mtl; \
		sys.exit(not nnunet_mtl.__file__.startswith('$(CURDIR)/src/'))" 2>/dev/null \
		|| { rm -f $(STAMP); $(MAKE) --no-print-directory $(STAMP); }
	@ln -sfn "$(VENV)" .venv

# Headless Chromium (Debian's package) renders report.html in the tests, which fail without it: installed once per
# machine like the venv (the stamp), and again if the binary has gone.
SUDO             := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CHROMIUM_STAMP   := $(VENV_ROOT)/.chromium-installed

$(CHROMIUM_STAMP):
	@echo ">> installing chromium (Debian) for the report's browser test (once per machine)"
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
	mkdir -p "$(VENV_ROOT)" && touch "$@"

chromium:
	@command -v chromium >/dev/null 2>&1 && test -f "$(CHROMIUM_STAMP)" || \
		{ rm -f "$(CHROMIUM_STAMP)"; $(MAKE) --no-print-directory "$(CHROMIUM_STAMP)"; }

test: venv lint chromium
	"$(BIN)/python" -m pytest -q tests

# Mutation testing, not part of `make test` (about 25 minutes on 2 idle cores): mutmut 3 mutates the modules named
# in pyproject.toml ([tool.mutmut]) and runs the fast tests covering each mutated function; bench/mutation.py then
# prints the kill rate per module against the 85 % bar (exit 1 below it). Starts from scratch (mutants/) each time.
mutation: venv
	rm -rf mutants
	OMP_NUM_THREADS=1 "$(BIN)/mutmut" run --max-children 2
	"$(BIN)/python" bench/mutation.py --list-survivors

lint: venv
	"$(BIN)/ruff" check src tests bench

demo: venv
	"$(BIN)/nnunet-mtl" demo --workdir "$(WORKDIR)"

bench: venv
	"$(BIN)/python" bench/train_step.py --workdir "$(WORKDIR)"
	"$(BIN)/python" bench/predict_speed.py --workdir "$(WORKDIR)" --rounds 1

# The full-size rehearsal (not part of `make test`): phantom at real size -> import -> plan -> train steps ->
# case-level validation -> prediction modes. Resumable; REAL_SCALE_ARGS passes options (e.g. --stages predict).
REAL_SCALE_WORKDIR ?= $(CURDIR)/work/real-scale
real-scale: venv
	"$(BIN)/python" bench/real_scale.py --workdir "$(REAL_SCALE_WORKDIR)" $(REAL_SCALE_ARGS)

# The GPU check's steps on a tiny phantom on this CPU, to keep bench/gpu_check.py working between GPU loans.
gpu-check-dry-run: venv
	"$(BIN)/python" bench/gpu_check.py --device cpu --tiny --workdir "$(WORKDIR)/gpu-check-dry-run" \
		--out "$(WORKDIR)/gpu-check-dry-run/out"

clean-demo:
	rm -rf "$(WORKDIR)"
