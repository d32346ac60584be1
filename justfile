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

# Every arm and control on the organism over 3 seeds, two runs at a time (each with half the cores; `--parallel=1`: one),
# resumable (finished runs are skipped); then results and plots. scorda and lora2r have their own `none` run (both
# blocks train and deploy): results takes an arm's delta against the vanilla of the same adapter. The block adapters
# run at lr 1e-3, not the preset's 1e-1 (tuned for the SVD knob's singular-value offsets): Adam moves every LoRA entry
# by ~lr per step, and at 2e-2 five of the first eight block runs diverged by step 4 (docs/results/organism_blocks.md).
# scorda_rev has no `none` run: `none` resets nothing and scorda_rev is scorda with its slots permuted between the
# blocks, so it would train and deploy the very model `none --adapter=scorda` does (scripts/block_effects.py pairs
# each absorb run's deployed model with its own trained one instead).
organism-sweep SEEDS="41-43" *ARGS:
    uv run python -m vgrout.organism
    uv run python scripts/sweep.py organism none,erase,route,route2 {{SEEDS}} --local --parallel=2 {{ARGS}}
    uv run python scripts/sweep.py organism erase,route,route2 {{SEEDS}} --local --parallel=2 --random-v-seed=7 {{ARGS}}
    uv run python scripts/sweep.py organism none,absorb {{SEEDS}} --local --parallel=2 --adapter=scorda --lr=1e-3 {{ARGS}}
    uv run python scripts/sweep.py organism absorb {{SEEDS}} --local --parallel=2 --adapter=scorda_rev --lr=1e-3 {{ARGS}}
    uv run python scripts/sweep.py organism none,routeA {{SEEDS}} --local --parallel=2 --adapter=lora2r --lr=1e-3 {{ARGS}}
    uv run python scripts/sweep.py organism routeA {{SEEDS}} --local --parallel=2 --adapter=lora2r --random-v-seed=7 --lr=1e-3 {{ARGS}}
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

# Mutation testing (mutmut 3) of one module against its own tests, e.g. `just mutate grpo`, `just mutate env/oracle`
# (see README, Development). Work dir out/mutate/<module>/; extra ARGS go to `mutmut run` (e.g. a mutant-name glob).
mutate MODULE *ARGS:
    #!/usr/bin/env bash
    set -euo pipefail
    mod="{{MODULE}}"; mod="${mod%.py}"; mod="${mod#src/}"; mod="${mod#vgrout/}"
    src="src/vgrout/$mod.py"
    [ -f "$src" ] || { echo "no module $src" >&2; exit 2; }
    case "$mod" in  # the grader's tests (the oracle's included): its own file, the hack matrix, the adversaries
        env/oracle|env/rewards)
            tests=(tests/test_rewards.py tests/test_hack_matrix.py tests/test_adversarial_grading.py) ;;
        vact) tests=(tests/test_blocks.py) ;;  # v_act and the routeA gate are tested with the block adapters
        *) tests=("tests/test_$(basename "$mod").py") ;;
    esac
    for t in "${tests[@]}"; do [ -f "$t" ] || { echo "no test file $t for $src" >&2; exit 2; }; done
    sel=$(printf '"%s", ' "${tests[@]}")
    root="$(pwd)"; work="out/mutate/${mod//\//_}"
    rm -rf "$work"; mkdir -p "$work"  # fresh: mutmut never refreshes its copies of the other modules
    for d in src tests scripts; do ln -s "$root/$d" "$work/$d"; done  # scripts/: test_results runs one
    { cat pyproject.toml; printf '%s\n' '' '[tool.mutmut]' 'source_paths = ["src"]' 'also_copy = ["scripts"]' \
        "only_mutate = [\"$src\"]" \
        "pytest_add_cli_args_test_selection = [$sel\"-m\", \"not slow and not data\"]" \
        'pytest_add_cli_args = ["-p", "no:xdist", "-p", "no:cacheprovider"]' \
        'process_isolation = "forkserver"  # no mutant inherits caches the stats run filled' \
        'do_not_mutate_patterns = ["^\\s*raise "]  # the text of error messages (their conditions are mutated)'; \
        } > "$work/pyproject.toml"
    cd "$work"
    # one thread per forked worker: an OpenMP pool inherited across fork deadlocks (false "timeouts")
    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
    start=$SECONDS
    uv run --project "$root" mutmut run {{ARGS}}
    echo "mutmut run: $((SECONDS - start)) s for $src against ${tests[*]}"
    uv run --project "$root" mutmut results --all true > results.txt
    grep -v ': killed$' results.txt || true
    awk -F': ' '{n[$2]++} END {for (s in n) printf "%s %d, ", s, n[s]; print "total " NR}' results.txt
