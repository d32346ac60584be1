"""Keep the records of finished runs where git can hold them.

Run folders under `out/` are not kept in git (checkpoints, caches), and a sweep of the organism
takes longer than one working session on a 2-core machine. This copies, for every complete run
under SRC, the four files that `results.py`, `plot_dynamics.py` and `block_effects.py` read
(config.json, status.json, per_mode_deploy.json, rows.jsonl; a few KB, no weights) into
DEST/<run folder>/. A later session points those scripts at DEST plus its own new runs: the runs
pool only where their config hash and recorded model weights (`provenance.model_weights`) agree,
which the organism's pinned SFT threads make possible for a rebuild on the same kind of CPU.

    uv run python scripts/keep_runs.py out/runs docs/results/organism_records

A run already kept with the same bytes is left alone; one kept with other bytes is an error (two
different runs cannot share a folder name). Runs that are not complete are listed and skipped.
Each run's folder is assembled beside DEST and renamed into place (a killed copy leaves nothing).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
from pathlib import Path

from vgrout.atomic import staging_dir
from vgrout.results import CONFIG_FILE, DEPLOY_FILE, ROWS_FILE, STATUS_FILE, RunFolderError, load_run

RECORD_FILES: tuple[str, ...] = (CONFIG_FILE, STATUS_FILE, DEPLOY_FILE, ROWS_FILE)


def keep_runs(src: Path, dest: Path) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Copy RECORD_FILES of each complete run folder in `src` to `dest/<name>/`.

    Returns (kept now, already kept with equal bytes, skipped with the reason). Raises
    FileExistsError, before copying anything, when a kept folder's files differ from the source's."""
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise FileNotFoundError(f"runs folder {src} does not exist (pass the folder that holds the run folders)")
    todo, same, skipped = [], [], []
    for d in sorted(p for p in src.iterdir() if p.is_dir()):
        try:
            load_run(d)
        except RunFolderError as e:
            skipped.append((d.name, str(e)))
            continue
        if not (d / ROWS_FILE).is_file():
            skipped.append((d.name, f"no {ROWS_FILE}"))
            continue
        target = dest / d.name
        if target.exists():
            if all((target / f).is_file() and filecmp.cmp(d / f, target / f, shallow=False) for f in RECORD_FILES):
                same.append(d.name)
                continue
            raise FileExistsError(f"{target} is already kept with other content than {d}: two runs with one "
                                  f"folder name; move one of them away and run again")
        todo.append(d)
    for d in todo:
        with staging_dir(dest / d.name) as tmp:
            for f in RECORD_FILES:
                shutil.copy2(d / f, tmp / f)
            tmp.rename(dest / d.name)
    return [d.name for d in todo], same, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="folder of run folders (e.g. out/runs)")
    ap.add_argument("dest", type=Path, help="where the records go (e.g. docs/results/organism_records)")
    args = ap.parse_args()
    try:
        kept, same, skipped = keep_runs(args.src, args.dest)
    except (FileNotFoundError, FileExistsError) as e:
        sys.exit(f"keep_runs: {e}")
    for name, why in skipped:
        print(f"skipped {name}: {why}")
    print(f"kept {len(kept)} run(s) in {args.dest} ({len(same)} already there)")


if __name__ == "__main__":
    main()
