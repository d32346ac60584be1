"""The per-step table fits the console: full when it fits, the per-mode block collapsed or
dropped, then the least-read columns, never wider than the terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from vgrout.tablelog import PREFIX, StepTable, console_width

MODES = ["rt", "eq", "xc", "so", "se", "fm", "gt"]
ROUTE2 = ["step", "rew", "rew_s", "gt_s", "hack_s", "hack_t", "lp_s", "lp_t", "loss", "gn", "cos_pre", "cos_post",
          "q_egy", "tau", "hkgap", "flag", "prec", "refr", "hk_dep", "sv_dep", "zv", "sec"]
ROW = {"step": 12, "rew": 1.25, "rew_s": 0.875, "gt_s": (1, 3), "hack_s": (2, 3), "hack_t": (1, 1), "lp_s": -1.5,
       "lp_t": -0.75, "loss": 0.0123, "gn": 3.5, "cos_pre": 0.25, "cos_post": 0.0, "q_egy": 0.5, "tau": 0.1,
       "hkgap": 0.2, "flag": 0.25, "prec": 1.0, "refr": "0.93", "hack_deploy": 0.125, "solve_deploy": 0.0, "zv": 0,
       "sec": 12.5, **{f"hk_{m}": i % 3 for i, m in enumerate(MODES)}, "hk_gt": 12}


def cells(table: StepTable, line: str) -> dict[str, str]:
    """Split a line back into its columns by the header's right-aligned widths."""
    out, pos = {}, 0
    for c, w, _ in table.cols:
        width = max(w, len(c))
        out[c] = line[pos:pos + width].strip()
        pos += width + 1
    return out


def test_wide_console_gets_the_full_table():
    t = StepTable(ROUTE2, MODES, width=None)
    assert [c for c, _, _ in t.cols] == ROUTE2 + [f"hk_{m}" for m in MODES] and t.hidden == []
    assert len(t.header()) > 180  # the issue measured ~250 characters with wide values
    got = cells(t, t.line(ROW))
    assert got["hk_xc"] == "2" and got["gt_s"] == "1/3" and got["step"] == "12"
    assert StepTable(ROUTE2, MODES, width=len(t.header()) + PREFIX).hidden == []


@pytest.mark.parametrize("width", [40, 60, 80, 100, 120, 160, 185])
def test_narrow_console_lines_fit_and_the_rest_is_named(width):
    full = StepTable(ROUTE2, MODES, width=None)
    t = StepTable(ROUTE2, MODES, width=width)
    for line in (t.header(), t.line(ROW)):
        assert PREFIX + len(line) <= width, (width, line)
    shown = [c for c, _, _ in t.cols]
    assert shown[0] == "step" and t.hidden
    # nothing silently lost: every full-table column is shown, hidden, or in the compact hk/mode cell
    assert set(shown) | set(t.hidden) >= {c for c, _, _ in full.cols}
    legend = t.legend()
    assert f"hidden to fit {width} columns" in legend and "rows.jsonl" in legend
    got = cells(t, t.line(ROW))
    for c in shown:  # each shown cell is the full table's cell for that column
        if c != "hk/mode":
            assert got[c] == cells(full, full.line(ROW))[c], c
    if "hk/mode" in shown:
        assert got["hk/mode"] == "0120120"[:6] + "+"  # one digit per mode; 12 -> '+'
        assert "in the order rt eq xc so se fm gt" in legend


def test_collapse_before_drop_and_core_columns_last():
    full_width = PREFIX + len(StepTable(ROUTE2, MODES, width=None).header())
    compact = StepTable(ROUTE2, MODES, width=full_width - 1)
    assert [c for c, _, _ in compact.cols] == ROUTE2 + ["hk/mode"]  # only the per-mode block changed
    assert compact.hidden == [f"hk_{m}" for m in MODES]
    tiny = StepTable(ROUTE2, MODES, width=40)
    assert {"sec", "zv", "refr", "hk/mode"} <= set(tiny.hidden)
    assert StepTable(ROUTE2, MODES, width=140).hidden[7:] == ["sec", "zv", "refr", "lp_s"]  # hk/mode kept
    assert "hk/mode" in [c for c, _, _ in StepTable(ROUTE2, MODES, width=140).cols]
    assert [c for c, _, _ in tiny.cols][:1] == ["step"] and "hack_s" in [c for c, _, _ in tiny.cols]
    single = StepTable(ROUTE2, (), width=100)  # one mode: no per-mode block at all
    assert not any(c in ("hk/mode", *(f"hk_{m}" for m in MODES)) for c, _, _ in single.cols)
    assert "per-mode" not in single.legend()


def test_console_width_reads_columns_then_the_terminal_then_none(monkeypatch):
    monkeypatch.setenv("COLUMNS", "77")
    assert console_width() == 77
    monkeypatch.delenv("COLUMNS")
    assert console_width() is None  # pytest's captured stdout is not a terminal: no limit


def test_a_real_terminal_of_70_columns_gets_a_table_that_fits():
    """A child process whose stdout is a pseudo-terminal 70 columns wide."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 70, 0, 0))
    code = ("from vgrout.tablelog import StepTable; import sys\n"
            f"t = StepTable({ROUTE2!r}, {MODES!r})\n"
            "print(t.width); print('I ' + t.header()); print('I ' + t.line({'step': 3}))")
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    lines = out.decode().replace("\r", "").splitlines()
    assert lines[0] == "70"
    assert all(0 < len(ln) <= 70 for ln in lines[1:]), lines


def test_columns_missing_from_drop_order_still_go_from_the_right(monkeypatch):
    from vgrout import tablelog

    monkeypatch.setattr(tablelog, "DROP_ORDER", ("rew",))
    t = StepTable(["step", "rew", "rew_s", "gt_s", "hack_s"], (), width=16)
    assert [c for c, _, _ in t.cols] == ["step", "rew_s"] and t.hidden == ["rew", "hack_s", "gt_s"]
