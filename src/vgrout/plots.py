"""Dynamics plots of finished runs: per-step train/deploy hack and solve, per-mode deploy bars,
and the route2 gate diagnostics. PNGs via matplotlib's Agg backend (no display needed).

One figure set per preset, written to `out/plots/`:
- `dynamics_<preset>.png`: student hack rate and solve rate per step (knob on), and the
  deploy-eval points (quarantine ablated); each seed a thin line, the mean over seeds thick;
- `per_mode_<preset>.png`: deploy hack and solve per loophole mode, one bar per experiment
  (mean with a 95% t-interval over seeds, each seed a dot);
- `gate_<preset>.png`: route2's threshold τ, flagged fraction and gate precision per step.

Lines and bars are grouped exactly as `results` groups runs: by (arm, control, config hash),
so runs of different configs are never drawn as seeds of one line. Every arm has one fixed
colour (ARM_COLOURS) in every figure; an arm's second, third, ... config is drawn in a lighter
shade of it with a marker, and the legend names the knobs that differ (as the results table's
`config` column does). Random-direction controls are dashed (hatched bars) in their arm's
colour. Legends sit outside the axes so they never cover data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # file output only; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .atomic import atomic_path
from .results import (  # noqa: E402
    ARM_ORDER,
    CONFIG_FILE,
    ROWS_FILE,
    STATUS_FILE,
    RunFolderError,
    RunRecord,
    config_hash,
    config_labels,
    mean_ci,
    mode_rank,
    read_config_knobs,
    scan_runs,
    science_config,
)

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
ARM_COLOURS: dict[str, str] = {
    "vanilla": "#000000",
    "projected": "#0072B2",
    "routing": "#E69F00",
    "routing2": "#009E73",
    "absorb": "#D55E00",  # the block-adapter arms (--adapter lora2r / pissa / corda / scorda / scorda_rev)
    "routeA": "#56B4E9",
}
OTHER_COLOUR = "#CC79A7"


def arm_colour(arm: str) -> str:
    return ARM_COLOURS.get(arm, OTHER_COLOUR)


# An arm's k-th config (k = 0, 1, ...): mixed toward white by this fraction, and this marker.
CONFIG_SHADES: tuple[float, ...] = (0.0, 0.5, 0.3, 0.65)
CONFIG_MARKERS: tuple[str | None, ...] = (None, "s", "^", "D", "v", "P")

GroupKey = tuple[str, str, str]  # (arm, control, config hash): one experiment, as in results.py


def lighten(hex_colour: str, frac: float) -> str:
    """The colour mixed toward white: frac = 0 keeps it, 1 gives white."""
    rgb = [int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * frac):02x}" for c in rgb)


@dataclass(frozen=True)
class GroupStyle:
    """How one experiment is drawn: colour, line style, marker, hatch and its legend stem."""

    colour: str
    ls: str
    marker: str | None
    hatch: str | None
    label: str


def group_styles(configs: Mapping[GroupKey, Mapping[str, object]]) -> dict[GroupKey, GroupStyle]:
    """A style per experiment, in table order (arm, control, differing knobs, hash). The first
    config of an (arm, control) gets the arm's colour; later ones lighter shades and markers.
    Labels name the knobs that differ (results.config_labels) and, when any do, the short hash."""
    labels = config_labels({k[2]: c for k, c in configs.items()})
    keys = sorted(configs, key=lambda k: (*_group_order(k[:2]), labels[k[2]], k[2]))
    shown_hash = any(labels.values())
    seen: dict[tuple[str, str], int] = {}
    out = {}
    for arm, control, h in keys:
        i = seen[(arm, control)] = seen.get((arm, control), -1) + 1
        text = arm + (" (haar control)" if control else "")
        text += f" {labels[h]}" if labels[h] else ""
        text += f" [{h[:8]}]" if shown_hash else ""
        out[(arm, control, h)] = GroupStyle(
            colour=lighten(arm_colour(arm), CONFIG_SHADES[i % len(CONFIG_SHADES)]),
            ls="--" if control else "-",
            marker=CONFIG_MARKERS[i % len(CONFIG_MARKERS)],
            hatch="//" if control else None,
            label=text,
        )
    return out


def pair_rate(v: object) -> float:
    """[n, N] -> n/N; NaN when the pair is null or N == 0 (no rollouts of that kind)."""
    if v is None:
        return math.nan
    if not (isinstance(v, list | tuple) and len(v) == 2):
        raise ValueError(f"expected an [n, N] pair, got {v!r}")
    n, total = v
    return math.nan if not total else float(n) / float(total)


def scalar(v: object) -> float:
    """A row float; null (how the loop writes non-finite values) -> NaN."""
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"expected a number or null, got {v!r}")
    return float(v)


# Derived series: name -> (row field, converter).
SERIES: dict[str, tuple[str, object]] = {
    "hack_s": ("hack_s", pair_rate),
    "solve_s": ("gt_s", pair_rate),
    "hack_deploy": ("hack_deploy", scalar),
    "solve_deploy": ("solve_deploy", scalar),
    "tau": ("tau", scalar),
    "flag": ("flag", scalar),
    "prec": ("prec", scalar),
}


@dataclass
class RunSeries:
    """Per-step series of one run folder (values NaN where the row had null)."""

    path: Path
    run_id: str
    preset: str
    arm: str
    control: str  # "" or "haar"
    seed: int
    state: str
    step: np.ndarray
    values: dict[str, np.ndarray]
    config: dict[str, object] = dataclasses.field(default_factory=dict)  # science knobs (results)
    config_hash: str = ""
    final: dict[str, float] = dataclasses.field(default_factory=dict)  # the final eval (per_mode_deploy.json)

    @property
    def group(self) -> GroupKey:
        return (self.arm, self.control, self.config_hash)


def load_series(run_dir: Path) -> RunSeries:
    """Read config.json, status.json and rows.jsonl of one run; RunFolderError names the
    file/line and the problem."""

    def read(name: str) -> dict:
        p = run_dir / name
        if not p.is_file():
            raise RunFolderError(f"no {name}")
        try:
            obj = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise RunFolderError(f"{name} is not valid JSON ({e})") from e
        if not isinstance(obj, dict):
            raise RunFolderError(f"{name}: expected a JSON object")
        return obj

    knobs = read_config_knobs(run_dir)
    cfg_file, status = read(CONFIG_FILE), read(STATUS_FILE)
    for key in ("run_id", "preset", "arm", "seed"):
        if key not in cfg_file:
            raise RunFolderError(f"{CONFIG_FILE}: missing field {key!r}")
    rows_path = run_dir / ROWS_FILE
    if not rows_path.is_file():
        raise RunFolderError(f"no {ROWS_FILE}")
    steps: list[int] = []
    cols: dict[str, list[float]] = {k: [] for k in SERIES}
    for i, line in enumerate(rows_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = row["step"]
            if isinstance(step, bool) or not isinstance(step, int):
                raise ValueError(f"'step' must be an integer, got {step!r}")
            vals = {k: conv(row.get(f)) for k, (f, conv) in SERIES.items()}  # type: ignore[operator]
        except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
            raise RunFolderError(f"{ROWS_FILE} line {i}: {e}") from e
        steps.append(step)
        for k, v in vals.items():
            cols[k].append(v)
    if not steps:
        raise RunFolderError(f"{ROWS_FILE} has no rows")
    order = np.argsort(steps, kind="stable")
    return RunSeries(
        path=run_dir,
        run_id=str(cfg_file["run_id"]),
        preset=str(cfg_file["preset"]),
        arm=str(cfg_file["arm"]),
        control="" if knobs.get("random_v_seed") is None else "haar",
        seed=int(cfg_file["seed"]),
        state=str(status.get("state")),
        step=np.asarray(steps)[order],
        values={k: np.asarray(v, dtype=float)[order] for k, v in cols.items()},
        config=science_config(knobs),
        config_hash=config_hash(science_config(knobs)),
        final=final_eval(run_dir),
    )


def final_eval(run_dir: Path) -> dict[str, float]:
    """The final eval's head rates, {"hack_deploy", "solve_deploy"}, from per_mode_deploy.json ({} when
    the run has none or it is unreadable: the table, not the plot, is where a bad record is reported)."""
    try:
        rec = json.loads((run_dir / "per_mode_deploy.json").read_text())
        return {k: float(rec[k]) for k in ("hack_deploy", "solve_deploy")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def moving_average(y: np.ndarray, k: int) -> np.ndarray:
    """Trailing mean over the last k finite values in each window (NaN where the window has
    none); k = 1 returns y unchanged."""
    if k <= 1:
        return y
    out = np.full_like(y, np.nan)
    for i in range(len(y)):
        w = y[max(0, i - k + 1) : i + 1]
        w = w[np.isfinite(w)]
        if w.size:
            out[i] = w.mean()
    return out


def mean_over_seeds(
    runs: Sequence[RunSeries], key: str, smooth: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Align runs on step; return (steps, mean, count) where mean averages the finite values
    of the runs that have that step (count says how many). Steps no run has a finite value
    for are dropped."""
    table: dict[int, list[float]] = {}
    for r in runs:
        y = moving_average(r.values[key], smooth)
        for s, v in zip(r.step.tolist(), y.tolist(), strict=True):
            if math.isfinite(v):
                table.setdefault(s, []).append(v)
    steps = np.asarray(sorted(table), dtype=int)
    mean = np.asarray([float(np.mean(table[s])) for s in steps.tolist()])
    count = np.asarray([len(table[s]) for s in steps.tolist()], dtype=int)
    return steps, mean, count


