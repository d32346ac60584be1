"""Logging set-up, the streamed per-step table, and the end-of-run BLUF tables.

stdout gets one-letter level icons and the per-step table; the run folder's
`train.log` gets everything at DEBUG with timestamps. The step table prints a
legend once and repeats its header every `HEADER_EVERY` rows.

The step table fits the terminal (`console_width`): when the full table (up to ~250
characters for routing2 with seven modes) is wider, the per-mode block `hk_<mode>` first
collapses into one `hk/mode` column (one digit per mode), then the least-read columns go
(`DROP_ORDER`, the compact per-mode column among them); the legend names what was hidden. The full row is
always in the run folder's rows.jsonl. Output that is not a terminal (a file, a pipe, a
SLURM log) gets the full table unless `$COLUMNS` is set.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from loguru import logger
from tabulate import tabulate
from tqdm import tqdm

HEADER_EVERY = 50


def setup_logging(log_path: Path, *, use_tqdm: bool) -> None:
    """Route loguru to stdout (INFO, terse) and to `log_path` (DEBUG, timestamped)."""
    logger.remove()
    sink = (lambda m: tqdm.write(m, end="")) if use_tqdm else sys.stdout
    logger.add(sink, format="<level>{level.icon}</level> {message}", level="INFO", colorize=use_tqdm)
    for name, icon in (("DEBUG", "D"), ("INFO", "I"), ("WARNING", "W"), ("ERROR", "E")):
        logger.level(name, icon=icon)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.add(log_path, format="{time:HH:mm:ss} | {level: <7} | {message}", level="DEBUG", enqueue=False)


# (column, width, legend). Columns absent from a run (e.g. gate stats on vanilla) are hidden.
# A column reads the row key of the same name, except the short labels in LABEL_KEYS.
COLUMNS: list[tuple[str, int, str]] = [
    ("step", 4, "optimizer step"),
    ("rew", 6, "mean reward over all graded rollouts (student + teacher)"),
    ("rew_s", 6, "mean student reward"),
    ("gt_s", 6, "student rollouts the strict oracle calls correct (n/N)"),
    ("hack_s", 6, "student rollouts exploited: channel paid, oracle says wrong (n/N)"),
    ("hack_t", 6, "teacher rows cached as hacked (n/N)"),
    ("lp_s", 6, "mean per-token log-prob of student rollouts"),
    ("lp_t", 6, "mean per-token log-prob of teacher rows (coherence gauge; tripwire)"),
    ("loss", 7, "summed GRPO loss of the step"),
    ("gn", 6, "pre-clip global grad norm over δS and δS_hack"),
    ("q_egy", 5, "quarantine share of the update ‖g_hack‖/(‖g_keep‖+‖g_hack‖)"),
    ("cos_pre", 6, "hack-ward fraction ‖relu(V g)‖/‖g‖ of the live grad before the intervention"),
    ("cos_post", 6, "the same after the intervention"),
    ("fired", 5, "mean per-module fraction of axes the projection acted on"),
    ("cos_upd", 6, "hack-ward fraction ‖relu(V Δ)‖/‖Δ‖ of δS's actual change this step (after AdamW)"),
    ("quar_resid", 6, "relative part of δS_hack outside the current span(V)"),
    ("leak", 5, "route2: share of exploited student rollouts' gradient energy kept in δS"),
    ("q_mass", 6, "quarantine's share of the update's energy (what the optimizer moved there)"),
    ("m_keep", 6, "routeA: share of rollouts kept (deployed block only)"),
    ("m_route", 6, "routeA: share of rollouts routed (quarantine only); the rest absorb (both)"),
    ("tau", 6, "route2: mean calibrated cosine threshold τ"),
    ("hkgap", 6, "route2: EMA hack-anchor cos minus clean-anchor cos"),
    ("flag", 5, "route2: fraction of rollouts routed"),
    ("prec", 5, "gate precision vs oracle `exploited` (student rollouts)"),
    ("refr", 6, "refresh this step: basis overlap with the previous directions (- = none)"),
    ("hk_dep", 6, "deploy eval hack rate (quarantine ablated; row key hack_deploy)"),
    ("sv_dep", 6, "deploy eval solve rate (row key solve_deploy)"),
    ("zv", 3, "groups skipped for zero reward variance"),
    ("sec", 5, "wall seconds for the step"),
]


LABEL_KEYS = {"hk_dep": "hack_deploy", "sv_dep": "solve_deploy"}
BASE_COLUMNS = ("step", "rew", "rew_s", "gt_s", "hack_s", "hack_t", "lp_s", "lp_t", "loss", "gn")
TAIL_COLUMNS = ("hk_dep", "sv_dep", "zv", "sec")


def step_columns(arm_columns: Sequence[str], has_directions: bool) -> list[str]:
    """The console table's columns for an arm: the base ones, the arm's, gate stats, the tail."""
    return [*BASE_COLUMNS, *arm_columns, *(("prec", "refr") if has_directions else ()), *TAIL_COLUMNS]


def _fmt(v: object, width: int) -> str:
    """`v` right-aligned in exactly `width` characters: the most precise rendering that fits
    (a cell never pushes the columns after it; '#' fills a cell nothing fits in)."""
    if v is None:
        cands = ["-"]
    elif isinstance(v, tuple | list) and len(v) == 2:
        n, total = v
        cands = [f"{n}/{total}"] + ([f"{100 * n / total:.0f}%"] if total else [])
    elif isinstance(v, bool):
        cands = ["T" if v else "F"]
    elif isinstance(v, float):
        if not math.isfinite(v):
            cands = [str(v)]
        elif abs(v) >= 1000:
            cands = [f"{v:.1e}", f"{v:.0f}", f"{v:.0e}"]
        elif v != 0 and abs(v) < 1e-3:
            cands = [f"{v:.1e}", f"{v:.0e}", f"{v:.3f}"]
        else:
            cands = [f"{v:+.3f}" if abs(v) < 10 else f"{v:.1f}", f"{v:.3f}", f"{v:.2f}", f"{v:.1f}", f"{v:.0f}"]
    else:
        cands = [str(v)]
    s = next((c for c in cands if len(c) <= width), "#" * width)
    return s.rjust(width)


# Columns dropped first when even the compact table is too wide (step is never dropped).
DROP_ORDER: tuple[str, ...] = (
    "sec", "zv", "refr", "lp_s", "loss", "hk/mode", "fired", "prec", "hkgap", "tau", "q_egy", "cos_post", "gn",
    "lp_t", "rew", "hack_t", "flag", "cos_pre", "sv_dep", "rew_s", "gt_s", "hk_dep", "hack_s",
)
PREFIX = 2  # the console's level icon and a space ("I ") before every table line


def console_width() -> int | None:
    """Characters a table line may use: `$COLUMNS`, else the terminal's width when stdout is a
    terminal (`shutil.get_terminal_size`), else None (a file or pipe takes any width)."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        if not os.isatty(sys.stdout.fileno()):
            return None
    except (AttributeError, OSError, ValueError):  # stdout replaced (pytest capture) or closed
        return None
    return shutil.get_terminal_size().columns


