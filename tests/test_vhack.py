"""Hack directions: planted-direction recovery, postprocessing, save/load, Haar controls,
refresh, and one end-to-end extraction on the offline tiny Qwen3."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from _logs import collect_logs
from vgrout import vhack
from vgrout.pairs import Pair, builtin_pairs, pairs_fingerprint_text


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
    # pure-noise pairs do not project consistently: held out, they fall on either side
    g = _gen(9)
    noise = {f"hack/{m}": torch.randn(40, r, generator=g) for m, r in MODS.items()}
    noise.update({f"clean/{m}": torch.zeros(40, r) for m, r in MODS.items()})
    hn = vhack.directions_from_grads(noise, top_k=3, tau_axis=0.0, n_heldout=20).heldout
    assert 0.3 < hn["mean_frac_v_grad_pos"] < 0.7 and 0.3 < hn["mean_frac_top_axis_pos"] < 0.7
    assert 3 < hn["n_pairs_v_grad_hackward"] < 17 and 3 < hn["n_pairs_top_axis_hackward"] < 17
    with pytest.raises(ValueError, match="need at least 2"):
        vhack.directions_from_grads(noise, top_k=3, tau_axis=0.0, n_heldout=39)


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
    # different k: the fraction of the OLD subspace the new one spans (divided by k_old)
    two, one = {"m": torch.eye(2, 6)}, {"m": torch.eye(1, 6)}
    assert vhack.basis_overlap(two, one) == 0.5  # new spans half of old
    assert vhack.basis_overlap(one, two) == 1.0  # new contains old
    assert vhack.basis_overlap(one, {"m": torch.eye(6)[[1, 2, 3]]}) == 0.0
    # an empty old basis is skipped; nothing shared is NaN
    assert vhack.basis_overlap({"m": torch.zeros(0, 6), "n": torch.eye(1, 3)},
                               {"m": torch.eye(1, 6), "n": torch.eye(1, 3)}) == 1.0
    assert math.isnan(vhack.basis_overlap({"m": torch.eye(1, 3)}, {"n": torch.eye(1, 3)}))


def test_heldout_pairs_are_kept_out_of_the_extraction():
    """Only the first n - n_heldout pairs shape v_hack, sv and v_grad: poisoning the held-out
    pairs changes the report, not the directions; v_grad has unit norm."""
    grads, _ = _grads(MODS, 10, 3)
    poisoned = {k: v.clone() for k, v in grads.items()}
    for m, r in MODS.items():
        poisoned[f"hack/{m}"][-2:] -= 1000.0 * torch.randn(2, r, generator=_gen(4))
    d = vhack.directions_from_grads(poisoned, top_k=3, tau_axis=0.0, n_heldout=2,
                                    names=[f"n{i}" for i in range(10)])
    train = {k: v[:8] for k, v in grads.items()}
    V, S = vhack.v_hack_from(train, top_k=3)
    vg = vhack.v_grad_from(train)
    for m in MODS:
        assert torch.equal(d.v_hack[m], V[m]) and torch.equal(d.sv[m], S[m])
        assert torch.equal(d.v_grad[m], vg[m])
        assert float(d.v_grad[m].norm()) == pytest.approx(1.0, abs=1e-6)
    assert d.heldout["names"] == ["n8", "n9"] and d.heldout["n_heldout"] == 2
    no_report = vhack.directions_from_grads(grads, top_k=3, tau_axis=0.0, n_heldout=0)
    assert no_report.heldout == {} and torch.equal(no_report.v_grad["layers.0.q"],
                                                   vhack.v_grad_from(grads)["layers.0.q"])


def test_no_signal_gives_zero_v_grad_and_no_axis():
    h = torch.randn(4, 6, generator=_gen(2))
    grads = {"hack/m": h, "clean/m": h.clone()}
    assert torch.equal(vhack.v_grad_from(grads)["m"], torch.zeros(6))
    V, S = vhack.v_hack_from(grads, top_k=3)
    assert V["m"].shape == (0, 6) and S["m"].shape == (0,)


def test_threshold_boundaries_keep_equal_values():
    """tau_axis keeps S_i / S_0 == tau_axis; the quantile keeps s == threshold."""
    D = torch.tensor([[0.0, 0.0, 10.0, 0.0], [0.0, 5.0, 0.0, 0.0], [2.5, 0.0, 0.0, 0.0]])
    grads = {"hack/m": D, "clean/m": torch.zeros_like(D)}
    for tau, want in ((0.25, [10.0, 5.0, 2.5]), (0.5, [10.0, 5.0]), (1.0, [10.0])):
        _, S = vhack.v_hack_from(grads, top_k=3, tau_axis=tau)
        assert S["m"].tolist() == want, tau
    V = {"a": torch.eye(3, 4), "b": torch.eye(2, 4)}
    S = {"a": torch.tensor([5.0, 3.0, 1.0]), "b": torch.tensor([4.0, 2.0])}
    out, dropped = vhack.postprocess(V, S, k_use=3, drop_bottom_frac=0.25)  # quantile = 2.0
    assert dropped == [] and out["a"].shape[0] == 2 and out["b"].shape[0] == 2


def test_default_quantile_drops_the_bottom_quarter():
    """drop_bottom_frac=0.25 drops axes below the 25% quantile (not above the 75% one)."""
    V = {"a": torch.eye(2, 4), "b": torch.eye(2, 5)}
    S = {"a": torch.tensor([8.0, 4.0]), "b": torch.tensor([2.0, 1.0])}
    out, dropped = vhack.postprocess(V, S, k_use=2, drop_bottom_frac=0.25)  # quantile 1.75
    assert dropped == [] and out["a"].shape[0] == 2
    torch.testing.assert_close(out["b"], torch.eye(2, 5)[:1])
    out, dropped = vhack.postprocess(V, S, k_use=1, drop_bottom_frac=0.25)  # [8, 2]: 3.5
    assert dropped == ["b"] and list(out) == ["a"]


def test_haar_frame_is_the_sign_fixed_qr_of_its_gaussian():
    """Q from QR of the seeded Gaussian X with diag(R) > 0: Qᵀ X is upper triangular with a
    positive diagonal (without the sign fix the frame is not Haar-distributed)."""
    r, k, seed = 7, 5, 21
    F = vhack.haar_v_hack({"m": r}, k=k, seed=seed)["m"].double()  # [k, r]
    X = torch.randn(r, k, generator=_gen(seed), dtype=torch.float64)
    R = F @ X
    assert bool((torch.diagonal(R) > 0).all())
    torch.testing.assert_close(torch.tril(R, -1), torch.zeros(k, k, dtype=torch.float64), atol=1e-5,
                               rtol=0)
    assert vhack.haar_v_hack({"m": 3}, k=5, seed=0)["m"].shape == (3, 3)  # k capped at r
    g = vhack.haar_v_grad({"m": r}, seed=seed)["m"].double()
    x = torch.randn(r, generator=_gen(seed), dtype=torch.float64)
    torch.testing.assert_close(g, x / x.norm(), atol=1e-7, rtol=0)


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


# ── pure edge cases ───────────────────────────────────────────────────────────────────────


def test_diffs_parse_module_names_and_check_shapes():
    h = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    grads = {"hack/blk/q": h, "clean/blk/q": torch.zeros(2, 2)}  # a name with a slash
    assert list(vhack.v_grad_from(grads)) == ["blk/q"]
    with pytest.raises(ValueError, match="need"):
        vhack.v_grad_from({"hack/m": torch.ones(3), "clean/m": torch.ones(3)})  # 1-D
    with pytest.raises(ValueError, match="need"):
        vhack.v_grad_from({"hack/m": torch.ones(2, 3), "clean/m": torch.ones(3, 3)})


def test_small_signals_are_normalised_and_kept():
    """Differences of norm < 1: v_grad is still a unit vector and no axis is lost."""
    D = torch.tensor([[1e-3, 0.0, 0.0], [0.0, 5e-4, 0.0]])
    grads = {"hack/m": D, "clean/m": torch.zeros_like(D)}
    torch.testing.assert_close(vhack.v_grad_from(grads)["m"], torch.tensor([2.0, 1.0, 0.0]) / 5**0.5)
    V, S = vhack.v_hack_from(grads, top_k=2)
    torch.testing.assert_close(V["m"], torch.eye(3)[:2])
    torch.testing.assert_close(S["m"], torch.tensor([1e-3, 5e-4]))


def test_null_axes_are_dropped():
    D = torch.tensor([[1.0, 2.0, 0.0]] * 3)  # rank 1: two exactly-null singular values
    V, S = vhack.v_hack_from({"hack/m": D, "clean/m": torch.zeros_like(D)}, top_k=3)
    assert V["m"].shape == (1, 3) and S["m"].tolist() == [pytest.approx(15**0.5)]


def test_postprocess_of_nothing_is_nothing():
    for frac in (0.0, 0.5):
        assert vhack.postprocess({}, {}, k_use=2, drop_bottom_frac=frac) == ({}, [])


def test_directions_from_grads_passes_tau_and_allows_two_training_pairs():
    grads = _known_spectrum([10.0, 5.0, 2.5, 1.0])  # 6 pairs
    d = vhack.directions_from_grads(grads, top_k=4, tau_axis=0.3, n_heldout=4)
    V, S = vhack.v_hack_from({k: v[:2] for k, v in grads.items()}, top_k=4, tau_axis=0.3)
    assert torch.equal(d.sv["m"], S["m"]) and torch.equal(d.v_hack["m"], V["m"])
    with pytest.raises(ValueError, match="need at least 2"):
        vhack.directions_from_grads(grads, top_k=4, tau_axis=0.0, n_heldout=5)
    with pytest.raises(ValueError, match="need at least 2"):
        vhack.directions_from_grads(grads, top_k=4, tau_axis=0.0, n_heldout=-1)


def test_heldout_report_exact_fractions():
    """Two modules; per held-out pair: top-axis and v_grad signs counted strictly (> 0)."""
    V = {"a": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "b": torch.tensor([[0.0, 1.0]])}
    vg = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([1.0, 0.0])}
    hack = {  # rows: pair0, pair1, pair2
        "a": torch.tensor([[0.5, -2.0], [-1.0, 0.5], [0.0, 0.0]]),
        "b": torch.tensor([[0.0, 0.25], [3.0, -1.0], [0.0, 0.0]]),
    }
    grads = {f"{side}/{m}": (t if side == "hack" else torch.zeros_like(t))
             for m, t in hack.items() for side in ("hack", "clean")}
    rep = vhack.heldout_report(grads, V, vg, ["p0", "p1", "p2"])
    assert rep == {
        "names": ["p0", "p1", "p2"],
        "n_heldout": 3,
        "frac_modules_top_axis_pos": [1.0, 0.0, 0.0],  # a: row 0 only; b: its one row
        "frac_modules_v_grad_pos": [0.0, 1.0, 0.0],
        "n_pairs_top_axis_hackward": 1,
        "n_pairs_v_grad_hackward": 1,
        "mean_frac_top_axis_pos": pytest.approx(1 / 3),
        "mean_frac_v_grad_pos": pytest.approx(1 / 3),
        "axis_frac_pairs_pos": {"a": [pytest.approx(1 / 3)] * 2, "b": [pytest.approx(1 / 3)]},
    }
    # exactly half the modules hack-ward is not a hack-ward pair
    half = vhack.heldout_report(grads, {"a": V["a"], "b": -V["b"]}, vg, ["p0", "p1", "p2"])
    assert half["frac_modules_top_axis_pos"][0] == 0.5 and half["n_pairs_top_axis_hackward"] == 0
    half = vhack.heldout_report(grads, V, {"a": vg["a"], "b": -vg["b"]}, ["p0", "p1", "p2"])
    assert half["frac_modules_v_grad_pos"][1] == 0.5 and half["n_pairs_v_grad_hackward"] == 0
    # a module without a basis (dropped, or emptied) only counts on v_grad; none at all: NaN
    rep = vhack.heldout_report(grads, {"b": torch.zeros(0, 2)}, vg, ["p0", "p1", "p2"])
    assert all(math.isnan(f) for f in rep["frac_modules_top_axis_pos"])
    assert math.isnan(rep["mean_frac_top_axis_pos"]) and rep["n_pairs_top_axis_hackward"] == 0
    assert rep["frac_modules_v_grad_pos"] == [0.0, 1.0, 0.0]
    rep = vhack.heldout_report(grads, {}, {}, ["p0", "p1", "p2"])
    assert math.isnan(rep["mean_frac_v_grad_pos"])
    with pytest.raises(ValueError, match="held-out rows"):
        vhack.heldout_report(grads, V, vg, ["p0"])


def test_cache_path_name_is_exact():
    ps = builtin_pairs()
    h = vhack.pairs_hash(ps)
    assert len(h) == 12 and h == hashlib.sha256(pairs_fingerprint_text(ps).encode()).hexdigest()[:12]
    assert vhack.directions_cache_path("d", "Qwen/Qwen3-4B", ps, 12, 0.0).name == \
        f"v_hack_Qwen--Qwen3-4B_k12_h2_svote_{h}.safetensors"
    assert vhack.directions_cache_path("d", "Qwen/Qwen3-4B", ps, 8, 0.1, 3, "mean", "sum").name == \
        f"v_hack_Qwen--Qwen3-4B_k8_tau0.1_h3_smean_nsum_{h}.safetensors"
    top = ["model.layers.3.mlp.up_proj", "model.layers.5.self_attn.q_proj", "model.layers.4.mlp.up_proj"]
    assert vhack.directions_cache_path("d", "m", ps, 4, 0.0, modules=top[1:] + ["model.layers.1.x"]).name == \
        f"v_hack_m_k4_h2_L1-5_svote_{h}.safetensors"
    assert vhack.directions_cache_path("d", "m", ps, 4, 0.0, modules=top).name == \
        f"v_hack_m_k4_h2_L3-5_svote_{h}.safetensors"
    assert vhack.directions_cache_path("d", "m", ps, 4, 0.0, modules=["model.layers.0.mlp.up_proj", *top]).name == \
        f"v_hack_m_k4_h2_svote_{h}.safetensors"  # from block 0: no span in the name


def test_haar_k1_and_counts():
    one = vhack.haar_v_hack(MODS, k=1, seed=3)
    assert all(v.shape == (1, MODS[m]) for m, v in one.items())
    d = vhack.haar_directions(MODS, k=2, seed=3)
    assert d.n_axes() == 6 and d.is_control and not _dirs().is_control
    with pytest.raises(ValueError, match="k must be"):
        vhack.haar_v_hack(MODS, k=0, seed=3)


def test_save_checks_coverage_and_writes_k(tmp_path):
    d = _dirs()
    bad = vhack.Directions(d.v_hack, d.sv, {m: v for m, v in d.v_grad.items() if m != "layers.0.o"})
    with pytest.raises(ValueError, match="same modules"):
        vhack.save_directions(tmp_path / "x.safetensors", bad, model_id="m", pairs_source="s",
                              knobs_meta={})
    d.v_hack["layers.0.o"] = d.v_hack["layers.0.o"][:2]
    d.sv["layers.0.o"] = d.sv["layers.0.o"][:2]
    p = vhack.save_directions(tmp_path / "v.safetensors", d, model_id="m", pairs_source="s",
                              knobs_meta={})
    got = vhack.load_directions(p, model_id="m", k_use=9, drop_bottom_frac=0.0, knobs=MODS)
    assert got.meta["k"] == "4" and got.v_hack["layers.0.o"].shape == (2, 300)


def _write(path, tensors, meta=None):
    save_file(tensors, str(path), metadata={"schema": vhack.SCHEMA, "model": "m", **(meta or {})})
    return path


def test_load_refuses_files_that_do_not_fit(tmp_path):
    r = {"q": 4}
    ok = {"v_hack/q": torch.eye(2, 4), "sv/q": torch.tensor([2.0, 1.0]), "v_grad/q": torch.eye(1, 4)[0]}
    # a hand-written file without held-out metadata and with a foreign tensor still loads
    got = vhack.load_directions(_write(tmp_path / "ok.safetensors", {**ok, "other/q": torch.ones(1)}),
                                model_id="m", k_use=2, drop_bottom_frac=0.0, knobs=r)
    assert got.heldout == {} and got.dropped == [] and got.v_hack["q"].shape == (2, 4)
    cases = {
        "no_v_hack": {k: v for k, v in ok.items() if k != "v_hack/q"},
        "no_sv": {k: v for k, v in ok.items() if k != "sv/q"},
        "v_hack_1d": {**ok, "v_hack/q": torch.ones(4)},
        "v_hack_width": {**ok, "v_hack/q": torch.eye(2, 5)},
        "sv_len": {**ok, "sv/q": torch.ones(3)},
        "v_grad_len": {**ok, "v_grad/q": torch.ones(5)},
        "nan": {**ok, "sv/q": torch.tensor([float("nan"), 1.0])},
    }
    for name, tensors in cases.items():
        with pytest.raises(vhack.DirectionsError):
            vhack.load_directions(_write(tmp_path / f"{name}.safetensors", tensors), model_id="m",
                                  k_use=2, drop_bottom_frac=0.0, knobs=r)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(vhack.DirectionsError, match="not a readable safetensors directions file"):
        vhack.load_directions(tmp_path / "junk.safetensors", model_id="m", k_use=2,
                              drop_bottom_frac=0.0, knobs=r)


def test_load_applies_the_quantile_and_reports_dropped(tmp_path):
    d = _dirs()
    p = vhack.save_directions(tmp_path / "v.safetensors", d, model_id="m", pairs_source="s",
                              knobs_meta={})
    allsv = torch.cat([s for s in d.sv.values()])
    got = vhack.load_directions(p, model_id="m", k_use=4, drop_bottom_frac=0.9, knobs=MODS)
    want_v, want_dropped = vhack.postprocess(d.v_hack, d.sv, k_use=4, drop_bottom_frac=0.9)
    assert got.dropped == want_dropped and want_dropped  # the quantile empties some module
    with collect_logs() as msgs:
        vhack.load_directions(p, model_id="m", k_use=4, drop_bottom_frac=0.9, knobs=MODS)
    assert msgs[0] == (f"v_hack postprocess: dropped {len(want_dropped)} of {len(d.v_hack)} modules with no "
                       "axis above the 0.9 singular-value quantile")
    assert {m: v.shape[0] for m, v in got.v_hack.items()} == {m: v.shape[0] for m, v in want_v.items()}
    assert got.n_axes() == int((allsv.double() >= torch.quantile(allsv.double(), 0.9)).sum())
    assert set(got.v_grad) == set(MODS)  # v_grad is kept for every module
    empty = _write(tmp_path / "z.safetensors", {
        "v_hack/q": torch.zeros(0, 4), "sv/q": torch.zeros(0), "v_grad/q": torch.ones(4)})
    with pytest.raises(vhack.DirectionsError, match="left no module"):
        vhack.load_directions(empty, model_id="m", k_use=2, drop_bottom_frac=0.5, knobs={"q": 4})


# ── fast end to end on a random tiny Qwen3 (character tokens, 97-token vocabulary) ────────


class _CharTok:
    """Character tokenizer over the random model's vocabulary (the `tok(text)` call shape);
    like a Hugging Face tokenizer it adds a BOS token unless told not to."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [96] * bool(add_special_tokens) + [ord(c) % 96 for c in text]}


