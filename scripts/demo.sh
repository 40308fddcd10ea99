#!/usr/bin/env bash
# The main job (after `make setup`): see scripts/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
# The SuperNI data is read in place: $BADIT_SUPERNI_DIR, default ../shared/superni beside the repository.
export BADIT_SUPERNI_DIR="${BADIT_SUPERNI_DIR:-$(cd .. && pwd)/shared/superni}"
exec .venv/bin/python scripts/demo.py "$@"
