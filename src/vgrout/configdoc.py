"""Render docs/config.md from the config dataclasses, so the reference cannot drift.

The knob list, types, CLI flags and per-preset defaults come from `vgrout.config` at import
time; each knob's meaning is its field docstring (the string literal right after the field),
read from the source with `ast` because Python keeps no runtime record of it. Section
headings are the `# ── name ──` comments in the `Config` class body. Only the introduction
("why these defaults") and notes for knobs that have no docstring yet are written here.

    uv run python scripts/gen_config_docs.py           # rewrite docs/config.md
    uv run python scripts/gen_config_docs.py --check   # exit 1 if docs/config.md is stale
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import config as config_mod
from .atomic import atomic_path
from .config import PRESETS, Config

REGEN_COMMAND = "uv run python scripts/gen_config_docs.py"
_SECTION_RE = re.compile(r"^\s*#\s*─+\s*(.+?)\s*─+\s*$")

# Meanings for knobs whose field has no docstring in config.py. A docstring, once added,
# takes precedence over the entry here (move the text into config.py and delete it here).
FALLBACK_NOTES: dict[str, str] = {}  # every knob documents itself in config.py

INTRO = """\
Every knob of `vgrout.train`, its default in each preset, and what it does. Pass knobs after
the preset name, e.g. `uv run python -m vgrout.train fast --intervention=route2 --seed=42`;
booleans take `--knob` / `--no-knob`. `Config.validate()` range-checks every numeric knob
(`NUMERIC_RANGES` in config.py; NaN and inf are refused) and rejects inconsistent values with a
one-line error naming the flag, before any run folder exists or any model is loaded; and a
`--resume` must repeat the original flags (only `resume`, `device`, `stop_after_steps` and
`report_to` may change).

## Why these defaults

**Shared defaults follow the benchmark's reference recipe**, so that a vanilla run is the
benchmark's own Dr.GRPO run: AdamW with lr 7e-5, betas (0.9, 0.99) and weight decay 0.1;
linear warmup over the first 10% of the steps, then cosine decay to 0; PPO clip ε = 0.2 (with
one inner step the ratio is 1, so the clip never binds; the form is kept); global gradient-norm
clip 10; sampling at T = 0.7 with top-k 20; Dr.GRPO's unbiased loss (advantage r − mean r, no
division by the reward std, a constant token normaliser G·max_new·P instead of per-sequence
length). The interventions default to the gentlest claim-relevant setting: one-sided gate,
overshoot 1 (remove the hack-ward component exactly, never reverse it), erase rescaled to the
original gradient norm, a 5-axis basis from a 12-axis extraction with the bottom quarter of
singular values dropped as noise, and a refresh every 5 steps so the directions track the
moving model.

**smoke** exists to execute every code path on a CPU without network access, not to learn
anything: a random tiny Qwen3 with the real vocabulary, the built-in problems in all seven
modes, a synthetic teacher pool (`just smoke-pool`), β = 1e-3 so the zero-delta KL reference
path runs, and 30 steps so the step-25 checkpoint is written. Its numbers mean nothing.

**fast** is the iteration loop on one GPU (about 15 minutes with Qwen3-4B): 60 steps of 4
prompts × G = 8, max_new 512, with a deliberately aggressive Adam (lr 3e-3, betas (0.5, 0.9))
so that the hack is learnt within the budget, a substrate teacher pool mixed in at 1/8 of each
group to seed the hack, and a pool-derived pairset for the directions. Conclusions drawn at
this lr should be confirmed at full scale.

**full** is paper scale: 43 prompts × G = 6 = 258 generations per step (≈ the benchmark's
16 × 16 = 256; the log prints the ratio), max_new 1024, 200 steps over all 992 training
problems, benchmark lr and betas, and a KL penalty β = 1e-3 against the base model (computed
with the adapter zeroed, no second model).

**organism** is the CPU setting in which a real pretrained model learns to hack
([organism.md](organism.md)): SmolLM2-135M-Instruct warm-started by a cached SFT
(`uv run python -m vgrout.organism` builds it, the data split and the teacher pool), 20 built-in
problems in run_tests mode with template hacks mixed in at a quarter of each group, 7 held-out
problems for the final eval, only the top blocks adapted, each prompt prefilled once per
generate call, and a step count sized so one run fits in minutes on 2 cores. Vanilla by default.

