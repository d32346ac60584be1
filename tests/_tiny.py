"""Small real models for tests: random Qwen3 configs built directly (fast), and the offline
tiny Qwen3 with the real vocabulary (built once per test session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """`VGROUT_DATA_DIR`, else `<repo>/../shared/data`."""
    env = os.environ.get("VGROUT_DATA_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def require_data(*parts: str) -> Path:
    """The data path, or skip the test with the reason when it is absent."""
    path = data_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"needs reference data at {path} (set VGROUT_DATA_DIR or provide ../shared/data)"
        )
    return path


def random_qwen3(
    *,
    seed: int = 0,
    vocab_size: int = 97,
    hidden_size: int = 32,
    intermediate_size: int = 48,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
) -> torch.nn.Module:
    """A seeded random fp32 Qwen3ForCausalLM (eval mode, sdpa). intermediate != hidden so
    the MLP projections are non-square (r = min(d_in, d_out) is exercised both ways)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model.float().eval()
