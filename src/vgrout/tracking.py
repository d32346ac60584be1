"""Experiment tracking: `--report-to {none,wandb,tensorboard}`.

The training loop talks to one small interface and never imports a tracker itself:

    tracker = make_tracker(cfg, run_dir)      # Tracker() (does nothing) for `none`
    with tracker:                             # finish() on the way out; exit code 1 on an exception
        tracker.start(cfg.to_dict(), prov)    # prov = ck.provenance(model_weights), as config.json holds it
        ...  tracker.log_row(step, row)       # every step: the per-step row's keys, as numbers
        tracker.log_final(record)             # the final eval record and its per-mode tables
        tracker.log_plots(run_dir)            # this run's dynamics / gate / per-mode PNGs

What a tracker receives (the same for both backends):
- per step: every key of the row (docs/artifacts.md) under its own name, as a number:
  `(n, N)` pairs as the rate n/N, booleans as 0/1, numeric strings (`refr`) as floats;
  non-finite values and text are left out (rows.jsonl keeps the full row);
- at the start: the config (every knob) and the provenance (command, git commit, packages);
- at the end: the final record's scalars as `final/<key>`, one table per eval set
  (`final/per_mode_<set>`: mode, in_dist, train/deploy hack and solve, n), and the PNGs that
  `vgrout.plots` draws for this one run (`plots/<name>`).

wandb writes under `<run folder>/wandb/` (offline with `WANDB_MODE=offline`; `wandb sync` it
later); the wandb run id is derived from the run folder, so `--resume` continues the same
wandb run. tensorboard writes event files to `<run folder>/tensorboard/`.
Both packages are optional (`uv sync --extra wandb` / `--extra tensorboard`); `Config.validate`
refuses `--report-to` for a package that is not installed, before any run folder exists.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPORT_TO = ("none", "wandb", "tensorboard")
PACKAGE = {"wandb": "wandb", "tensorboard": "tensorboard"}  # --report-to value -> import name
EXTRA_HINT = {
    "wandb": "uv sync --extra wandb (or pip install wandb)",
    "tensorboard": "uv sync --extra tensorboard (or pip install tensorboard)",
}
PER_MODE_FIELDS = ("in_dist", "train_hack", "train_solve", "deploy_hack", "deploy_solve", "n")


def row_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers a tracker logs for one per-step row (see the module docstring)."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if isinstance(v, bool):
            x = float(v)
        elif isinstance(v, int | float):
            x = float(v)
        elif isinstance(v, tuple | list) and len(v) == 2 and all(isinstance(e, int | float) for e in v):
            x = float(v[0]) / float(v[1]) if v[1] else math.nan
        elif isinstance(v, str):
            try:
                x = float(v)
            except ValueError:
                continue
        else:
            continue
        if math.isfinite(x):
            out[k] = x
    return out


def final_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """Top-level numbers of the final eval record (per_mode_deploy.json) as `final/<key>`."""
    return {f"final/{k}": float(v) for k, v in record.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}


def per_mode_tables(record: Mapping[str, Any]) -> dict[str, list[dict]]:
    """`final/per_mode_<set>` -> one row per mode of that eval set (train vs deploy rates)."""
    sets = record.get("sets") or {record.get("eval_set", "train"): record}
    return {
        f"final/per_mode_{name}": [{"mode": m, **{f: by[f] for f in PER_MODE_FIELDS if f in by}}
                                   for m, by in s.get("by_mode", {}).items()]
        for name, s in sets.items()
    }


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    from tabulate import tabulate

    return tabulate(list(rows), headers="keys", tablefmt="github", floatfmt=".3f")


def run_plots(run_dir: Path) -> list[Path]:
    """Draw this run's figures into `<run_dir>/plots/` with `vgrout.plots`: the per-step
    dynamics, the route2 gate (route2 only) and the per-mode deploy bars (complete runs)."""
    from . import plots
    from .results import RunFolderError, load_run

    series = plots.load_series(run_dir)
    out = run_dir / "plots"
    paths = [plots.plot_dynamics([series], out / "dynamics.png", series.preset)]
    gate = plots.plot_gate([series], out / "gate.png", series.preset)
    if gate is not None:
        paths.append(gate)
    try:
        per_mode = plots.plot_per_mode([load_run(run_dir)], out / "per_mode.png", series.preset)
    except RunFolderError:
        per_mode = None
    if per_mode is not None:
        paths.append(per_mode)
    return paths


class Tracker:
    """`--report-to none`: every call does nothing. Backends override the `_`-free methods."""

    name = "none"
    active = False

    def start(self, config: Mapping[str, Any], provenance: Mapping[str, Any]) -> None:
        pass

    def log_row(self, step: int, row: Mapping[str, Any]) -> None:
        pass

    def log_final(self, record: Mapping[str, Any], tables: Mapping[str, list[dict]] | None = None) -> None:
        pass

    def log_images(self, paths: Sequence[Path]) -> None:
        pass

    def log_plots(self, run_dir: Path) -> None:
        """Render this run's PNGs and log them (nothing is drawn when tracking is off). Called
        after the run is complete: a figure that fails to draw is a warning, never a failed run."""
        if not self.active:
            return
        try:
            paths = run_plots(run_dir)
        except Exception as e:  # noqa: BLE001 - the run's data is safe in rows.jsonl; say what broke
            from loguru import logger

            logger.warning(f"{self.name}: could not draw the run's plots ({type(e).__name__}: {e}); none logged")
            return
        self.log_images(paths)

    def finish(self, exit_code: int = 0) -> None:
        pass

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(0 if exc_type is None else 1)


def _tables(record: Mapping[str, Any], tables: Mapping[str, list[dict]] | None) -> dict[str, list[dict]]:
    return {**per_mode_tables(record), **(tables or {})}


class WandbTracker(Tracker):
    name = "wandb"
    active = True

    def __init__(self, run_dir: Path, run_name: str, group: str, tags: Sequence[str]):
        self.run_dir, self.run_name, self.group, self.tags = run_dir, run_name, group, list(tags)
        self.run = None
        self.last_step = 0

    @staticmethod
    def run_id(run_dir: Path) -> str:
        """A wandb run id from the run folder name (stable across --resume)."""
        return re.sub(r"[^A-Za-z0-9_-]", "-", run_dir.name)[:64]

    def start(self, config: Mapping[str, Any], provenance: Mapping[str, Any]) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "vgrout"), dir=str(self.run_dir), name=self.run_name,
            id=self.run_id(self.run_dir), resume="allow", group=self.group, tags=self.tags,
            config={**config, "provenance": dict(provenance)})
        self.run.define_metric("*", step_metric="step")  # the optimizer step is the x-axis, also on resume

    def log_row(self, step: int, row: Mapping[str, Any]) -> None:
        self.last_step = step
        self.run.log({**row_scalars(row), "step": step})

    def log_final(self, record: Mapping[str, Any], tables: Mapping[str, list[dict]] | None = None) -> None:
        import wandb

        self.run.summary.update(final_scalars(record))
        logged = {}
        for key, rows in _tables(record, tables).items():
            cols = list(dict.fromkeys(c for r in rows for c in r))
            logged[key] = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])
        self.run.log({**logged, "step": self.last_step})

    def log_images(self, paths: Sequence[Path]) -> None:
        import wandb

        if paths:
            self.run.log({**{f"plots/{p.stem}": wandb.Image(str(p)) for p in paths}, "step": self.last_step})

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


class TensorboardTracker(Tracker):
    name = "tensorboard"
    active = True

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.writer = None
        self.last_step = 0

    def start(self, config: Mapping[str, Any], provenance: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        for tag, obj in (("config", config), ("provenance", provenance)):
            self.writer.add_text(tag, "```json\n" + json.dumps(obj, indent=1, default=str) + "\n```", 0)

    def log_row(self, step: int, row: Mapping[str, Any]) -> None:
        self.last_step = step
        for k, v in row_scalars(row).items():
            if k != "step":
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_final(self, record: Mapping[str, Any], tables: Mapping[str, list[dict]] | None = None) -> None:
        for k, v in final_scalars(record).items():
            self.writer.add_scalar(k, v, self.last_step)
        for key, rows in _tables(record, tables).items():
            self.writer.add_text(key, markdown(rows), self.last_step)
        self.writer.flush()

    def log_images(self, paths: Sequence[Path]) -> None:
        import matplotlib.image

        for p in paths:
            img = matplotlib.image.imread(str(p))[..., :3]  # PNG -> float RGB in [0, 1]
            self.writer.add_image(f"plots/{p.stem}", img, self.last_step, dataformats="HWC")
        self.writer.flush()

    def finish(self, exit_code: int = 0) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def missing_package(report_to: str) -> str | None:
    """The one-line error for a tracker whose package is not installed (None when it is)."""
    import importlib.util

    pkg = PACKAGE.get(report_to)
    if pkg is None or importlib.util.find_spec(pkg) is not None:
        return None
    return f"--report-to {report_to} needs the `{pkg}` package: {EXTRA_HINT[report_to]}"


def make_tracker(cfg, run_dir: Path) -> Tracker:
    """The tracker `cfg.report_to` names, writing under `run_dir` (not started yet)."""
    if cfg.report_to == "wandb":
        return WandbTracker(run_dir, run_name=run_dir.name, group=f"{cfg.preset_name}_{cfg.arm}",
                            tags=[cfg.preset_name, cfg.arm, f"seed{cfg.seed}"])
    if cfg.report_to == "tensorboard":
        return TensorboardTracker(run_dir / "tensorboard")
    if cfg.report_to != "none":
        raise ValueError(f"--report-to must be one of {', '.join(REPORT_TO)} (got {cfg.report_to!r})")
    return Tracker()