@pytest.fixture(scope="module")
def rand_tiny(tmp_path_factory):
    from _tiny import random_qwen3
    from vgrout.adapter import wrap_model

    model = random_qwen3(seed=0)
    knobs = wrap_model(model, "rand-qwen3", cache_root=tmp_path_factory.mktemp("svd"))
    return model, _CharTok(), knobs


def _rand_pairs(n: int = 6) -> list[Pair]:
    """Pairs of ragged lengths (the batches need padding)."""
    return [Pair(f"p{i}", None, None, f"Q{i}: " + "ab" * i, "hack!" * (i % 3 + 1), f"ok {i}" + "z" * i)
            for i in range(n)]


def _reference_grads(model, tok, knobs, prompt: str, completion: str) -> list[torch.Tensor]:
    """∂/∂δS of -mean log p(completion | prompt) through the model's full logits."""
    p, c = (tok(t, add_special_tokens=False)["input_ids"] for t in (prompt, completion))
    logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(c)[:, None])
    return list(torch.autograd.grad(-lp.mean(), [k.delta_S for k in knobs.values()]))


def test_pair_grads_equal_an_independent_gradient_and_leave_no_trace(rand_tiny):
    model, tok, knobs = rand_tiny
    pairs = _rand_pairs()
    g = torch.Generator().manual_seed(3)
    first = next(iter(knobs.values()))
    try:
        with torch.no_grad():
            for k in knobs.values():
                k.delta_S.copy_(0.2 * torch.randn(k.rank, generator=g))
                k.delta_S_hack.copy_(0.5 * torch.randn(k.rank, generator=g))
        hack_vals = {m: k.delta_S_hack.detach().clone() for m, k in knobs.items()}
        first.per_rollout_grad = torch.full((1, first.rank), 7.0)  # stale, from a training step
        model.train()
        batched = vhack.pair_grads(model, tok, knobs, pairs, "cpu", batch_size=4)  # ragged last chunk
        # nothing of the pairs is left for the training step to read
        assert model.training and all(k.per_rollout_grad is None for k in knobs.values())
        model.eval()
        single = vhack.pair_grads(model, tok, knobs, pairs, "cpu", batch_size=1)
        default = vhack.pair_grads(model, tok, knobs, pairs, "cpu")
        assert not model.training
        for m, k in knobs.items():
            assert torch.equal(k.delta_S_hack.detach(), hack_vals[m])
            assert k.delta_S.grad is None and k.delta_S_hack.grad is None
        assert set(batched) == {f"{s}/{m}" for s in ("hack", "clean") for m in knobs}
        with torch.no_grad():  # the reference: the deployed model (quarantine zero)
            for k in knobs.values():
                k.delta_S_hack.zero_()
        names = list(knobs)
        for i, p in enumerate(pairs):
            for side, text in (("hack", p.hack), ("clean", p.clean)):
                ref = _reference_grads(model, tok, knobs, p.prompt, text)
                for n, r in zip(names, ref, strict=True):
                    key = f"{side}/{n}"
                    scale = float(r.abs().max())
                    for got in (batched, single, default):
                        assert got[key].dtype == torch.float32 and got[key].shape == (6, knobs[n].rank)
                        torch.testing.assert_close(got[key][i], r, rtol=1e-4, atol=1e-5 * scale)
    finally:
        with torch.no_grad():
            for k in knobs.values():
                k.delta_S.zero_()
                k.delta_S_hack.zero_()
        first.per_rollout_grad = None
        model.eval()