def _group_order(g: tuple[str, str]) -> tuple[int, str, str]:
    arm, control = g
    return (ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER), arm, control)


def group_series(runs: Sequence[RunSeries]) -> tuple[dict[GroupKey, list[RunSeries]], dict[GroupKey, GroupStyle]]:
    """The runs by experiment (arm, control, config hash), in table order, with their styles."""
    groups: dict[GroupKey, list[RunSeries]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    styles = group_styles({g: rs[0].config for g, rs in groups.items()})
    return {g: groups[g] for g in styles}, styles


def _panel(
    ax,
    groups: dict[GroupKey, list[RunSeries]],
    styles: dict[GroupKey, GroupStyle],
    key: str,
    smooth: int,
    sparse: bool,
) -> bool:
    """Thin line per seed, thick mean; `sparse` series (deploy evals) drop NaNs and use
    markers. Returns whether anything was drawn."""
    drawn = False
    for g, rs in groups.items():
        st = styles[g]
        for r in rs:
            y = r.values[key] if sparse else moving_average(r.values[key], smooth)
            ok = np.isfinite(y)
            if ok.any():
                ax.plot(
                    r.step[ok] if sparse else r.step,
                    y[ok] if sparse else y,
                    color=st.colour,
                    ls=st.ls,
                    lw=0.8,
                    alpha=0.35,
                    marker="." if sparse else None,
                    ms=3,
                )
        steps, mean, _ = mean_over_seeds(rs, key, 1 if sparse else smooth)
        if steps.size:
            drawn = True
            marker = st.marker or ("o" if sparse else None)
            ax.plot(steps, mean, color=st.colour, ls=st.ls, lw=2.4, marker=marker, ms=5,
                    markevery=1 if sparse else max(1, steps.size // 8))
        finals = [(int(r.step[-1]) + 1, r.final[key]) for r in rs if sparse and key in r.final]
        if finals:  # the final eval, after the last step: a star per seed, a large one at the mean
            drawn = True
            ax.scatter([x for x, _ in finals], [y for _, y in finals], color=st.colour, marker="*", s=40, alpha=0.4)
            ax.scatter([max(x for x, _ in finals)], [float(np.mean([y for _, y in finals]))], color=st.colour,
                       marker="*", s=260, edgecolors="black", linewidths=0.6, zorder=3)
    if not drawn:
        ax.text(
            0.5,
            0.5,
            "no data in these runs",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="0.4",
        )
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    return drawn


def _legend_handles(groups: dict[GroupKey, list[RunSeries]], styles: dict[GroupKey, GroupStyle]):
    return [
        Line2D([], [], color=styles[g].colour, ls=styles[g].ls, marker=styles[g].marker, lw=2.4,
               label=f"{styles[g].label}  n={len({r.seed for r in rs})}")
        for g, rs in groups.items()
    ]


LEGEND_MAX_COLUMNS = 4


def _fig_legend(fig, handles) -> None:
    """The figure's legend below the panels, in as many columns (at most LEGEND_MAX_COLUMNS) as
    fit the figure's width: long experiment labels (arm + differing knobs) take more rows
    instead of running off both sides of the image."""
    renderer = fig.canvas.get_renderer()
    for ncol in range(min(LEGEND_MAX_COLUMNS, len(handles)), 0, -1):
        leg = fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False)
        if ncol == 1 or leg.get_window_extent(renderer).width <= fig.bbox.width:
            return
        leg.remove()


def plot_dynamics(runs: Sequence[RunSeries], out_path: Path, preset: str, smooth: int = 1) -> Path:
    """2x2 figure: train hack / solve per step, deploy hack / solve at the eval steps."""
    groups, styles = group_series(runs)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True, layout="constrained")
    sm = f" ({smooth}-step moving average)" if smooth > 1 else ""
    panels = [
        (
            axes[0, 0],
            "hack_s",
            False,
            "train hack rate (student, knob on)" + sm,
            "exploited / student rollouts",
        ),
        (
            axes[0, 1],
            "solve_s",
            False,
            "train solve rate (student, knob on)" + sm,
            "strict-oracle correct / student rollouts",
        ),
        (
            axes[1, 0],
            "hack_deploy",
            True,
            "deploy hack rate (quarantine ablated; ★ final eval)",
            "exploited / eval rollouts",
        ),
        (
            axes[1, 1],
            "solve_deploy",
            True,
            "deploy solve rate (quarantine ablated; ★ final eval)",
            "strict-oracle correct / eval rollouts",
        ),
    ]
    for ax, key, sparse, title, ylabel in panels:
        _panel(ax, groups, styles, key, smooth, sparse)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_ylim(-0.03, 1.03)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(
        f"{preset}: hack and solve over training, per experiment (thin: one seed, thick: mean over seeds)",
        fontsize=13,
    )
    _fig_legend(fig, _legend_handles(groups, styles))
    return _save(fig, out_path)


def plot_gate(
    runs: Sequence[RunSeries], out_path: Path, preset: str, smooth: int = 1
) -> Path | None:
    """route2 gate diagnostics per step: τ, flagged fraction, precision vs the oracle.
    Returns None (and writes nothing) when there is no route2 run."""
    r2 = [r for r in runs if r.arm == "routing2"]
    if not r2:
        return None
    groups, styles = group_series(r2)
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True, layout="constrained")
    panels = [
        ("tau", "threshold τ on cos(g_b, v_grad)", "τ", None),
        ("flag", "fraction of rollouts flagged (routed to δS_hack)", "flagged fraction", (0, 1)),
        ("prec", "gate precision vs oracle `exploited` (student rollouts)", "precision", (0, 1)),
    ]
    for ax, (key, title, ylabel, ylim) in zip(axes, panels, strict=True):
        _panel(ax, groups, styles, key, smooth, sparse=False)
        ax.set_title(title + (f" ({smooth}-step moving average)" if smooth > 1 else ""))
        ax.set_ylabel(ylabel)
        if ylim:
            ax.set_ylim(ylim[0] - 0.03, ylim[1] + 0.03)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle(f"{preset}: route2 gate diagnostics (thin: one seed, thick: mean)", fontsize=13)
    _fig_legend(fig, _legend_handles(groups, styles))
    return _save(fig, out_path)


