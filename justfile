# vgrout task runner: `uv run just <recipe>` (just itself is a dev dependency).
set shell := ["bash", "-euo", "pipefail", "-c"]

default:
    @just --list

# The whole test suite (what CI runs).
test *ARGS:
    uv run pytest -n 2 {{ARGS}}

lint:
    uv run ruff check src tests scripts benchmarks
    uv run ruff format --check src tests scripts benchmarks
