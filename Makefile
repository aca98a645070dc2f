# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv, install ctlpool into it, and make sure RabbitMQ runs with the
# consistent-hash plugin (`ctlpool doctor --fix`: starts a local broker that is installed
# but stopped, enables the plugin, or prints the exact install command).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/%2F

.PHONY: demo test broker postgres cluster cluster-down bench-micro clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,bench,postgres]'
	touch $(STAMP)

broker: $(STAMP)
	CTLPOOL_AMQP_URL='$(AMQP_URL)' $(BIN)/ctlpool doctor --fix

# The example web's tests use the local PostgreSQL too; start it if it is installed but stopped.
postgres:
	@if command -v pg_ctlcluster >/dev/null && ! pg_isready -q -h 127.0.0.1; then \
	  echo "postgres: starting the local cluster"; \
	  pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start; \
	fi

# A local 3-node RabbitMQ cluster beside the default broker (AMQP ports 5681-5683, data in
# /var/tmp/ctlpool-cluster or CTLPOOL_CLUSTER_DIR); `up` prints the CTLPOOL_AMQP_URL to use.
# Fault helpers and wiping the data: .venv/bin/python -m pool.devcluster --help
cluster: $(STAMP)
	$(BIN)/python -m pool.devcluster up

cluster-down: $(STAMP)
	$(BIN)/python -m pool.devcluster down

demo: broker
	CTLPOOL_AMQP_URL='$(AMQP_URL)' $(BIN)/ctlpool demo

test: broker postgres
	CTLPOOL_TEST_AMQP_URL='$(AMQP_URL)' $(BIN)/pytest

bench-micro: $(STAMP)
	$(BIN)/pytest bench/micro --benchmark-only

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