def _modes_cell(row: dict, codes: Sequence[str]) -> str:
    """Per-mode hack counts as one digit per mode ('+' for 10 or more)."""
    out = []
    for m in codes:
        v = row.get(f"hk_{m}")
        out.append("-" if not isinstance(v, int) else (str(v) if v < 10 else "+"))
    return "".join(out)


class StepTable:
    """Streams the per-step table: legend once, header every HEADER_EVERY rows, as wide as the
    console allows (`width`: characters per console line; None = no limit; "auto" =
    `console_width()`)."""

    def __init__(self, columns: Sequence[str], mode_codes: Sequence[str] = (),
                 width: int | None | Literal["auto"] = "auto"):
        known = {c: (w, d) for c, w, d in COLUMNS}
        base = [(c, *known[c]) for c in columns if c in known]
        per_mode = [(f"hk_{m}", 5, f"student hacks this step in mode {m}") for m in mode_codes]
        self.width = console_width() if width == "auto" else width
        self.mode_codes = tuple(mode_codes)
        self.compact = "hk/mode" if mode_codes else ""
        self.hidden: list[str] = []
        self.per_mode = {c for c, _, _ in per_mode}
        self.cols = base + per_mode
        if not self._fits(self.cols) and per_mode:
            legend = f"student hacks this step per mode, one digit each in the order {' '.join(mode_codes)}"
            self.cols = base + [(self.compact, len(mode_codes), legend + " ('+' = 10 or more)")]
            self.hidden = [c for c, _, _ in per_mode]
        # DROP_ORDER first, then any column not named there from the right; step always stays
        for name in [*DROP_ORDER, *reversed([c for c, _, _ in self.cols[1:] if c not in DROP_ORDER])]:
            if self._fits(self.cols):
                break
            if any(c == name for c, _, _ in self.cols):
                self.cols = [col for col in self.cols if col[0] != name]
                self.hidden.append(name)
        self.rows_printed = 0

    def _fits(self, cols) -> bool:
        return self.width is None or PREFIX + len(self._header(cols)) <= self.width

    @staticmethod
    def _header(cols) -> str:
        return " ".join(c.rjust(max(w, len(c))) for c, w, _ in cols)

    def legend(self) -> str:
        lines = [f"  {c:<8} {d}" for c, _, d in self.cols]
        if self.hidden:
            hidden = [h for h in self.hidden if h in self.per_mode]
            rest = [h for h in self.hidden if h not in self.per_mode]
            what = ", ".join(rest + ([f"{len(hidden)} per-mode columns hk_*"] if hidden else []))
            lines.append(f"  (hidden to fit {self.width} columns: {what}; every value is in rows.jsonl)")
        return "\n".join(lines)

    def header(self) -> str:
        return self._header(self.cols)

    def line(self, row: dict) -> str:
        cells = []
        for c, w, _ in self.cols:
            width = max(w, len(c))
            if c == self.compact:
                cells.append(_modes_cell(row, self.mode_codes).rjust(width))
            else:
                cells.append(_fmt(row.get(LABEL_KEYS.get(c, c)), width))
        return " ".join(cells)

    def emit(self, row: dict) -> None:
        if self.rows_printed % HEADER_EVERY == 0:
            logger.info(self.header())
        logger.info(self.line(row))
        self.rows_printed += 1


