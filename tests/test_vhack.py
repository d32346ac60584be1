"""Hack directions: planted-direction recovery, postprocessing, save/load, Haar controls,
refresh, and one end-to-end extraction on the offline tiny Qwen3."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from vgrout import vhack
from vgrout.pairs import builtin_pairs


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _planted(r: int, n: int, seed: int, amp: float = 3.0, noise: float = 0.1):
    """Per-pair grads whose hack-minus-clean differences share the unit direction u."""
    g = _gen(seed)
    u = torch.randn(r, generator=g, dtype=torch.float64)
    u /= u.norm()
    clean = torch.randn(n, r, generator=g, dtype=torch.float64)
    a = amp * (1 + 0.2 * torch.rand(n, generator=g, dtype=torch.float64))
    hack = clean + a[:, None] * u + noise * torch.randn(n, r, generator=g, dtype=torch.float64)
    return hack.float(), clean.float(), u.float()


def _grads(mods: dict[str, int], n: int, seed: int):
    grads, planted = {}, {}
    for i, (m, r) in enumerate(mods.items()):
        h, c, u = _planted(r, n, 1000 + seed + i)
        grads[f"hack/{m}"], grads[f"clean/{m}"], planted[m] = h, c, u
    return grads, planted


MODS = {"layers.0.q": 256, "layers.0.o": 300, "layers.1.up": 320}


def _orthonormal(V: torch.Tensor, tol: float = 1e-5) -> bool:
    eye = torch.eye(V.shape[0])
    return bool(torch.allclose(V @ V.T, eye, atol=tol))


def test_planted_direction_recovered_and_haar_is_not():
    grads, u = _grads(MODS, 24, 0)
    vg = vhack.v_grad_from(grads)
    V, S = vhack.v_hack_from(grads, top_k=4)
    haar_g = vhack.haar_v_grad(MODS, seed=1)
    haar_h = vhack.haar_v_hack(MODS, k=4, seed=1)
    for m in MODS:
        assert float(vg[m] @ u[m]) > 0.9, m  # signed hack-ward
        assert float(V[m][0] @ u[m]) > 0.9, m
        assert V[m].shape == (4, MODS[m]) and S[m].shape == (4,)
        assert _orthonormal(V[m])
        assert bool((S[m][:-1] >= S[m][1:]).all())
        assert abs(float(haar_g[m] @ u[m])) < 0.2, m
        assert abs(float(haar_h[m][0] @ u[m])) < 0.2, m
    # flipping which side is "hack" flips every sign
    flipped = {("clean/" + k[5:] if k.startswith("hack/") else "hack/" + k[6:]): v
               for k, v in grads.items()}
    vg2 = vhack.v_grad_from(flipped)
    V2, _ = vhack.v_hack_from(flipped, top_k=1)
    for m in MODS:
        assert float(vg2[m] @ u[m]) < -0.9 and float(V2[m][0] @ u[m]) < -0.9


def test_every_axis_signed_hackward():
    grads, _ = _grads({"m": 64}, 10, 5)
    D = grads["hack/m"] - grads["clean/m"]
    V, _ = vhack.v_hack_from(grads, top_k=8, sign="mean")
    assert bool(((V["m"] @ D.mean(0)) >= 0).all())
    Vv, _ = vhack.v_hack_from(grads, top_k=8)  # the default: each axis signed by the pairs' majority vote
    proj = D @ Vv["m"].T  # [pairs, axes]
    assert bool(((proj > 0).sum(0) >= (proj < 0).sum(0)).all())
    assert V["m"].shape == (8, 64) and _orthonormal(V["m"])
    assert torch.equal(Vv["m"].abs(), V["m"].abs())  # same axes, only the signs may differ
    # top_k beyond the number of pairs is capped at n
    V3, _ = vhack.v_hack_from({"hack/m": grads["hack/m"][:3], "clean/m": grads["clean/m"][:3]},
                              top_k=8)
    assert V3["m"].shape[0] == 3


def _known_spectrum(s: list[float], r: int = 12) -> dict[str, torch.Tensor]:
    """hack - clean = A diag(s) B with orthonormal A [n, k], B [k, r]."""
    k = len(s)
    A, _ = torch.linalg.qr(torch.randn(k + 2, k, generator=_gen(3), dtype=torch.float64))
    B, _ = torch.linalg.qr(torch.randn(r, k, generator=_gen(4), dtype=torch.float64))
    D = A @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ B.T
    return {"hack/m": D.float(), "clean/m": torch.zeros_like(D).float()}


def test_tau_axis_drops_weak_axes():
    grads = _known_spectrum([10.0, 5.0, 2.5, 1.0])
    _, S = vhack.v_hack_from(grads, top_k=4, tau_axis=0.0)
    torch.testing.assert_close(S["m"], torch.tensor([10.0, 5.0, 2.5, 1.0]))
    V, S = vhack.v_hack_from(grads, top_k=4, tau_axis=0.2)
    torch.testing.assert_close(S["m"], torch.tensor([10.0, 5.0, 2.5]))
    assert V["m"].shape == (3, 12)
    with pytest.raises(ValueError, match="tau_axis"):
        vhack.v_hack_from(grads, top_k=2, tau_axis=1.5)


def test_postprocess_k_use_and_global_quantile():
    V = {"a": torch.eye(3, 5), "b": torch.eye(2, 4), "c": torch.eye(3, 6)}
    S = {"a": torch.tensor([10.0, 5.0, 1.0]), "b": torch.tensor([0.5, 0.4]),
         "c": torch.tensor([6.0, 0.3, 0.2])}
    out, dropped = vhack.postprocess(V, S, k_use=2, drop_bottom_frac=0.0)
    assert dropped == [] and {m: v.shape[0] for m, v in out.items()} == {"a": 2, "b": 2, "c": 2}
    # k_use=2 leaves [10, 5, .5, .4, 6, .3]; the 0.5 quantile is 2.75
    out, dropped = vhack.postprocess(V, S, k_use=2, drop_bottom_frac=0.5)
    assert dropped == ["b"]
    torch.testing.assert_close(out["a"], torch.eye(3, 5)[:2])
    torch.testing.assert_close(out["c"], torch.eye(3, 6)[:1])
    with pytest.raises(ValueError, match="k_use"):
        vhack.postprocess(V, S, k_use=0, drop_bottom_frac=0.0)
    with pytest.raises(ValueError, match="drop_bottom_frac"):
        vhack.postprocess(V, S, k_use=1, drop_bottom_frac=1.0)


def test_heldout_pairs_project_hackward():
    grads, _ = _grads(MODS, 12, 7)
    d = vhack.directions_from_grads(grads, top_k=3, tau_axis=0.0, n_heldout=2)
    h = d.heldout
    assert h["n_heldout"] == 2 and h["names"] == ["pair10", "pair11"]
    assert h["n_pairs_top_axis_hackward"] == 2 and h["n_pairs_v_grad_hackward"] == 2
    assert h["mean_frac_v_grad_pos"] == 1.0
    # pure-noise pairs do not project consistently
    g = _gen(9)
    noise = {f"hack/{m}": torch.randn(12, r, generator=g) for m, r in MODS.items()}
    noise.update({f"clean/{m}": torch.zeros(12, r) for m, r in MODS.items()})
    with pytest.raises(ValueError, match="need at least 2"):
        vhack.directions_from_grads(noise, top_k=3, tau_axis=0.0, n_heldout=11)


def test_haar_controls_reproducible():
    a = vhack.haar_v_hack(MODS, k=3, seed=11)
    b = vhack.haar_v_hack(dict(reversed(list(MODS.items()))), k=3, seed=11)
    c = vhack.haar_v_hack(MODS, k=3, seed=12)
    for m, r in MODS.items():
        assert torch.equal(a[m], b[m])  # insertion order does not matter
        assert not torch.equal(a[m], c[m])
        assert a[m].shape == (3, r) and _orthonormal(a[m])
    g1, g2 = vhack.haar_v_grad(MODS, 4), vhack.haar_v_grad(MODS, 4)
    for m in MODS:
        assert torch.equal(g1[m], g2[m])
        assert float(g1[m].norm()) == pytest.approx(1.0, abs=1e-6)


def test_basis_overlap():
    old = {"m": torch.eye(2, 6), "n": torch.eye(1, 4)}
    assert vhack.basis_overlap(old, old) == pytest.approx(1.0)
    orth = {"m": torch.eye(6)[2:4], "n": torch.eye(4)[1:2]}
    assert vhack.basis_overlap(old, orth) == pytest.approx(0.0)
    half = {"m": torch.eye(6)[[0, 3]], "n": torch.eye(4)[:1]}
    assert vhack.basis_overlap(old, half) == pytest.approx((0.5 + 1.0) / 2)
    rot = {"m": torch.tensor([[0.6, 0.8, 0, 0, 0, 0], [-0.8, 0.6, 0, 0, 0, 0]])}
    assert vhack.basis_overlap(old, rot) == pytest.approx(1.0)  # same subspace, new basis
    assert vhack.basis_overlap({"v": torch.tensor([1.0, 0.0])},
                               {"v": torch.tensor([0.6, 0.8])}) == pytest.approx(0.36)


def _dirs(seed: int = 0) -> vhack.Directions:
    grads, _ = _grads(MODS, 8, seed)
    return vhack.directions_from_grads(grads, top_k=4, tau_axis=0.0, n_heldout=2)


def test_save_load_round_trip_and_mismatches(tmp_path):
    d = _dirs()
    p = vhack.save_directions(tmp_path / "v.safetensors", d, model_id="tiny-qwen3",
                              pairs_source="builtin", knobs_meta={"top_k": 4, "tau_axis": 0.0})
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".tmp")]
    got = vhack.load_directions(p, model_id="tiny-qwen3", k_use=4, drop_bottom_frac=0.0,
                                knobs=MODS)
    for m in MODS:
        assert torch.equal(got.v_hack[m], d.v_hack[m])
        assert torch.equal(got.sv[m], d.sv[m])
        assert torch.equal(got.v_grad[m], d.v_grad[m])
    assert got.meta["model"] == "tiny-qwen3" and got.meta["schema"] == vhack.SCHEMA
    assert got.meta["pairs_source"] == "builtin" and got.meta["top_k"] == "4"
    assert json.loads(got.meta["ranks"]) == MODS and got.meta["dtype"] == "float32"
    saved_report = json.loads(json.dumps(d.heldout))
    assert {k: v for k, v in got.heldout.items() if k != "kept_axes"} == saved_report
    # the load adds the held-out check over the axes it kept (all 4 per module here)
    assert got.heldout["kept_axes"] == vhack.heldout_on_kept_axes(saved_report, {m: [0, 1, 2, 3] for m in MODS})
    sliced = vhack.load_directions(p, model_id="tiny-qwen3", k_use=2, drop_bottom_frac=0.0,
                                   knobs=MODS)
    assert all(v.shape[0] == 2 for v in sliced.v_hack.values())

    with pytest.raises(vhack.DirectionsError, match="made for model 'tiny-qwen3', not 'Qwen/Qwen3-4B'"):
        vhack.load_directions(p, model_id="Qwen/Qwen3-4B", k_use=2, drop_bottom_frac=0,
                              knobs=MODS)
    with pytest.raises(vhack.DirectionsError, match="do not fit rank 257"):
        vhack.load_directions(p, model_id="tiny-qwen3", k_use=2, drop_bottom_frac=0,
                              knobs={**MODS, "layers.0.q": 257})
    with pytest.raises(vhack.DirectionsError, match="missing"):
        vhack.load_directions(p, model_id="tiny-qwen3", k_use=2, drop_bottom_frac=0,
                              knobs={**MODS, "layers.9.q": 8})
    with pytest.raises(FileNotFoundError):
        vhack.load_directions(tmp_path / "nope.safetensors", model_id="x", k_use=1,
                              drop_bottom_frac=0, knobs=MODS)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign), metadata={"schema": "other"})
    with pytest.raises(vhack.DirectionsError, match="schema"):
        vhack.load_directions(foreign, model_id="x", k_use=1, drop_bottom_frac=0, knobs=MODS)


def test_cache_path_keys():
    ps = builtin_pairs()
    base = vhack.directions_cache_path("out/vhack", "Qwen/Qwen3-4B", ps, 12, 0.0)
    assert base.parent.as_posix() == "out/vhack" and "Qwen--Qwen3-4B" in base.name
    assert base == vhack.directions_cache_path("out/vhack", "Qwen/Qwen3-4B", list(ps), 12, 0.0)
    others = [
        vhack.directions_cache_path("out/vhack", "tiny-qwen3", ps, 12, 0.0),
        vhack.directions_cache_path("out/vhack", "Qwen/Qwen3-4B", ps[:-1], 12, 0.0),
        vhack.directions_cache_path("out/vhack", "Qwen/Qwen3-4B", ps, 8, 0.0),
        vhack.directions_cache_path("out/vhack", "Qwen/Qwen3-4B", ps, 12, 0.1),
        vhack.directions_cache_path("out/vhack", "Qwen/Qwen3-4B", ps, 12, 0.0, n_heldout=3),
    ]
    assert len({base, *others}) == 6
    # only the top blocks adapted (--adapt-top-layers): the adapted span is part of the key
    every = [f"model.layers.{i}.mlp.up_proj" for i in range(4)]
    top = vhack.directions_cache_path("out/vhack", "Qwen/Qwen3-4B", ps, 12, 0.0, modules=every[2:])
    assert "_h2_L2-3_" in top.name and top != base
    assert vhack.directions_cache_path("out/vhack", "Qwen/Qwen3-4B", ps, 12, 0.0, modules=every) == base


def test_haar_control_round_trip_and_refresh_refuses(tmp_path):
    d = vhack.haar_directions(MODS, k=3, seed=5)
    p = vhack.save_directions(tmp_path / "haar.safetensors", d, model_id="m",
                              pairs_source="haar", knobs_meta={})
    got = vhack.load_directions(p, model_id="m", k_use=3, drop_bottom_frac=0.0, knobs=MODS)
    assert got.is_control and got.meta["seed"] == "5"
    # the model is never touched: None would fail if refresh tried to extract
    res = vhack.refresh(None, None, {}, [], got, top_k=3)
    assert not res.refreshed and res.directions is got and "Haar" in res.reason
    res2 = vhack.refresh(None, None, {}, [], _dirs(), top_k=3, is_control=True)
    assert not res2.refreshed


# ── end to end on the offline tiny Qwen3 ──────────────────────────────────────────────────
# Marked slow: each pair costs two forward/backward passes through the 151k-token vocabulary
# on CPU (about 30 s of CPU for the module on 2 cores, far more wall time on a busy machine).


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vgrout.adapter import wrap_model
    from vgrout.model import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("tiny-qwen3", "cpu")
    knobs = wrap_model(model, "tiny-qwen3", cache_root=tmp_path_factory.mktemp("svd"))
    return model, tok, knobs


def _e2e_pairs():
    """One built-in pair from each of four modes (kept small: each pair costs two
    forward/backward passes through the 151k-token vocabulary on CPU)."""
    by_mode = {}
    for p in builtin_pairs():
        by_mode.setdefault(p.mode, p)
    return [by_mode[m] for m in ("run_tests", "eq_override", "stdout_marker", "file_marker")]


@pytest.fixture(scope="module")
def tiny_grads(tiny):
    model, tok, knobs = tiny
    model.train()
    grads = vhack.pair_grads(model, tok, knobs, _e2e_pairs(), "cpu")
    assert model.training  # mode restored
    return grads


@pytest.mark.slow
def test_pair_grads_ablate_quarantine_and_leave_no_trace(tiny, tiny_grads):
    model, tok, knobs = tiny
    pairs = _e2e_pairs()
    for m, k in knobs.items():
        assert tiny_grads[f"hack/{m}"].shape == (4, k.rank)
        assert tiny_grads[f"clean/{m}"].shape == (4, k.rank)
        assert k.delta_S.grad is None and k.delta_S_hack.grad is None
    assert all(float(tiny_grads[f"hack/{m}"].norm()) > 0 for m in knobs)
    # a live quarantine is ablated during extraction and restored bit-exactly afterwards
    hack_vals = {m: 0.5 * torch.randn(k.rank, generator=_gen(1)) for m, k in knobs.items()}
    with torch.no_grad():
        for m, k in knobs.items():
            k.delta_S_hack.copy_(hack_vals[m])
    try:
        model.eval()
        g1 = vhack.pair_grads(model, tok, knobs, pairs[:1], "cpu")
        assert not model.training
        for m, k in knobs.items():
            assert torch.equal(k.delta_S_hack.detach(), hack_vals[m])
            assert k.delta_S.grad is None and k.delta_S_hack.grad is None
        for key, g in g1.items():
            torch.testing.assert_close(g, tiny_grads[key][:1], rtol=1e-4, atol=1e-6)
    finally:
        with torch.no_grad():
            for k in knobs.values():
                k.delta_S_hack.zero_()


@pytest.mark.slow
def test_batched_pair_grads_equal_one_pair_at_a_time(tiny, tiny_grads):
    """The batched path (right-padded, per-rollout gradients) equals per-pair backwards."""
    model, tok, knobs = tiny
    seq = vhack.pair_grads(model, tok, knobs, _e2e_pairs(), "cpu", batch_size=1)
    odd = vhack.pair_grads(model, tok, knobs, _e2e_pairs(), "cpu", batch_size=3)  # a ragged last chunk
    for key, g in seq.items():
        scale = float(g.abs().max())
        torch.testing.assert_close(tiny_grads[key], g, rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(odd[key], g, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.slow
def test_end_to_end_extraction_and_cache(tiny, tiny_grads, tmp_path):
    model, tok, knobs = tiny
    pairs = _e2e_pairs()
    kw = dict(model_id="tiny-qwen3", pairs_source="builtin", out_dir=tmp_path, top_k=2,
              tau_axis=0.0, n_heldout=1, k_use=2, drop_bottom_frac=0.25)
    d = vhack.resolve_directions(model, tok, knobs, pairs, **kw)
    cache = vhack.directions_cache_path(tmp_path, "tiny-qwen3", pairs, 2, 0.0, 1)
    assert cache.is_file()
    assert d.meta["model"] == "tiny-qwen3" and d.meta["n_pairs"] == "4"
    assert d.meta["pairs_source"] == "builtin" and d.meta["top_k"] == "2"
    assert d.meta["pairs_hash"] == vhack.pairs_hash(pairs)
    assert d.heldout["n_heldout"] == 1 and d.heldout["names"] == [pairs[-1].name]
    assert set(d.v_hack) | set(d.dropped) == set(knobs) and d.dropped
    for k in knobs.values():
        assert k.delta_S.grad is None and k.delta_S_hack.grad is None
    # same numbers as the pure pipeline on the fixture's gradients; rows signed hack-ward
    ref = vhack.directions_from_grads(tiny_grads, top_k=2, tau_axis=0.0, n_heldout=1)
    ref_v, _ = vhack.postprocess(ref.v_hack, ref.sv, k_use=2, drop_bottom_frac=0.25)
    assert set(ref_v) == set(d.v_hack)
    for m, V in d.v_hack.items():
        assert 1 <= V.shape[0] <= 2 and V.shape[1] == knobs[m].rank
        assert _orthonormal(V)
        D = (tiny_grads[f"hack/{m}"] - tiny_grads[f"clean/{m}"])[:3]
        mean = D.mean(0)
        proj = D @ V.T  # each axis signed by the extraction pairs' majority vote
        assert bool(((proj > 0).sum(0) >= (proj < 0).sum(0)).all()), m
        assert float(d.v_grad[m] @ mean) > 0
        assert vhack.basis_overlap({m: ref_v[m]}, {m: V}) == pytest.approx(1.0, abs=1e-3)
    for v in d.v_grad.values():
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-5)
    # second resolve is a cache hit: it never touches the model
    again = vhack.resolve_directions(None, None, knobs, pairs, **kw)
    for m in d.v_hack:
        assert torch.equal(again.v_hack[m], d.v_hack[m])
    with pytest.raises(FileNotFoundError, match="explicit"):
        vhack.resolve_directions(None, None, knobs, pairs, path=tmp_path / "x.safetensors", **kw)


@pytest.mark.slow
def test_refresh_on_unchanged_model_reproduces_basis(tiny, tiny_grads):
    model, tok, knobs = tiny
    old = vhack.directions_from_grads(tiny_grads, top_k=2, tau_axis=0.0, n_heldout=1)
    old.v_hack, _ = vhack.postprocess(old.v_hack, old.sv, k_use=2, drop_bottom_frac=0.25)
    res = vhack.refresh(model, tok, knobs, _e2e_pairs(), old, top_k=2, n_heldout=1, k_use=2,
                        drop_bottom_frac=0.25)
    assert res.refreshed and set(res.directions.v_hack) == set(old.v_hack)
    assert res.overlap_v_hack == pytest.approx(1.0, abs=1e-3)
    assert res.overlap_v_grad == pytest.approx(1.0, abs=1e-3)
    for k in knobs.values():
        assert k.delta_S.grad is None


def test_axis_sign_vote_and_mean_disagree_where_one_pair_dominates():
    """Three pairs project -1, -1, +10 on the axis: the mean says +, the majority vote says -;
    a 1:1 tie is signed positive (the reference's rule)."""
    v = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    D = torch.tensor([[-1.0, 0.3], [-1.0, -0.2], [10.0, 0.0]], dtype=torch.float64)
    assert vhack.axis_signs(D, v, "mean").tolist() == [1.0]
    assert vhack.axis_signs(D, v, "vote").tolist() == [-1.0]
    tie = torch.tensor([[-1.0, 0.0], [2.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    assert vhack.axis_signs(tie, v, "vote").tolist() == [1.0]
    assert vhack.axis_signs(-tie[:2], v, "vote").tolist() == [1.0]
    with pytest.raises(ValueError, match="not one of"):
        vhack.axis_signs(D, v, "median")


def test_haar_control_matches_the_real_basis_module_set_and_axis_counts():
    shapes = {"a": 16, "b": 24, "c": 8}
    real = vhack.Directions({"a": torch.eye(16)[:3], "c": torch.eye(8)[:1]}, {"a": torch.ones(3), "c": torch.ones(1)},
                            {m: torch.ones(r) / r**0.5 for m, r in shapes.items()}, dropped=["b"])
    ctrl = vhack.haar_like(real, shapes, seed=5)
    assert {m: v.shape for m, v in ctrl.v_hack.items()} == {"a": (3, 16), "c": (1, 8)}
    assert set(ctrl.v_grad) == set(shapes) and ctrl.is_control and ctrl.dropped == ["b"]
    for v in ctrl.v_hack.values():
        assert _orthonormal(v)
    again = vhack.haar_like(real, shapes, seed=5)
    assert all(torch.equal(ctrl.v_hack[m], again.v_hack[m]) for m in ctrl.v_hack)
    assert not torch.equal(vhack.haar_like(real, shapes, seed=6).v_hack["a"], ctrl.v_hack["a"])


def test_pair_loss_norms_weight_tokens_as_documented():
    lp = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(vhack._pair_loss(lp, mask, "mean")) == pytest.approx(1.5 + 3.0)
    assert float(vhack._pair_loss(lp, mask, "sum")) == pytest.approx(3.0 + 3.0)
    with pytest.raises(ValueError):
        vhack._pair_loss(lp, mask, "max")


def test_heldout_check_covers_every_kept_axis():
    report = {"axis_frac_pairs_pos": {"a": [1.0, 0.0, 0.75], "b": [0.5]}}
    kept = vhack.heldout_on_kept_axes(report, {"a": [0, 2], "b": [0]})
    assert kept == {"n_axes": 3, "n_axes_hackward": 2, "mean_frac_pairs_pos": pytest.approx(0.75)}
    assert vhack.heldout_on_kept_axes({}, {"a": [0]}) == {}
    S = {"a": torch.tensor([5.0, 4.0, 1.0]), "b": torch.tensor([0.5, 0.4])}
    assert vhack.kept_axes(S, k_use=2, drop_bottom_frac=0.5) == {"a": [0, 1]}
    assert vhack.kept_axes(S, k_use=3, drop_bottom_frac=0.0) == {"a": [0, 1, 2], "b": [0, 1]}