def plot_per_mode(records: Sequence[RunRecord], out_path: Path, preset: str) -> Path | None:
    """Bars per loophole mode and arm: deploy hack (top) and deploy solve (bottom), mean over
    seeds with a 95% t-interval (none for one seed), each seed a dot. None if no records."""
    if not records:
        return None
    groups: dict[GroupKey, list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.arm, r.control, r.config_hash), []).append(r)
    styles = group_styles({g: rs[0].config for g, rs in groups.items()})
    keys = list(styles)  # table order
    modes = sorted({m for r in records for m in r.by_mode}, key=mode_rank)
    eval_sets = sorted({r.eval_set for r in records})
    fig, axes = plt.subplots(
        2,
        1,
        figsize=(max(11, 0.9 * len(modes) * max(2, len(keys))), 8.5),
        sharex=True,
        layout="constrained",
    )
    width = 0.8 / len(keys)
    x = np.arange(len(modes))
    for ax, field, title in (
        (axes[0], "deploy_hack", "deploy hack rate per loophole mode"),
        (axes[1], "deploy_solve", "deploy solve rate per loophole mode"),
    ):
        for i, key in enumerate(keys):
            st = styles[key]
            colour, control = st.colour, key[1]
            xs = x - 0.4 + width * (i + 0.5)
            for j, m in enumerate(modes):
                vals = [r.by_mode[m][field] for r in groups[key] if m in r.by_mode]
                if not vals:
                    continue
                ci = mean_ci(vals)
                err = None if ci.half_width is None else [[ci.half_width], [ci.half_width]]
                ax.bar(
                    xs[j],
                    ci.mean,
                    width * 0.9,
                    color=colour,
                    alpha=0.45 if control else 1.0,
                    hatch=st.hatch,
                    edgecolor=colour,
                    yerr=err,
                    ecolor="0.25",
                    capsize=3,
                )
                ax.scatter(
                    np.full(len(vals), xs[j]),
                    vals,
                    s=12,
                    color="white",
                    edgecolors="0.2",
                    linewidths=0.7,
                    zorder=3,
                )
        ax.set_title(title + " (quarantine ablated)")
        ax.set_ylabel(field.replace("_", " ") + " rate")
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(x, [m.replace("_", "_\n", 1) if len(m) > 12 else m for m in modes])
    axes[1].set_xlabel("loophole mode of the eval problem")
    handles = [
        plt.Rectangle(
            (0, 0),
            1,
            1,
            color=styles[k].colour,
            alpha=0.45 if k[1] else 1.0,
            hatch=styles[k].hatch,
            label=f"{styles[k].label}  n={len({r.seed for r in groups[k]})}",
        )
        for k in keys
    ]
    fig.suptitle(
        f"{preset}: per-mode deployed hack and solve across arms "
        f"(eval set: {', '.join(eval_sets)})\n"
        "bar = mean over seeds, whisker = 95% t-interval (n >= 2), dot = one seed",
        fontsize=13,
    )
    _fig_legend(fig, handles)
    return _save(fig, out_path)


