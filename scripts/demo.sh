#!/usr/bin/env bash
# The main job (after `make setup`): see scripts/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/demo.py "$@"
