"""The docs folder: config.md is generated and current; the hand-written docs name real things.

The config reference is regenerated from `vgrout.config` and compared byte for byte with the
committed docs/config.md. The other pages are checked for the facts most likely to drift:
every hint text, every per-step row key, every rollout field, every mode.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vgrout import configdoc
from vgrout.config import PRESETS, Config, SmokeConfig
from vgrout.env.modes import ENV_MODES, HINTS
from vgrout.env.rewards import COMPILE_REWARD, PASS_REWARD

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
SCRIPT = REPO / "scripts" / "gen_config_docs.py"


def _read(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


# ── the generated config reference ──────────────────────────────────────────────────────


def test_config_md_is_up_to_date():
    have = _read("config.md")
    want = configdoc.render()
    assert have == want, (
        "docs/config.md is out of date with src/vgrout/config.py; "
        f"run `{configdoc.REGEN_COMMAND}` and commit the result"
    )


def test_every_knob_documented_with_every_preset_default():
    text = _read("config.md")
    docs = {k.name: k for k in configdoc.knob_docs()}
    fields = [f.name for f in dataclasses.fields(Config)]
    assert list(docs) == fields
    for name in fields:
        assert docs[name].doc, f"knob {name!r} has neither a docstring nor a fallback note"
        rows = [ln for ln in text.splitlines() if ln.startswith(f"| `{name}` |")]
        assert len(rows) == 1, f"knob {name!r} should have exactly one table row"
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", rows[0])[1:-1]]
        # knob, flag, type, one cell per preset, meaning
        assert len(cells) == 3 + len(PRESETS) + 1
        for i, (preset, cls) in enumerate(PRESETS.items()):
            value = configdoc.format_value(getattr(cls(), name))
            assert cells[3 + i].strip("*") == value, (name, preset, cells[3 + i])


def test_fallback_notes_name_real_fields():
    fields = {f.name for f in dataclasses.fields(Config)}
    stale = set(configdoc.FALLBACK_NOTES) - fields
    assert not stale, f"FALLBACK_NOTES mention knobs that no longer exist: {sorted(stale)}"


def test_field_docstrings_parsed_from_source():
    docs = configdoc.field_docstrings(Config)
    section, doc = docs["group"]
    assert section == "scale knobs (every preset sets these)"
    assert doc.startswith("G: rollouts per prompt")
    # each field gets its own docstring (not the next field's), and every knob has one
    assert docs["steps"][1].startswith("Optimizer steps") and docs["n_problems"][1].startswith("Training problems")
    assert all(doc for _, doc in docs.values()), [k for k, (_, d) in docs.items() if not d]
    assert docs["random_v_seed"][0] == "interventions"


def test_overrides_are_bold_and_shared_defaults_are_not():
    text = _read("config.md")
    row = next(ln for ln in text.splitlines() if ln.startswith("| `model` |"))
    assert f"**`{SmokeConfig().model}`**" in row
    assert "**`Qwen/Qwen3-4B`**" not in row  # fast/full keep the shared default
    row = next(ln for ln in text.splitlines() if ln.startswith("| `random_v_seed` |"))
    assert "`--route2-random-v-seed`" in row  # tyro alias from the Annotated metadata
    row = next(ln for ln in text.splitlines() if ln.startswith("| `unbiased` |"))
    assert "`--no-unbiased`" in row and "1/\\|o\\|" in row  # pipes escaped inside the cell


def test_generator_script_check_mode(tmp_path):
    out = tmp_path / "config.md"
    run = [sys.executable, str(SCRIPT), "--out", str(out)]
    stale = subprocess.run([*run, "--check"], capture_output=True, text=True, cwd=REPO)
    assert stale.returncode == 1 and "gen_config_docs.py" in stale.stderr
    subprocess.run(run, check=True, capture_output=True, cwd=REPO)
    assert out.read_text(encoding="utf-8") == configdoc.render()
    ok = subprocess.run([*run, "--check"], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert not list(tmp_path.glob(".tmp_*")), "atomic write left a temp file"


# ── the hand-written pages ──────────────────────────────────────────────────────────────


@pytest.mark.parametrize("name", ["method.md", "environment.md", "config.md", "artifacts.md"])
def test_pages_exist_and_links_resolve(name):
    text = _read(name)
    assert text.startswith("# ")
    for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", text):
        assert (DOCS / target).is_file(), f"{name} links to missing {target}"


def test_environment_quotes_every_hint_and_reward_constant():
    text = _read("environment.md")
    for mode in ENV_MODES:
        assert f"`{mode}`" in text, f"mode {mode} not documented"
        assert HINTS[mode] in text, f"hint of {mode} not quoted verbatim"
    assert f"{COMPILE_REWARD}" in text and f"{PASS_REWARD}" in text


def test_artifacts_lists_every_row_key_and_rollout_field():
    """Every key of a real per-step row (the golden rows, which the loop reproduces: see
    test_golden_rows.py) and every rollout record field is in artifacts.md."""
    import inspect

    from _golden import GOLDEN_FILE, RETIRED, TIMING
    from vgrout import rollout

    text = _read("artifacts.md")
    golden = json.loads(GOLDEN_FILE.read_text())
    keys = {k for cfg in golden.values() for r in cfg["rows"] for k in r} - RETIRED | TIMING
    assert {"step", "hack_s", "sec", "hk_rt"} <= keys
    keys = {k for k in keys if not k.startswith("hk_")} | {"hk_<code>"}
    missing = sorted(k for k in keys if f"`{k}`" not in text)
    assert not missing, f"row keys written by the loop but not documented: {missing}"
    retired = sorted(k for k in RETIRED if f"| `{k}`" in text)  # no table row of its own (a label may be named)
    assert not retired, f"artifacts.md still documents row keys the loop no longer writes: {retired}"
    rsrc = inspect.getsource(rollout.rollout_records)
    fields = set(re.findall(r'"([a-z_A-Z0-9]+)":', rsrc))
    missing = sorted(k for k in fields if f"`{k}`" not in text)
    assert not missing, f"rollouts.jsonl fields not documented: {missing}"
    diag_keys = ["cos_pre", "cos_pre_s", "cos_pre_t", "cos_post", "fired", "q_egy", "tau",
                 "hkgap", "resid", "flag", "prec", "rec", "f05"]
    assert all(f"`{k}`" in text for k in diag_keys)