def _save(fig, out_path: Path) -> Path:
    """Save via a temp file in the same folder, then os.replace (never a half-written PNG)."""
    try:
        with atomic_path(out_path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return out_path


def collect_series(
    runs_dir: Path, include_unfinished: bool = False
) -> tuple[list[RunSeries], list[RunRecord], list[tuple[Path, str]]]:
    """Load the runs to draw: returns (series, deploy records, [(folder, why skipped)]).

    By default exactly the runs the results table counts (complete, valid final eval, newest
    folder per seed) are drawn, so legends' n matches the table. `include_unfinished` adds the
    per-step rows of every other folder whose rows can be read (running, failed, no eval).
    """
    records, not_counted = scan_runs(runs_dir)  # FileNotFoundError when runs_dir is missing
    counted = {r.path for r in records}
    why = {s.path: s.reason for s in not_counted}
    series, skipped = [], []
    for d in sorted(p for p in Path(runs_dir).iterdir() if p.is_dir()):
        if d not in counted and not include_unfinished:
            skipped.append((d, why[d]))
            continue
        try:
            series.append(load_series(d))
        except RunFolderError as e:
            skipped.append((d, str(e)))
    return series, records, skipped


def make_plots(
    runs_dir: Path,
    out_dir: Path,
    preset: str | None = None,
    smooth: int = 1,
    include_unfinished: bool = False,
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Write every figure for every preset found (or just `preset`); return (paths, skipped)."""
    series, records, skipped = collect_series(runs_dir, include_unfinished)
    presets = sorted({s.preset for s in series} | {r.preset for r in records})
    if preset is not None:
        presets = [p for p in presets if p == preset]
    written: list[Path] = []
    for p in presets:
        ps = [s for s in series if s.preset == p]
        if ps:
            written.append(plot_dynamics(ps, out_dir / f"dynamics_{p}.png", p, smooth))
            gate = plot_gate(ps, out_dir / f"gate_{p}.png", p, smooth)
            if gate:
                written.append(gate)
        bars = plot_per_mode(
            [r for r in records if r.preset == p], out_dir / f"per_mode_{p}.png", p
        )
        if bars:
            written.append(bars)
    return written, skipped


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="plot_dynamics.py", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("out/runs"), help="folder of run folders")
    ap.add_argument("--out", type=Path, default=Path("out/plots"), help="where PNGs go")
    ap.add_argument("--preset", default=None, help="only this preset (default: every preset)")
    ap.add_argument(
        "--smooth",
        type=int,
        default=1,
        help="trailing moving average over k steps for per-step curves (1 = raw)",
    )
    ap.add_argument(
        "--include-unfinished",
        action="store_true",
        help="also draw the per-step rows of runs the results table does not count "
        "(running, failed, no final eval)",
    )
    args = ap.parse_args(argv)
    if args.smooth < 1:
        ap.error("--smooth must be >= 1")
    try:
        written, skipped = make_plots(
            args.runs, args.out, args.preset, args.smooth, args.include_unfinished
        )
    except FileNotFoundError as e:
        print(f"error: {e}")
        return 2
    for d, why in skipped:
        print(f"skipped {d.name}: {why}")
    if skipped and not args.include_unfinished:
        print(
            "(skipped runs are those results.py does not count; --include-unfinished draws "
            "the per-step rows of the readable ones)"
        )
    if not written:
        what = f" for preset {args.preset!r}" if args.preset else ""
        print(f"error: nothing to plot{what} under {args.runs}")
        return 1
    for p in written:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
