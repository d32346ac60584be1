"""--report-to: a real tiny training run per tracker, read back from what the tracker wrote.

wandb runs in offline mode (no network) and is read back from its offline run file
(`run-<id>.wandb`, a LevelDB-style log of protobuf records) and the media files beside it;
tensorboard is read back from its event file with tensorboard's own EventAccumulator.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
from pathlib import Path

import pytest

from vgrout.config import parse_cli
from vgrout.pairs import builtin_pairs, save_pairs_json
from vgrout.smoke_pool import build_smoke_pool
from vgrout.tracking import Tracker, make_tracker, per_mode_tables, row_scalars
from vgrout.train import main


def need(pkg: str) -> None:
    """Skip without the tracker package, except in CI, where a skip would hide an untested tracker."""
    if importlib.util.find_spec(pkg) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{pkg} is not installed in CI (it is in the dev group: `uv sync --frozen`)")
        pytest.skip(f"{pkg} not installed (uv sync --extra {pkg})")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("track_inputs")
    bp = builtin_pairs()
    return build_smoke_pool(root / "pool"), save_pairs_json(root / "pairs.json", [bp[0], bp[5], bp[10], bp[15]])


def run_tiny(inputs, out: Path, *extra: str) -> Path:
    pool, pairs = inputs
    args = ["smoke", f"--teacher-pool-dir={pool}", f"--vhack-pairs-path={pairs}", f"--out-root={out}",
            "--steps=3", "--max-new=8", "--eval-n-prompts=2", "--eval-ablate-every=2", "--vhack-refresh-every=2",
            "--v-hack-extract-top-k=2", "--v-hack-k=1", "--v-hack-n-heldout=1", "--ckpt-every=10", *extra]
    assert main(parse_cli(args)) == 0
    (run,) = (out / "runs").iterdir()
    return run


def jsonl(p: Path) -> list[dict]:
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


def expected_rows(run: Path) -> dict[int, dict[str, float]]:
    """What the tracker must have logged per step, derived from rows.jsonl (the full row)."""
    return {r["step"]: row_scalars(r) for r in jsonl(run / "rows.jsonl")}


# ── wandb's offline run file ────────────────────────────────────────────────────────────────


def wandb_records(path: Path):
    """Protobuf records of a wandb transaction log: a 7-byte ':W&B' header, then LevelDB log
    records (4-byte crc, 2-byte length, 1-byte type: full / first / middle / last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 2):
            buf = chunk
        else:
            buf += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def read_wandb_offline(run: Path) -> dict:
    (offline,) = (run / "wandb").glob("offline-run-*")
    (log,) = offline.glob("run-*.wandb")
    out: dict = {"dir": offline, "history": [], "summary": {}, "config": {}, "exit": None, "run": None}
    for rec in wandb_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = rec.run
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in rec.summary.update})
        elif kind == "exit":
            out["exit"] = rec.exit.exit_code
    return out


