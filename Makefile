# Two commands on a fresh machine: `make demo` and `make test`.
# Everything is installed into .venv from the package registry; nothing is assumed
# beyond Python 3.11+ and make.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv tools browser-deps test lint typecheck unit demo demo-stop bench bench-deps install bundle clean

$(STAMP): pyproject.toml setup.py constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,fast,stub]'
	@touch $(STAMP)

venv: $(STAMP)

# Analysis tools run by the tests as programs (checkov, cfn-lint, kubernetes-validate, moto_server),
# in a venv of their own so that their pins never change the project's: see tools/requirements.in.
TOOLS       := .tools
TOOLS_STAMP := $(TOOLS)/.installed

$(TOOLS_STAMP): tools/requirements.in tools/constraints.txt
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check -c tools/constraints.txt -r tools/requirements.in
	@touch $(TOOLS_STAMP)

tools: $(TOOLS_STAMP)

# axe-core (the accessibility checker the console's browser tests run inside Chromium), from
# the npm registry, pinned by tests/browser/package-lock.json, into a git-ignored node_modules.
# Chromium and chromedriver are Debian packages (.ci/run installs them). Without npm the
# browser tests are skipped, except under CI=true, where they fail.
AXE := tests/browser/node_modules/axe-core/axe.min.js

$(AXE): tests/browser/package.json tests/browser/package-lock.json
	@if command -v npm >/dev/null; then \
	  cd tests/browser && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error && touch node_modules/axe-core/axe.min.js; \
	elif [ "$$CI" = true ]; then echo "browser-deps: npm is required (apt-get install npm)" >&2; exit 1; \
	else echo "browser-deps: no npm here; the console's browser tests will be skipped" >&2; fi

browser-deps: $(AXE)

lint: venv tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PYTHONPATH=. $(TOOLS)/bin/lint-imports

typecheck: venv
	$(BIN)/mypy

unit: venv tools browser-deps
	$(BIN)/pytest

test: lint typecheck unit

# KEEP=1 leaves the pair running with the web console (address and token printed);
# `make demo-stop` stops it.
demo: venv
	$(BIN)/python -m byoc_demo $(if $(filter 1 yes true,$(KEEP)),--keep)

demo-stop: venv
	$(BIN)/python -m byoc_demo --stop

# The benchmark suite (docs/BENCHMARKS.md): about 5 minutes; `make bench BENCH_ARGS=--quick`
# for a one-minute smoke run. ssh -R is one of the peers, so it needs sshd and ssh.
bench-deps:
	@if ! [ -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client; \
	  else echo "bench: install openssh-server and openssh-client (ssh -R is a peer)" >&2; exit 1; fi; \
	fi

bench: venv bench-deps
	$(BIN)/python -m bench $(if $(findstring --quick,$(BENCH_ARGS)),,--docs) $(BENCH_ARGS)

# Install on a host (EC2 with systemd), as root: users, unit, directories, venv (pinned to
# constraints.txt), configuration. DRIVER=systemd adds the systemd driver's polkit rule, drop-in
# and example unit; WITH_VENV=0 skips the venv; DESTDIR= stages into a directory instead.
install:
	sh scripts/install-host.sh

# A signed release bundle of the agent, for update_agent (README "Updating the agent"):
# `make bundle RELEASE_KEY=release.key [VERSION=0.1.1] [WHEELS=dir]` writes
# dist/byoc-agent-<VERSION>.bundle. VERSION defaults to agent/__init__.py's; RELEASE_KEY is made
# by `byoc-certs release-key DIR`; WHEELS builds offline from a directory of wheels.
VERSION ?= $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' agent/__init__.py)

bundle: venv
	@if [ -z "$(RELEASE_KEY)" ]; then echo "make bundle: set RELEASE_KEY=<release.key> (byoc-certs release-key DIR makes one)" >&2; exit 2; fi
	$(BIN)/python -m agent.update.build --version $(VERSION) --key $(RELEASE_KEY) --out dist $(if $(WHEELS),--wheels $(WHEELS))

clean:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m byoc_demo --stop >/dev/null || true; fi
	rm -rf $(VENV) $(TOOLS) dist .demo .mypy_cache .ruff_cache .pytest_cache tests/browser/node_modules
