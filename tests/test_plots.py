"""Dynamics plots from synthetic run folders: files are real PNGs that show every arm in its
own fixed colour; the series math (rates, seed means) is exact."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from test_results import write_fleet, write_run  # shared run-folder writers
from vgrout.plots import (
    ARM_COLOURS,
    OTHER_COLOUR,
    load_series,
    main,
    make_plots,
    mean_over_seeds,
    moving_average,
    pair_rate,
)
from vgrout.results import RunFolderError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width/height from the IHDR chunk, after checking the PNG signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def colour_pixels(path: Path, hex_colour: str, tol: float = 0.02) -> int:
    """How many pixels of the PNG have (within tol) this exact RGB colour."""
    img = mpimg.imread(path)[..., :3]
    rgb = np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(img - rgb).max(axis=-1) < tol).sum())


def test_rate_and_seed_mean_math(tmp_path):
    assert pair_rate([3, 8]) == 3 / 8
    assert math.isnan(pair_rate([0, 0])) and math.isnan(pair_rate(None))
    with pytest.raises(ValueError):
        pair_rate([1, 2, 3])
    y = np.array([1.0, np.nan, 3.0, 5.0])
    np.testing.assert_allclose(moving_average(y, 2), [1.0, 1.0, 3.0, 4.0])
    assert moving_average(y, 1) is y

    a = write_run(tmp_path, seed=3, steps=4, slope=0.25)  # hack_s = 0, 2, 4, 6 of 8
    b = write_run(tmp_path, seed=6, steps=2, slope=0.5)  # hack_s = 0, 4 of 8
    ra, rb = load_series(a), load_series(b)
    np.testing.assert_allclose(ra.values["hack_s"], [0, 0.25, 0.5, 0.75])
    steps, mean, count = mean_over_seeds([ra, rb], "hack_s")
    assert steps.tolist() == [0, 1, 2, 3] and count.tolist() == [2, 2, 1, 1]
    np.testing.assert_allclose(mean, [0.0, (0.25 + 0.5) / 2, 0.5, 0.75])
    # deploy columns are null except on eval steps (every 5 steps): none in 4 steps
    steps, mean, count = mean_over_seeds([ra, rb], "hack_deploy")
    assert steps.size == 0


def test_malformed_rows_name_the_line(tmp_path):
    d = write_run(tmp_path)
    with (d / "rows.jsonl").open("a") as f:
        f.write('{"step": 10, "hack_s": [1, 2, 3]}\n')
    with pytest.raises(RunFolderError, match=r"rows.jsonl line 11: expected an \[n, N\] pair"):
        load_series(d)


def test_plots_written_valid_and_coloured_per_arm(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "plots"
    p = write_fleet(runs)
    assert main(["--runs", str(runs), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    names = sorted(f.name for f in out.iterdir())
    assert names == ["dynamics_smoke.png", "gate_smoke.png", "per_mode_smoke.png"]
    for f in out.iterdir():
        w, h = png_size(f)
        assert w >= 800 and h >= 600 and f.stat().st_size > 20_000
    # status not complete -> listed, not drawn
    assert f"skipped {p['running'].name}: status 'running'" in log
    assert f"skipped {p['nostatus'].name}: no status.json" in log

    dyn, gate, bars = (out / n for n in names)
    for arm in ("vanilla", "projected", "routing2"):  # the arms that completed
        assert colour_pixels(dyn, ARM_COLOURS[arm]) > 200, arm
        assert colour_pixels(bars, ARM_COLOURS[arm]) > 200, arm
    assert colour_pixels(dyn, ARM_COLOURS["routing"]) == 0  # routing runs all failed
    assert colour_pixels(gate, ARM_COLOURS["routing2"]) > 200
    assert colour_pixels(gate, ARM_COLOURS["projected"]) == 0


def test_block_arms_have_their_own_colours_and_long_legends_stay_inside_the_image(tmp_path):
    """absorb and routeA are drawn in colours of their own (not the shared fallback), and a legend
    of four long experiment labels wraps into rows rather than running off the image's sides:
    the outermost pixel columns of every figure's bottom band (where the legend sits) stay white."""
    runs, out = tmp_path / "runs", tmp_path / "plots"
    for i, (arm, adapter, ctrl) in enumerate((("absorb", "scorda", None), ("absorb", "scorda_rev", None),
                                              ("routeA", "lora2r", None), ("routeA", "lora2r", 7))):
        for seed in (41, 42):
            write_run(runs, arm=arm, seed=seed, random_v_seed=ctrl, stamp=f"2026010{i + 1}T00000{seed - 40}",
                      slope=0.01 + 0.03 * i, hack_deploy=0.1 + 0.2 * i,
                      knobs={"adapter": adapter, "vhack_pairs_path": f"/data/pairsets/contrastive_pairs_{i}.json"})
    assert main(["--runs", str(runs), "--out", str(out)]) == 0
    dyn = out / "dynamics_smoke.png"
    for arm in ("absorb", "routeA"):
        assert ARM_COLOURS[arm] != OTHER_COLOUR and colour_pixels(dyn, ARM_COLOURS[arm]) > 200, arm
    assert len(set(ARM_COLOURS.values()) | {OTHER_COLOUR}) == len(ARM_COLOURS) + 1
    for f in out.iterdir():
        img = mpimg.imread(f)[..., :3]
        band = img[int(0.9 * img.shape[0]):]
        edges = np.concatenate([band[:, :4], band[:, -4:]], axis=1)
        assert edges.min() > 0.95, f"{f.name}: the legend reaches the image's left or right edge"