@pytest.mark.slow
def test_wandb_offline_run_holds_rows_config_final_tables_and_plots(inputs, tmp_path, monkeypatch):
    need("wandb")
    for var, val in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONFIG_DIR", tmp_path / "cfg"),
                     ("WANDB_CACHE_DIR", tmp_path / "cache"), ("WANDB_DATA_DIR", tmp_path / "data")):
        monkeypatch.setenv(var, str(val))
    run = run_tiny(inputs, tmp_path / "out", "--intervention=route2", "--report-to=wandb")
    wb = read_wandb_offline(run)
    saved = json.loads((run / "config.json").read_text())
    assert wb["run"].run_id == run.name and wb["run"].project == "vgrout" and wb["exit"] == 0
    assert saved["provenance"]["model_weights"] and wb["config"]["provenance"] == saved["provenance"]
    assert {k: v for k, v in wb["config"].items() if k not in ("provenance", "_wandb")} == saved["config"]

    # every step's row, key for key, with the step as its x-axis
    per_step = {}
    for h in wb["history"]:
        if "rew" in h:
            per_step[h["step"]] = h
    want = expected_rows(run)
    assert sorted(per_step) == [0, 1, 2]
    for step, exp in want.items():
        got = {k: v for k, v in per_step[step].items() if not k.startswith("_")}
        assert set(got) == set(exp), set(got) ^ set(exp)
        for k, v in exp.items():
            assert math.isclose(got[k], v, rel_tol=1e-6, abs_tol=1e-9), (step, k, got[k], v)
    assert "hack_s" in want[0] and "hack_deploy" in want[0] and "hack_deploy" not in want[1]

    # the final record: scalars in the summary, the per-mode table as a wandb table file
    rec = json.loads((run / "per_mode_deploy.json").read_text())
    assert wb["summary"]["final/hack_deploy"] == pytest.approx(rec["hack_deploy"])
    assert wb["summary"]["final/delta_s_hack_norm"] == pytest.approx(rec["delta_s_hack_norm"])
    final = next(h for h in wb["history"] if "final/per_mode_train/_type" in h)
    assert final["final/per_mode_train/_type"] == "table-file"
    table = json.loads((wb["dir"] / "files" / final["final/per_mode_train/path"]).read_text())
    rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    assert rows == json.loads(json.dumps(per_mode_tables(rec)["final/per_mode_train"]))
    assert {r["mode"] for r in rows} == set(rec["by_mode"]) and len(rows) > 1

    # the run's own plots, as images (route2: the gate figure too)
    images = next(h for h in wb["history"] if "plots/dynamics/_type" in h)
    for name in ("dynamics", "gate", "per_mode"):
        assert images[f"plots/{name}/_type"] == "image-file"
        png = wb["dir"] / "files" / images[f"plots/{name}/path"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (run / "plots" / f"{name}.png").is_file()


@pytest.mark.slow
def test_tensorboard_event_file_holds_rows_config_final_tables_and_plots(inputs, tmp_path):
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = run_tiny(inputs, tmp_path / "out", "--intervention=none", "--report-to=tensorboard")
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    ea.Reload()
    tags = ea.Tags()
    want = expected_rows(run)
    row_keys = set().union(*want.values()) - {"step"}
    assert row_keys <= set(tags["scalars"]), row_keys - set(tags["scalars"])
    for k in row_keys:
        got = {e.step: e.value for e in ea.Scalars(k)}
        exp = {s: r[k] for s, r in want.items() if k in r}
        assert set(got) == set(exp), k
        for s, v in exp.items():
            assert math.isclose(got[s], v, rel_tol=1e-5, abs_tol=1e-6), (k, s, got[s], v)

    def text(tag: str) -> str:
        return ea.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode()

    saved = json.loads((run / "config.json").read_text())
    assert json.loads(text("config").strip("`").removeprefix("json")) == saved["config"]
    assert json.loads(text("provenance").strip("`").removeprefix("json"))["git_commit"] == \
        saved["provenance"]["git_commit"]
    rec = json.loads((run / "per_mode_deploy.json").read_text())
    table = text("final/per_mode_train")
    assert all(f"| {m} " in table for m in rec["by_mode"]) and "deploy_hack" in table
    assert ea.Scalars("final/hack_deploy")[0].value == pytest.approx(rec["hack_deploy"])
    assert set(tags["images"]) == {"plots/dynamics", "plots/per_mode"}  # vanilla: no gate figure
    img = ea.Images("plots/dynamics")[0]
    assert img.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and img.width > 500


def test_row_scalars_and_per_mode_tables():
    row = {"step": 3, "rew": 0.5, "hack_s": (1, 4), "gt_t": [0, 0], "split": True, "refr": "0.93",
           "refr2": "-", "lp_t": float("nan"), "hack_deploy": None, "name": "x"}
    assert row_scalars(row) == {"step": 3.0, "rew": 0.5, "hack_s": 0.25, "split": 1.0, "refr": 0.93}
    rec = {"eval_set": "train", "sets": {"train": {"by_mode": {"sentinel": {
        "in_dist": True, "train_hack": 0.5, "train_solve": 0.0, "deploy_hack": 0.25, "deploy_solve": 0.0, "n": 8}}}}}
    assert per_mode_tables(rec) == {"final/per_mode_train": [{
        "mode": "sentinel", "in_dist": True, "train_hack": 0.5, "train_solve": 0.0, "deploy_hack": 0.25,
        "deploy_solve": 0.0, "n": 8}]}


def test_report_to_none_is_a_no_op(tmp_path):
    cfg = parse_cli(["smoke"])
    t = make_tracker(cfg, tmp_path)
    assert type(t) is Tracker and not t.active
    with t:
        t.start(cfg.to_dict(), {})
        t.log_row(0, {"step": 0, "rew": 1.0})
        t.log_final({"hack_deploy": 0.0})
        t.log_plots(tmp_path)  # not a run folder: nothing is drawn, nothing raised
    assert list(tmp_path.iterdir()) == []