def markdown_table(rows: Sequence[dict], *, floatfmt: str = ".3f") -> str:
    """GitHub-markdown table; (n, N) tuples render as n/N."""
    pair = lambda v: isinstance(v, tuple | list) and len(v) == 2  # noqa: E731
    clean = [{k: (f"{v[0]}/{v[1]}" if pair(v) else v) for k, v in r.items()} for r in rows]
    return tabulate(clean, headers="keys", tablefmt="github", floatfmt=floatfmt)


def print_bluf(cfg, state, record: dict, run_dir: Path, command: str) -> None:
    """Markdown tables on stdout: summary, per-mode learning, per-mechanism rates, per-step rows.

    `state` is the loop's TrainState (rows and per-mode tallies)."""
    rows = state.rows
    tot = lambda key, i: sum(r[key][i] for r in rows)  # noqa: E731
    n_s, n_t = tot("hack_s", 1), tot("hack_t", 1)
    rate = lambda key: tot(key, 0) / max(1, tot(key, 1))  # noqa: E731
    print(f"\ncommand: {command}\nrun folder: {run_dir}\n")
    print(markdown_table([{
        "arm": cfg.arm, "preset": cfg.preset_name, "model": cfg.model.split("/")[-1], "seed": cfg.seed,
        "steps": len(rows), "gens": sum(r["N"] for r in rows), "HACK_S": rate("hack_s"), "HACK_T": rate("hack_t"),
        "SOLVE_S": rate("gt_s"), "hack_train": record["hack_train"], "hack_deploy": record["hack_deploy"],
        "solve_train": record["solve_train"], "solve_deploy": record["solve_deploy"],
        "eval": f"{record['eval_set']} n={record['eval_n']}", "‖δS_hack‖": record["delta_s_hack_norm"],
    }], floatfmt=".3f"))
    if len(state.mode_rollouts) > 1:
        learned = sum(1 for m in state.mode_rollouts if state.mode_hacks.get(m, 0) > 0)
        print(f"\nper-mode learning (student rollouts; {learned}/{len(state.mode_rollouts)} modes exploited):\n")
        print(markdown_table([{
            "mode": m, "exploit_rate": state.mode_hacks.get(m, 0) / max(1, n), "hacks": state.mode_hacks.get(m, 0),
            "rollouts": n, "first_step": state.mode_first_step.get(m, "-"),
            "deploy_hack": record["by_mode"].get(m, {}).get("deploy_hack", math.nan),
        } for m, n in sorted(state.mode_rollouts.items())]))
    half_a = ",".join(sorted(cfg.half_a_codes)) or "-"
    print(f"\nper-mechanism (student, n={n_s}): exploited={rate('hack_s'):.3f} detectors "
          f"E={rate('hack_s_E'):.3f} S={rate('hack_s_S'):.3f} "
          f"D={rate('hack_s_D'):.3f} | half_A={half_a} A={rate('hack_s_A'):.3f} B={rate('hack_s_B'):.3f} "
          f"(teacher rows n={n_t})\n")
    drop = {"gen", "fb", "t_rew", "sec", "N", "split", "ref_eq"}
    print("### per-step rows\n")
    print(markdown_table([{k: v for k, v in r.items() if k not in drop} for r in rows]))
    print()
