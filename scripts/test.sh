#!/usr/bin/env bash
# Runs the default test suite (slow tests excluded) in ./.venv, creating it if needed.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
source "$(dirname "$0")/_venv.sh" test
exec .venv/bin/python -m pytest -q -m "not slow" "$@"
