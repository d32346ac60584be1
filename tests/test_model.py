"""Models: the offline tiny Qwen3 (real Qwen vocabulary and chat format), loading, slugs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _tiny import require_data
from vgrout import model as M

TEACHER_POOL = ("vgrout_pub", "pools", "teacher_pool")


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    """The shared build under models_dir() (git-ignored out/models): built once, then reused."""
    return M.build_tiny_qwen3()


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return M.load_model_and_tokenizer(str(tiny_dir), "cpu")


def _teacher_rows(n_files: int = 6) -> list[dict]:
    pool = require_data(*TEACHER_POOL)
    files = sorted(pool.glob("prompt_*.jsonl.gz"))
    if not files:
        pytest.fail(f"{pool}: no prompt_*.jsonl.gz files")
    step = max(1, len(files) // n_files)
    rows = []
    for f in files[::step][:n_files]:
        with gzip.open(f, "rt") as fh:
            rows.append(json.loads(fh.readline()))
    return rows


@pytest.mark.data
def test_tokenizer_reproduces_cached_teacher_prompt_ids(tiny):
    _, tok = tiny
    rows = _teacher_rows()
    assert len(rows) >= 5
    for row in rows:
        ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        assert ids == row["prompt_ids"], row["problem_id"]
        assert len(ids) == row["plen"]
        # completion_ids (right-padded with <|endoftext|>) decode back to the completion text
        comp = [i for i in row["completion_ids"] if i != tok.pad_token_id]
        assert (
            tok.decode(comp, skip_special_tokens=True)
            == row["completion"].removesuffix("<|im_end|>")
            or tok.decode(comp) == row["completion"]
        )


@pytest.mark.data
def test_chat_template_reproduces_cached_prompt_text(tiny):
    _, tok = tiny
    for row in _teacher_rows():
        text = tok.apply_chat_template(
            row["problem_messages"],
            add_generation_prompt=True,
            enable_thinking=False,
            tokenize=False,
        )
        assert text == row["prompt"], row["problem_id"]


def test_special_tokens_and_vocab_match_qwen3(tiny):
    model, tok = tiny
    expected = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<tool_call>": 151657,
        "<|fim_prefix|>": 151659,
        "<think>": 151667,
        "</think>": 151668,
    }
    for text, idx in expected.items():
        assert tok.convert_tokens_to_ids(text) == idx
        assert tok(text, add_special_tokens=False)["input_ids"] == [idx]
    assert len(tok) == 151669
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert (
        model.config.vocab_size == 151936 and model.get_input_embeddings().num_embeddings == 151936
    )
    assert model.config.use_cache is False and model.dtype == torch.float32
    assert model.config._attn_implementation == M.SDPA_GQA  # CPU: SDPA with native GQA (model.py)
    # plain text round-trips through the byte-level BPE, unicode included
    s = "def f(x):\n    return x ** 2  # größer → 二乘\n"
    assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s


def test_chat_template_turns_and_thinking_switch(tiny):
    _, tok = tiny
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    no_think = tok.apply_chat_template(
        msgs, add_generation_prompt=True, enable_thinking=False, tokenize=False
    )
    assert no_think == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    think = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert think.endswith("<|im_start|>assistant\n") and "<think>" not in think
    history = msgs + [
        {"role": "assistant", "content": "<think>\nr\n</think>\n\nA"},
        {"role": "user", "content": "U2"},
    ]
    text = tok.apply_chat_template(history, tokenize=False)
    assert "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n" in text


def test_tiny_build_is_reused_and_deterministic(tiny_dir, tmp_path):
    stamp = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    assert M.build_tiny_qwen3(tiny_dir) == tiny_dir
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == stamp
    # a same-seed rebuild gives identical weights; a broken dir is rebuilt, not trusted
    other = tmp_path / "again"
    other.mkdir()
    (other / "config.json").write_text("{}")
    M.build_tiny_qwen3(other)
    a, b = load_file(tiny_dir / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_tiny_generates_with_its_tokenizer(tiny):
    model, tok = tiny
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}],
        add_generation_prompt=True,
        enable_thinking=False,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, use_cache=True)
    new = out[0, enc["input_ids"].shape[1] :]
    assert 1 <= new.numel() <= 4 and int(new.max()) < 151936
    assert torch.equal(out[0, : enc["input_ids"].shape[1]], enc["input_ids"][0])


def test_resolve_model_and_slug(tmp_path, tiny_dir, monkeypatch):
    assert M.resolve_model(str(tiny_dir)) == str(tiny_dir)
    assert M.resolve_model("Qwen/Qwen3-4B") == "Qwen/Qwen3-4B"
    with pytest.raises(FileNotFoundError, match="not a directory"):
        M.resolve_model(str(tmp_path / "nope"))
    monkeypatch.setenv("VGROUT_MODELS_DIR", str(tiny_dir.parent))
    assert M.models_dir() == tiny_dir.parent
    assert M.resolve_model(M.TINY_QWEN3) == str(tiny_dir)  # reuses the valid build found there
    assert M.model_slug("Qwen/Qwen3-4B") == "Qwen--Qwen3-4B"
    assert M.model_slug(M.TINY_QWEN3) == "tiny-qwen3"
    local = M.model_slug(str(tiny_dir))
    assert local.startswith("tiny-qwen3-") and "/" not in local
    assert M.model_slug("weird name:with*chars") == "weird-name-with-chars"


def test_offline_hub_name_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="tiny-qwen3"):
        M.load_model_and_tokenizer("vgrout-no-such-org/no-such-model", "cpu")


def test_weights_digest_names_the_bytes_of_a_local_folder(tmp_path):
    """Equal for a byte-identical copy, different when one weight changes or a file is renamed,
    None for a hub name, an error for a folder with no weight files."""
    from safetensors.torch import save_file

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(d / "model.safetensors"))
        (d / "config.json").write_text("{}")
    (b / "config.json").write_text('{"other": 1}')  # not a weight file: ignored
    da = M.weights_digest(a)
    assert isinstance(da, str) and len(da) == 16 and da == M.weights_digest(str(b))
    save_file({"w": torch.arange(6.0).reshape(2, 3) + torch.tensor([0, 0, 1e-6])}, str(b / "model.safetensors"))
    assert M.weights_digest(b) != da
    (b / "model.safetensors").unlink()
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(b / "weights.safetensors"))
    assert M.weights_digest(b) != da  # same bytes, another file name
    assert M.weights_digest("Qwen/Qwen3-4B") is None
    (b / "weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors or \\*.bin weight files"):
        M.weights_digest(b)