The run folder is `<out_root>/runs/<timestamp>_<preset>_<arm>_seed<seed>[_haar<k>]<out_tag>/`
(see [artifacts.md](artifacts.md)). With a teacher pool each group holds
G_t = round(G · mix_ratio) teacher rows and G_s = G − G_t student rollouts.
"""


@dataclass(frozen=True)
class KnobDoc:
    """One Config field as documented: name, section, CLI flags, type text, meaning."""

    name: str
    section: str
    flags: tuple[str, ...]
    type_text: str
    doc: str
    from_docstring: bool


def _clean(text: str) -> str:
    """Docstring -> one markdown table cell (single line, pipes escaped)."""
    return " ".join(inspect.cleandoc(text).split()).replace("|", "\\|")


def field_docstrings(cls: type = Config) -> dict[str, tuple[str, str]]:
    """{field: (section, docstring or "")} for the fields declared in `cls`'s own body.

    A field docstring is a bare string literal statement right after the annotated
    assignment; the section is the last `# ── name ──` comment above the field.
    """
    src = inspect.getsource(cls)
    lines = src.splitlines()
    body = ast.parse(src).body[0]
    if not isinstance(body, ast.ClassDef):
        raise TypeError(f"{cls.__name__}: source does not start with a class")
    out: dict[str, tuple[str, str]] = {}
    stmts = body.body
    for i, st in enumerate(stmts):
        if not (isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)):
            continue
        section = ""
        for ln in lines[: st.lineno - 1]:
            m = _SECTION_RE.match(ln)
            if m:
                section = m.group(1)
        nxt = stmts[i + 1] if i + 1 < len(stmts) else None
        doc = ""
        if (
            isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            doc = nxt.value.value
        out[st.target.id] = (section, doc)
    return out


def _type_text(tp: Any) -> str:
    """Readable type: Literal choices listed, Optional as `X | None`, Annotated unwrapped."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _type_text(args[0])
    if origin is Literal:
        return "{" + ", ".join(str(a) for a in args) + "}"
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_text(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{_type_text(args[0])}, ...]"
        return "tuple[" + ", ".join(_type_text(a) for a in args) + "]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _flags(name: str, tp: Any) -> tuple[str, ...]:
    """CLI spellings tyro accepts for a field (hyphenated name, --no- for bools, aliases)."""
    flag = "--" + name.replace("_", "-")
    out = [flag, f"--no-{flag[2:]}"] if tp is bool else [flag]
    if typing.get_origin(tp) is typing.Annotated:
        for meta in typing.get_args(tp)[1:]:
            out.extend(getattr(meta, "aliases", None) or ())
    return tuple(out)


def knob_docs() -> list[KnobDoc]:
    """Every Config field in declaration order with its documentation."""
    hints = typing.get_type_hints(Config, include_extras=True, localns=vars(config_mod))
    docs = field_docstrings(Config)
    out = []
    for f in dataclasses.fields(Config):
        section, doc = docs.get(f.name, ("", ""))
        text = _clean(doc) if doc.strip() else FALLBACK_NOTES.get(f.name, "")
        out.append(
            KnobDoc(
                name=f.name,
                section=section or "other",
                flags=_flags(f.name, hints[f.name]),
                type_text=_type_text(hints[f.name]),
                doc=text,
                from_docstring=bool(doc.strip()),
            )
        )
    return out


def format_value(v: Any) -> str:
    """A default as it would be typed on the command line (inside backticks)."""
    if isinstance(v, Path):
        s = str(v)
    elif isinstance(v, tuple):
        s = ",".join(str(x) for x in v) if v else "()"
    elif isinstance(v, float):
        s = repr(v)
    else:
        s = str(v)
    return f"`{s}`"


def preset_defaults() -> dict[str, dict[str, Any]]:
    """{preset: {field: default}} from instantiating each preset class with no arguments."""
    out = {}
    for name, cls in PRESETS.items():
        inst = cls()
        out[name] = {f.name: getattr(inst, f.name) for f in dataclasses.fields(inst)}
    return out


def render() -> str:
    """The full text of docs/config.md."""
    base = {f.name: getattr(Config(), f.name) for f in dataclasses.fields(Config)}
    per = preset_defaults()
    presets = list(PRESETS)
    parts = [
        "# Config reference\n",
        f"<!-- GENERATED by `{REGEN_COMMAND}` from src/vgrout/config.py "
        "(field docstrings + preset classes). Do not edit by hand: change config.py or "
        "src/vgrout/configdoc.py and regenerate. -->\n",
        INTRO,
        "## Presets\n",
        "| preset | command | what it is for |",
        "|---|---|---|",
    ]
    for name, cls in PRESETS.items():
        doc = _clean(cls.__doc__ or "")
        parts.append(f"| {name} | `uv run python -m vgrout.train {name}` | {doc} |")
    parts.append("")
    parts.append(
        "## Knobs\n\nDefaults per preset; **bold** marks a value the preset overrides "
        "(every other value is the shared default of `Config`).\n"
    )
    section = None
    for k in knob_docs():
        if k.section != section:
            section = k.section
            parts.append(f"\n### {section}\n")
            parts.append("| knob | flag | type | " + " | ".join(presets) + " | meaning |")
            parts.append("|---|---|---|" + "---|" * len(presets) + "---|")
        cells = []
        for p in presets:
            v = per[p][k.name]
            cell = format_value(v)
            cells.append(f"**{cell}**" if v != base[k.name] else cell)
        flags = " / ".join(f"`{f}`" for f in k.flags)
        parts.append(
            f"| `{k.name}` | {flags} | {k.type_text} | " + " | ".join(cells) + f" | {k.doc} |"
        )
    parts.append("")
    return "\n".join(parts)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temp file in the same folder and os.replace."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
