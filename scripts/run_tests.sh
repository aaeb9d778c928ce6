#!/usr/bin/env bash
# Install what the tests need into a fresh virtualenv (.venv) and run the whole suite.
# README.md gives this command; .ci/run runs it unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[all,test]"
python -m pytest -q "$@"