def test_pair_grads_refuses_bad_input(rand_tiny):
    model, tok, knobs = rand_tiny
    with pytest.raises(ValueError, match="no pairs"):
        vhack.pair_grads(model, tok, knobs, [], "cpu")
    with pytest.raises(ValueError, match="'empty'.*clean"):
        vhack.pair_grads(model, tok, knobs, [Pair("empty", None, None, "Q", "x", "")], "cpu")
    with pytest.raises(ValueError, match="'noprompt'"):
        vhack.pair_grads(model, tok, knobs, [Pair("noprompt", None, None, "", "x", "y")], "cpu")
    k = next(iter(knobs.values()))
    k.delta_S.requires_grad_(False)
    try:
        with pytest.raises(RuntimeError, match="require grad"):
            vhack.pair_grads(model, tok, knobs, _rand_pairs(), "cpu")
    finally:
        k.delta_S.requires_grad_(True)


def test_extract_resolve_refresh_on_a_random_tiny_model(rand_tiny, tmp_path):
    model, tok, knobs = rand_tiny
    pairs = _rand_pairs(9)  # 7 training pairs: up to 7 axes, so k_use = 5 binds
    grads = vhack.pair_grads(model, tok, knobs, pairs, "cpu")
    want = vhack.directions_from_grads(grads, top_k=12, tau_axis=0.0, n_heldout=2,
                                       names=[p.name for p in pairs])
    assert max(v.shape[0] for v in want.v_hack.values()) > 5
    d = vhack.extract(model, tok, knobs, pairs, top_k=12)  # defaults: tau 0, 2 held out, cpu
    assert d.heldout == want.heldout and d.heldout["names"] == ["p7", "p8"]
    for m in knobs:
        assert torch.equal(d.v_hack[m], want.v_hack[m]) and torch.equal(d.v_grad[m], want.v_grad[m])
    # resolve with every default: extracted once, cached under the default key, postprocessed
    with collect_logs() as msgs:
        res = vhack.resolve_directions(model, tok, knobs, pairs, model_id="rand-qwen3",
                                       pairs_source="test", out_dir=tmp_path)
    cache = vhack.directions_cache_path(tmp_path, "rand-qwen3", pairs, 12, 0.0, 2)
    assert [p.name for p in tmp_path.iterdir()] == [cache.name]
    assert {k: res.meta[k] for k in ("top_k", "tau_axis", "n_heldout", "pairs_hash", "n_pairs",
                                     "pairs_source", "model")} == {
        "top_k": "12", "tau_axis": "0.0", "n_heldout": "2", "pairs_hash": vhack.pairs_hash(pairs),
        "n_pairs": "9", "pairs_source": "test", "model": "rand-qwen3"}
    want_v, want_dropped = vhack.postprocess(want.v_hack, want.sv, k_use=5, drop_bottom_frac=0.25)
    assert res.dropped == want_dropped and set(res.v_hack) == set(want_v)
    for m, v in want_v.items():
        assert torch.equal(res.v_hack[m], v)
    kept = res.heldout.pop("kept_axes")  # the held-out check over every kept axis, added on load
    h = want.heldout
    assert msgs[:2] == [
        f"v_hack cache miss at {cache}: extracting from 9 pairs",
        f"v_hack extracted from 7 pairs (2 held out): held-out pairs hack-ward on the top axis in "
        f"{h['n_pairs_top_axis_hackward']}/2, on v_grad in {h['n_pairs_v_grad_hackward']}/2 (mean module "
        f"fraction {h['mean_frac_top_axis_pos']:.2f} / {h['mean_frac_v_grad_pos']:.2f}; SHOULD be > 0.5)"]
    assert msgs[-1] == (f"held-out pairs project hack-ward on {kept['n_axes_hackward']}/{kept['n_axes']} kept "
                        f"axes (mean fraction of pairs {kept['mean_frac_pairs_pos']:.2f}; SHOULD be > 0.5)")
    assert res.heldout == json.loads(json.dumps(want.heldout))
    assert kept == vhack.heldout_on_kept_axes(want.heldout, vhack.kept_axes(want.sv, k_use=5, drop_bottom_frac=0.25))
    assert kept["n_axes"] == sum(v.shape[0] for v in want_v.values())
    # a hit never touches the model; an explicit path is used as given
    again = vhack.resolve_directions(None, None, knobs, pairs, model_id="rand-qwen3",
                                     pairs_source="test", out_dir=tmp_path / "elsewhere", path=cache)
    assert all(torch.equal(again.v_hack[m], res.v_hack[m]) for m in res.v_hack)
    tau = vhack.resolve_directions(model, tok, knobs, pairs, model_id="rand-qwen3", pairs_source="t",
                                   out_dir=tmp_path, top_k=3, tau_axis=0.5, n_heldout=1, k_use=2,
                                   drop_bottom_frac=0.0)
    assert vhack.directions_cache_path(tmp_path, "rand-qwen3", pairs, 3, 0.5, 1).is_file()
    assert tau.meta["tau_axis"] == "0.5" and tau.heldout["n_heldout"] == 1
    raw = vhack.directions_from_grads(grads, top_k=3, tau_axis=0.5, n_heldout=1)
    want_tau, _ = vhack.postprocess(raw.v_hack, raw.sv, k_use=2, drop_bottom_frac=0.0)
    assert all(torch.equal(tau.v_hack[m], v) for m, v in want_tau.items()) and tau.dropped == []
    assert any(v.shape[0] == 1 for v in tau.v_hack.values())  # tau_axis = 0.5 removed an axis
    # refresh with every default on the unchanged model reproduces the loaded directions
    res.meta["marker"] = "kept"
    fresh = vhack.refresh(model, tok, knobs, pairs, res, top_k=12)
    assert fresh.refreshed is True and fresh.reason == ""
    new = fresh.directions
    assert new.meta == res.meta and new.meta is not res.meta and new.dropped == res.dropped
    assert new.heldout == want.heldout
    for m in res.v_hack:
        torch.testing.assert_close(new.v_hack[m], res.v_hack[m])
        torch.testing.assert_close(new.sv[m], res.sv[m])
    assert all(torch.equal(new.v_grad[m], want.v_grad[m]) for m in knobs)
    assert fresh.overlap_v_hack == pytest.approx(1.0, abs=1e-5)
    assert fresh.overlap_v_grad == pytest.approx(1.0, abs=1e-5)
    # against a different old basis the overlaps are measured, not assumed
    other = vhack.haar_directions({m: k.rank for m, k in knobs.items()}, k=2, seed=1)
    other.meta = {}
    moved = vhack.refresh(model, tok, knobs, pairs, other, top_k=12, k_use=2, drop_bottom_frac=0.0)
    assert moved.overlap_v_hack == pytest.approx(vhack.basis_overlap(other.v_hack, moved.directions.v_hack))
    assert moved.overlap_v_grad == pytest.approx(vhack.basis_overlap(other.v_grad, moved.directions.v_grad))
    assert moved.overlap_v_hack < 0.5 and all(v.shape[0] <= 2 for v in moved.directions.v_hack.values())
    # refresh passes its knobs on: tau_axis, n_heldout, k_use and the quantile (dropped modules)
    moved = vhack.refresh(model, tok, knobs, pairs, res, top_k=3, tau_axis=0.5, n_heldout=1, k_use=2,
                          drop_bottom_frac=0.9)
    raw = vhack.directions_from_grads(grads, top_k=3, tau_axis=0.5, n_heldout=1)
    want_v, want_dropped = vhack.postprocess(raw.v_hack, raw.sv, k_use=2, drop_bottom_frac=0.9)
    assert moved.directions.dropped == want_dropped and want_dropped
    assert moved.directions.heldout["n_heldout"] == 1
    assert {m: v.shape for m, v in moved.directions.v_hack.items()} == {m: v.shape for m, v in want_v.items()}
    ctl = vhack.refresh(model, tok, knobs, pairs, res, top_k=12, is_control=True)
    assert ctl.refreshed is False and math.isnan(ctl.overlap_v_hack) and math.isnan(ctl.overlap_v_grad)
    assert ctl.reason == "Haar-random control: directions stay fixed"


