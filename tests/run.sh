#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment, install the plugin with its test extras, lint, run the suite.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${NNUNET_SSL_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -e ".[test]"
export nnUNet_def_n_proc="${nnUNet_def_n_proc:-2}" nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-2}"
"$VENV/bin/python" -m ruff check .
exec "$VENV/bin/python" -m pytest tests "$@"