def test_preset_filter_unfinished_and_errors(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(runs, preset="fast", arm="routing", seed=1, state="running", deploy=False)
    write_run(runs, preset="smoke", arm="vanilla", seed=1)
    out = tmp_path / "o"
    written, skipped = make_plots(runs, out, preset="fast")
    assert written == [] and len(skipped) == 1
    written, _ = make_plots(runs, out, preset="fast", include_unfinished=True)
    assert [w.name for w in written] == ["dynamics_fast.png"]  # no route2, no final eval
    assert colour_pixels(written[0], ARM_COLOURS["routing"]) > 200
    assert main(["--runs", str(runs), "--out", str(out), "--preset", "full"]) == 1
    assert "nothing to plot for preset 'full'" in capsys.readouterr().out
    assert main(["--runs", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().out


def test_different_configs_are_never_drawn_as_seeds_of_one_line(tmp_path):
    """Grouped like results.py: two vanilla configs (lr) are two lines in two shades of black, each
    with its own seeds; two seeds of one config are one line."""
    from vgrout.plots import group_series, lighten

    runs = tmp_path / "runs"
    write_run(runs, arm="vanilla", seed=41, slope=0.1)
    write_run(runs, arm="vanilla", seed=42, slope=0.1)
    write_run(runs, arm="vanilla", seed=41, slope=0.02, knobs={"lr": 1e-3}, stamp="20260102T000000")
    written, _ = make_plots(runs, tmp_path / "out")
    series = [load_series(d) for d in sorted(runs.iterdir())]
    lines, styles = group_series(series)
    assert sorted(sorted(r.seed for r in rs) for rs in lines.values()) == [[41], [41, 42]]
    assert sorted(st.colour for st in styles.values()) == ["#000000", lighten("#000000", 0.5)] == [
        "#000000", "#808080"]
    assert sorted(st.label.split(" [")[0] for st in styles.values()) == ["vanilla lr=(absent)", "vanilla lr=0.001"]
    dyn, bars = (tmp_path / "out" / n for n in ("dynamics_smoke.png", "per_mode_smoke.png"))
    assert {p.name for p in written} == {dyn.name, bars.name}
    for png in (dyn, bars):  # anti-aliased black edges alone give a few hundred #808080 pixels
        assert colour_pixels(png, "#000000") > 2000 and colour_pixels(png, "#808080", tol=0.01) > 2000, png.name


def test_final_eval_is_read_and_drawn_when_no_periodic_eval(tmp_path):
    """A run without periodic deploy evals still shows its final eval on the deploy panels (a star
    after the last step); a run without per_mode_deploy.json has no final values."""
    from vgrout.plots import plot_dynamics

    a = write_run(tmp_path / "runs", arm="routing2", seed=1, steps=4, eval_every=100, hack_deploy=0.25,
                  solve_deploy=0.125)
    ra = load_series(a)
    assert ra.final == {"hack_deploy": 0.25, "solve_deploy": 0.125}
    assert not np.isfinite(ra.values["hack_deploy"]).any()  # no periodic eval in 4 steps
    b = write_run(tmp_path / "runs", arm="routing2", seed=2, steps=4, eval_every=100, deploy=False)
    assert load_series(b).final == {}
    with_final = plot_dynamics([ra], tmp_path / "with.png", "smoke")
    without = plot_dynamics([load_series(b)], tmp_path / "without.png", "smoke")
    rgb = np.array([int(ARM_COLOURS["routing2"][i : i + 2], 16) / 255 for i in (1, 3, 5)])

    def lower_half_pixels(path: Path) -> int:  # the deploy panels
        img = mpimg.imread(path)[..., :3]
        h = img.shape[0]  # below the train panels, above the legend
        return int((np.abs(img[h // 2 : int(h * 0.92)] - rgb).max(axis=-1) < 0.02).sum())

    assert lower_half_pixels(without) == 0  # "no data in these runs"
    assert lower_half_pixels(with_final) > 100  # the two stars
