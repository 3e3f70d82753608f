#!/usr/bin/env bash
# Runs the default test suite (slow tests excluded) in ./.venv, creating it if needed.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
source "$(dirname "$0")/_venv.sh" test
# Test files are shared between CCSTAE_TEST_WORKERS processes (pytest-xdist; default 2, each about 5 GB of memory).
exec .venv/bin/python -m pytest -q -m "not slow" -n "${CCSTAE_TEST_WORKERS:-2}" --dist loadfile "$@"