def test_load_directions_accepts_knobs(rand_tiny, tmp_path):
    model, tok, knobs = rand_tiny
    shapes = {m: k.rank for m, k in knobs.items()}
    d = vhack.haar_directions(shapes, k=2, seed=4)
    p = vhack.save_directions(tmp_path / "h.safetensors", d, model_id="rand-qwen3", pairs_source="haar",
                              knobs_meta={})
    got = vhack.load_directions(p, model_id="rand-qwen3", k_use=2, drop_bottom_frac=0.0, knobs=knobs)
    assert all(torch.equal(got.v_hack[m], d.v_hack[m]) for m in knobs)


def test_module_names_with_a_slash_round_trip(tmp_path):
    d = vhack.haar_directions({"blk/q": 4}, k=2, seed=1)
    p = vhack.save_directions(tmp_path / "s.safetensors", d, model_id="m", pairs_source="s", knobs_meta={})
    got = vhack.load_directions(p, model_id="m", k_use=2, drop_bottom_frac=0.0, knobs={"blk/q": 4})
    assert torch.equal(got.v_hack["blk/q"], d.v_hack["blk/q"])
    empty = vhack.save_directions(tmp_path / "e.safetensors", vhack.Directions({}, {}, {}), model_id="m",
                                  pairs_source="s", knobs_meta={})
    with safe_open(str(empty), framework="pt") as f:
        assert f.metadata()["k"] == "0"


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
    zero = torch.tensor([[-1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)  # a zero projection is no vote
    assert vhack.axis_signs(zero, v, "vote").tolist() == [-1.0]
    assert vhack.axis_signs(D, v, "vote").dtype == torch.float64
    assert vhack.axis_signs(D.float(), v.float(), "mean").dtype == torch.float32
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
    short = vhack.heldout_on_kept_axes({"axis_frac_pairs_pos": {"a": [1.0]}}, {"a": [0, 1], "z": [0]})
    assert short == {"n_axes": 1, "n_axes_hackward": 1, "mean_frac_pairs_pos": 1.0}
    S = {"a": torch.tensor([5.0, 4.0, 1.0]), "b": torch.tensor([0.5, 0.4])}
    assert vhack.kept_axes(S, k_use=2, drop_bottom_frac=0.5) == {"a": [0, 1]}
    assert vhack.kept_axes(S, k_use=3, drop_bottom_frac=0.0) == {"a": [0, 1, 2], "b": [0, 1]}


def test_pair_grads_sum_norm_and_two_per_batch(rand_tiny):
    """norm="sum" is the gradient of -Σ log p (not the mean), on the batched and the one-pair path;
    batches of 2 equal the one-pair path."""
    model, tok, knobs = rand_tiny
    pairs = _rand_pairs(5)
    got = {bs: vhack.pair_grads(model, tok, knobs, pairs, "cpu", batch_size=bs, norm="sum") for bs in (1, 2, 8)}
    mean2 = vhack.pair_grads(model, tok, knobs, pairs, "cpu", batch_size=2)
    names = list(knobs)
    for i, p in enumerate(pairs):
        for side, text in (("hack", p.hack), ("clean", p.clean)):
            n_tok = len(tok(text, add_special_tokens=False)["input_ids"])
            assert n_tok > 1
            for n, r in zip(names, _reference_grads(model, tok, knobs, p.prompt, text), strict=True):
                key, scale = f"{side}/{n}", float(r.abs().max())
                torch.testing.assert_close(mean2[key][i], r, rtol=1e-4, atol=1e-5 * scale)
                for g in got.values():
                    torch.testing.assert_close(g[key][i], r * n_tok, rtol=1e-4, atol=1e-5 * scale * n_tok)


def test_sign_and_pair_norm_reach_the_extraction(rand_tiny, tmp_path):
    """directions_from_grads / extract / resolve / refresh pass `sign` and `pair_norm` on; resolve
    names the cache by them and by the adapted blocks."""
    model, tok, knobs = rand_tiny
    pairs = _rand_pairs(9)
    names = [p.name for p in pairs]
    grads = vhack.pair_grads(model, tok, knobs, pairs, "cpu", norm="sum")
    kw = dict(top_k=12, tau_axis=0.0, n_heldout=2, names=names)
    want = vhack.directions_from_grads(grads, sign="mean", **kw)
    train = {k: v[:7] for k, v in grads.items()}
    V, _ = vhack.v_hack_from(train, top_k=12, sign="mean")
    assert all(torch.equal(want.v_hack[m], V[m]) for m in knobs)
    vote = vhack.directions_from_grads(grads, sign="vote", **kw)
    assert any(not torch.equal(want.v_hack[m], vote.v_hack[m]) for m in knobs)  # the rule matters here
    d = vhack.extract(model, tok, knobs, pairs, top_k=12, sign="mean", pair_norm="sum")
    assert all(torch.equal(d.v_hack[m], want.v_hack[m]) for m in knobs)
    res = vhack.resolve_directions(model, tok, knobs, pairs, model_id="rand-qwen3", pairs_source="t",
                                   out_dir=tmp_path, k_use=12, drop_bottom_frac=0.0, sign="mean",
                                   pair_norm="sum")
    assert [p.name for p in tmp_path.iterdir()] == [
        vhack.directions_cache_path(tmp_path, "rand-qwen3", pairs, 12, 0.0, 2, "mean", "sum").name]
    assert (res.meta["sign"], res.meta["pair_norm"]) == ("mean", "sum")
    assert all(torch.equal(res.v_hack[m], want.v_hack[m]) for m in knobs)
    fresh = vhack.refresh(model, tok, knobs, pairs, res, top_k=12, k_use=12, drop_bottom_frac=0.0,
                          sign="mean", pair_norm="sum").directions
    for m in knobs:
        torch.testing.assert_close(fresh.v_hack[m], res.v_hack[m])
    top = {m: k for m, k in knobs.items() if ".layers.1." in m}  # only the top block adapted
    assert top and len(top) < len(knobs)
    vhack.resolve_directions(model, tok, top, pairs, model_id="rand-qwen3", pairs_source="t",
                             out_dir=tmp_path / "top", k_use=12, drop_bottom_frac=0.0)
    assert [p.name for p in (tmp_path / "top").iterdir()] == [
        f"v_hack_rand-qwen3_k12_h2_L1-1_svote_{vhack.pairs_hash(pairs)}.safetensors"]


def test_null_tolerance_is_numpys_rank_rule_and_keeps_small_real_axes():
    eps = torch.finfo(torch.float32).eps
    assert vhack.null_tol(2.0, (3, 5)) == 2.0 * 5 * eps
    D = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1e-5, 0.0]])  # S = [1, 1e-5]: small but real
    V, S = vhack.v_hack_from({"hack/m": D, "clean/m": torch.zeros_like(D)}, top_k=3)
    assert V["m"].shape == (2, 3) and S["m"].tolist() == pytest.approx([1.0, 1e-5])
    D = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2 * eps, 0.0]])  # at or below 3 · eps · 1: null
    V, S = vhack.v_hack_from({"hack/m": D, "clean/m": torch.zeros_like(D)}, top_k=3)
    assert V["m"].shape == (1, 3)
