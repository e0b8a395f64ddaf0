# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DATA   := data/demo/.complete
# PostgreSQL + PostGIS for the STAC API tests, as APT_PACKAGES in tests/stac_services.py
PG_APT := postgresql postgresql-postgis
# Chromium for the dashboard's browser test (tests/test_dashboard.py drives it with Playwright)
BROWSER_APT := chromium

.PHONY: demo test postgis browser serve test-slow fuzz bench example-landcover clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,bench]'
	touch $(STAMP)

$(DATA): examples/demo-data.txt examples/fetch_demo_data.py | $(STAMP)  # refetches when either changes
	$(PY) examples/fetch_demo_data.py data/demo

demo: $(STAMP) $(DATA)  ## fetch the real scene + model, run export → predict → deliver
	$(VENV)/bin/terrabeam run examples/sentinel2-cloudmask.yaml

postgis: | $(STAMP)  ## PostgreSQL + PostGIS for the STAC API tests: apt-get (as root) only when missing
	@$(PY) tests/stac_services.py check 2>/dev/null || { \
	  [ "$$(id -u)" = 0 ] || { $(PY) tests/stac_services.py check; exit 1; }; \
	  echo "installing PostgreSQL + PostGIS: apt-get install $(PG_APT)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $(PG_APT) >/dev/null && \
	  $(PY) tests/stac_services.py check; }

browser:  ## Chromium for the dashboard's browser test: apt-get (as root) only when missing
	@command -v chromium >/dev/null || { \
	  [ "$$(id -u)" = 0 ] || { echo "chromium missing: as root, apt-get install $(BROWSER_APT)" >&2; exit 1; }; \
	  echo "installing Chromium: apt-get install $(BROWSER_APT)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $(BROWSER_APT) >/dev/null && \
	  command -v chromium >/dev/null; }

serve: $(STAMP)  ## the dashboard of ./workspace at http://127.0.0.1:8765/ (after `make demo`)
	$(VENV)/bin/terrabeam serve --workspace workspace

test: $(STAMP) $(DATA) postgis browser  ## lint and run the test suite
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(PY) -m pytest

test-slow: $(STAMP)  ## the TFRecord decoder and framing property tests at 20 000 examples each (~10 min), and the GDAL cache-race control
	$(PY) -m pytest -m slow tests/test_tfrecord_properties.py tests/test_gdal_threads.py

fuzz: $(STAMP)  ## fuzz TFRecord framing + decoder against protobuf and Beam's codec (TERRABEAM_FUZZ_SECONDS=300)
	$(PY) -m pytest -m fuzz -s tests/test_tfrecord_properties.py

bench: $(STAMP) $(DATA)  ## side-by-side benchmarks, results into BENCHMARKS.md
	$(PY) -m benchmarks --write BENCHMARKS.md
	$(PY) -m benchmarks --only engines --write BENCHMARKS.md

example-landcover: $(STAMP) $(DATA)  ## the per-pixel Keras land-cover illustration
	$(PY) examples/build_landcover_dnn.py data/examples/landcover-dnn.keras
	$(VENV)/bin/terrabeam run examples/sentinel2-landcover-dnn.yaml

clean:
	rm -rf $(VENV) data workspace
