# vgrout task runner: `uv run just <recipe>` (just itself is a dev dependency).
set shell := ["bash", "-euo", "pipefail", "-c"]

default:
    @just --list

# The whole test suite (what CI runs).
test *ARGS:
    uv run pytest -n 2 {{ARGS}}

lint:
    uv run ruff check src tests scripts benchmarks

# Offline gate: tiny Qwen3 on CPU, built-in problems, synthetic pool, 30 steps (route2 unless overridden).
smoke *ARGS: smoke-pool
    uv run python -m vgrout.train smoke {{ARGS}}

# The CPU model organism (SmolLM2-135M-Instruct, warm-started; docs/organism.md): one run, vanilla unless --intervention.
organism *ARGS:
    uv run python -m vgrout.organism
    uv run python -m vgrout.train organism {{ARGS}}

# Every arm and control on the organism over 3 seeds, resumable (finished runs are skipped); then results and plots.
organism-sweep SEEDS="41-43" *ARGS:
    uv run python -m vgrout.organism
    uv run python scripts/sweep.py organism none,erase,route,route2 {{SEEDS}} --local {{ARGS}}
    uv run python scripts/sweep.py organism erase,route,route2 {{SEEDS}} --local --random-v-seed=7 {{ARGS}}
    uv run python scripts/sweep.py organism absorb {{SEEDS}} --local --adapter=scorda {{ARGS}}
    uv run python scripts/sweep.py organism absorb {{SEEDS}} --local --adapter=scorda_rev {{ARGS}}
    uv run python scripts/sweep.py organism routeA {{SEEDS}} --local --adapter=lora2r {{ARGS}}
    uv run python scripts/sweep.py organism routeA {{SEEDS}} --local --adapter=lora2r --random-v-seed=7 {{ARGS}}
    uv run python scripts/results.py --preset organism --per-run
    uv run python scripts/plot_dynamics.py --preset organism

# All four arms of the smoke run, one after another.
smoke-all *ARGS: smoke-pool
    for arm in none erase route route2; do uv run python -m vgrout.train smoke --intervention=$arm {{ARGS}}; done

# Build the smoke run's synthetic teacher pool (only when missing).
smoke-pool:
    [ -f out/pools/smoke/partition.json ] || uv run python -m vgrout.smoke_pool --out out/pools/smoke

# An experiment on one GPU, e.g. `just train fast --intervention=route2 --seed=42`.
train PRESET *ARGS:
    uv run python -m vgrout.train {{PRESET}} {{ARGS}}

# Benchmark rows from raw LeetCodeDataset (`just build-data IN OUT`).
build-data IN OUT *ARGS:
    uv run python -m vgrout.env.build --in {{IN}} --out {{OUT}} {{ARGS}}

# The training split: medium/hard v0.2.0-train rows whose canonical passes -> out/data/.
data DATA_DIR="../shared/data":
    uv run python -m vgrout.env.build --in {{DATA_DIR}}/leetcode/LeetCodeDataset-v0.2.0-train.jsonl.gz --out out/data/leetcode_train_medhard.jsonl

# Queue one training run per (arm, seed): pueue if installed (group `vgrout`), else print the commands; `--slurm FILE.sbatch` writes a SLURM array instead.
sweep PRESET ARMS SEEDS *ARGS:
    uv run python scripts/sweep.py {{PRESET}} {{ARMS}} {{SEEDS}} {{ARGS}}

# Deployed hack/solve per experiment (preset, arm, control, config hash) with seed and problem-cluster 95% CIs; CSV to out/results/.
results *ARGS:
    uv run python scripts/results.py {{ARGS}}

# Training-dynamics, per-mode and route2-gate PNGs to out/plots/.
plots *ARGS:
    uv run python scripts/plot_dynamics.py {{ARGS}}

# Sandbox throughput on real completions vs one fresh interpreter per execution (needs ../shared/data).
bench-sandbox *ARGS:
    uv run python benchmarks/bench_sandbox.py {{ARGS}}

# Regenerate docs/config.md from the Config dataclasses (a test fails when it is stale).
docs:
    uv run python scripts/gen_config_docs.py

# Teacher pool: G graded rollouts per problem (e.g. `just pregen-teacher 300 Qwen/Qwen3-4B --data-path out/data/leetcode_train_medhard.jsonl`).
pregen-teacher N MODEL="Qwen/Qwen3-4B" *ARGS:
    uv run python -m vgrout.pregen --n-problems {{N}} --model {{MODEL}} {{ARGS}}

# Multi-loophole substrate: build (--templates | --from-pool DIR | --generate --model M) or check (--validate DIR).
substrate *ARGS:
    uv run python -m vgrout.substrate {{ARGS}}

# Adapter cost vs the plain model (generation, train step, route2 memory, SVD cache) on a mid-size random Qwen3.
bench-adapter *ARGS:
    uv run python benchmarks/bench_adapter.py {{ARGS}}

# Every benchmark (sandbox, adapter) plus the timed smoke run of all four arms.
bench: bench-sandbox bench-adapter
    for arm in none erase route route2; do uv run python -m vgrout.train smoke --intervention=$arm | tail -1; done

# Step cost vs a baseline in the same run: loss memory/time (chunked log-probs) and a fast-shaped CPU step.
bench-step *ARGS:
    uv run python benchmarks/bench_step.py {{ARGS}}

# The GPU figures in one prepared run (a lent GPU machine): bench-adapter at Qwen3-4B shapes in bf16, two fast steps of a random Qwen3-4B.
bench-gpu OUT="out/gpu_check":
    uv run python benchmarks/gpu_check.py --out {{OUT}}
