#!/usr/bin/env bash
# The main job end to end on the built-in simulated dataset (no downloads):
# simulate a small scan, train CC-ST-AE, map strain, evaluate against the labels, write figures.
# Output goes to ./demo_out (or the directory given as the first argument).
source "$(dirname "$0")/_venv.sh" test
exec .venv/bin/ccstae demo --out "${1:-demo_out}"
