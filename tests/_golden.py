"""Golden per-step rows: each arm's rows for a few CPU steps on the tiny model, fixed seed.

`tests/data/golden_rows.json` was first written by the training loop before the arm-objects
refactor, which reproduced it exactly; it was rewritten once on purpose when the rows changed
(evals under common random numbers, v_hack signed by vote, the post-update diagnostics, erase /
route on the update by default). `test_golden_rows.py` reruns the configurations and compares
(timing columns excluded, floats to FLOAT_RTOL / FLOAT_ATOL). Regenerate only when a change is *meant* to change
the rows, and say so in the commit:

    uv run python tests/_golden.py            # rewrites tests/data/golden_rows.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN_FILE = HERE / "data" / "golden_rows.json"
TIMING = {"gen", "fb", "t_rew", "rew_wait", "sec"}
# keys the refactor removed from rows (they duplicated hack_deploy / solve_deploy)
RETIRED = {"hk_dep", "sv_dep"}
# keys added since the golden file was written (new information, not changed values)
ADDED: set[str] = {"gen_tok", "gpu_mem"}

COMMON = ["--steps=4", "--max-new=8", "--eval-n-prompts=2", "--eval-ablate-every=2",
          "--vhack-refresh-every=2", "--v-hack-extract-top-k=2", "--v-hack-k=1", "--v-hack-n-heldout=1",
          "--ckpt-every=2", "--half-a=E"]
CONFIGS: dict[str, list[str]] = {
    "none": ["--intervention=none"],
    "erase": ["--intervention=erase"],
    "erase_grad": ["--intervention=erase", "--intervene-on=grad"],
    "route": ["--intervention=route"],
    "route_grad": ["--intervention=route", "--intervene-on=grad"],
    "route2": ["--intervention=route2"],
    "route_nogate_ablate": ["--intervention=route", "--gate-mode=no_gate", "--rollout-ablate-frac=0.5"],
    "route2_haar_teacher_only": ["--intervention=route2", "--random-v-seed=3", "--rollout-ablate-frac=0.5",
                                 "--gate-anchor-teacher-only"],
}


def build_inputs(root: Path) -> tuple[Path, Path]:
    """The smoke pool (template hacks graded for real) and a 4-pair built-in pairset."""
    from vgrout.pairs import builtin_pairs, save_pairs_json
    from vgrout.smoke_pool import build_smoke_pool

    pool = build_smoke_pool(root / "pool")
    bp = builtin_pairs()
    pairs = save_pairs_json(root / "pairs.json", [bp[0], bp[5], bp[10], bp[15]])
    return pool, pairs


def run_config(name: str, pool: Path, pairs: Path, out: Path) -> dict:
    """Run one golden configuration; return its rows and per_mode_deploy record (comparable parts)."""
    from vgrout.config import parse_cli
    from vgrout.train import main

    args = ["smoke", f"--teacher-pool-dir={pool}", f"--vhack-pairs-path={pairs}", f"--out-root={out}",
            *COMMON, *CONFIGS[name]]
    assert main(parse_cli(args)) == 0
    (run,) = sorted((out / "runs").iterdir())
    rows = [json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines() if line.strip()]
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    record = json.loads((run / "per_mode_deploy.json").read_text())
    return {"rows": rows, "per_mode_deploy": record}


# The fp32 gradient diagnostics (cos_pre*, cos_upd, q_mass, q_egy, resid) are reductions over whole
# gradients whose rounding depends on the CPU's BLAS kernels: on another machine they moved by up to
# 6e-5 relative (5e-6 absolute) while every discrete column stayed equal. A changed sign, mask or
# direction moves them by orders of magnitude more.
FLOAT_RTOL = 5e-4
FLOAT_ATOL = 1e-5


def compare(want, got, path: str = "") -> list[str]:
    """Differences between two JSON values (floats to FLOAT_RTOL relative or FLOAT_ATOL absolute)."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = []
        for k in sorted(set(want) | set(got)):
            if k not in got:
                out.append(f"{path}.{k}: missing (want {want[k]!r})")
            elif k not in want:
                if k not in ADDED:
                    out.append(f"{path}.{k}: unexpected (got {got[k]!r})")
            else:
                out += compare(want[k], got[k], f"{path}.{k}")
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{path}: length {len(got)} != {len(want)}"]
        return [d for i, (a, b) in enumerate(zip(want, got, strict=True)) for d in compare(a, b, f"{path}[{i}]")]
    if isinstance(want, float) and isinstance(got, int | float) and not isinstance(got, bool):
        if math.isclose(want, got, rel_tol=FLOAT_RTOL, abs_tol=FLOAT_ATOL):
            return []
        return [f"{path}: {got!r} != {want!r}"]
    return [] if want == got else [f"{path}: {got!r} != {want!r}"]


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        pool, pairs = build_inputs(root)
        golden = {}
        for name in CONFIGS:
            golden[name] = run_config(name, pool, pairs, root / name)
    GOLDEN_FILE.parent.mkdir(exist_ok=True)
    GOLDEN_FILE.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN_FILE} ({', '.join(golden)})", file=sys.stderr)


if __name__ == "__main__":
    main()
