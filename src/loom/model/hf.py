"""Hugging Face interop: HF GPT-2 / Llama configs and tensors to loom's and back (folders: ``loom.train.convert``).

Tensor names, loom <- HF (``i`` is the layer; HF names may carry the ``transformer.``
(GPT-2) or ``model.`` (Llama) prefix that ``*ForCausalLM`` / ``GPT2LMHeadModel`` save;
``lm_head.weight`` never has one):

GPT-2 (HF Conv1D weights are (in, out), loom Linear weights (out, in): marked T, transposed)
    tok_emb.weight, pos_emb.weight      wte.weight, wpe.weight
    blocks.i.attn_norm.*                h.i.ln_1.*
    blocks.i.attn.{q,k,v}_proj.*        h.i.attn.c_attn.*   fused along out as [q | k | v], T
    blocks.i.attn.o_proj.*              h.i.attn.c_proj.*   T
    blocks.i.mlp_norm.*                 h.i.ln_2.*
    blocks.i.mlp.up_proj.*              h.i.mlp.c_fc.*      T
    blocks.i.mlp.down_proj.*            h.i.mlp.c_proj.*    T
    final_norm.*                        ln_f.*
Llama (same layouts, nothing transposed)
    tok_emb.weight                      embed_tokens.weight
    blocks.i.attn_norm.weight           layers.i.input_layernorm.weight
    blocks.i.attn.{q,k,v,o}_proj.*      layers.i.self_attn.{q,k,v,o}_proj.*
    blocks.i.mlp_norm.weight            layers.i.post_attention_layernorm.weight
    blocks.i.mlp.{gate,up,down}_proj.*  layers.i.mlp.{gate,up,down}_proj.*
    final_norm.weight                   norm.weight
Both: ``lm_head.weight`` <-> ``lm_head.weight`` when untied. When tied, loom has no
lm_head and HF files omit it (HF ties it to the embedding on load); one found in an HF
file is ignored. HF's non-parameter buffers (GPT-2 ``attn.bias``/``attn.masked_bias``,
old Llama ``rotary_emb.inv_freq``) are ignored.

Invariant: ``state_dict_to_hf(state_dict_from_hf(s, cfg), cfg)`` equals ``s`` bitwise (up
to the ignored names); transposes, splits and concatenations move bits, never round them,
and dtypes are kept as stored.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from loom.config import ModelConfig
from loom.errors import LoomError
from loom.model.transformer import Transformer

_PREFIX = {"gpt2": "transformer.", "llama": "model."}
_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)|layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # loom's GPT-2 MLP: tanh-approximate GELU


# ----------------------------------------------------------------------------- configs


def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """A validated loom ModelConfig (preset "custom", every field set) from an HF config.json dict."""
    kind = hf_config.get("model_type")
    if kind == "gpt2":
        cfg = _gpt2_config(hf_config)
    elif kind == "llama":
        cfg = _llama_config(hf_config)
    else:
        raise LoomError(
            f"Hugging Face model_type {kind!r} is not supported.",
            "loom imports model_type 'gpt2' and 'llama'; pick a checkpoint of one of those architectures.",
        )
    cfg.validate()
    return cfg


def _gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    _refuse(act not in _TANH_GELUS, f"activation_function = {act!r}", "loom's GPT-2 MLP uses tanh-approximate GELU")
    _refuse(
        not hf.get("scale_attn_weights", True), "scale_attn_weights = false", "loom scales scores by 1/sqrt(head_dim)"
    )
    _refuse(
        hf.get("scale_attn_by_inverse_layer_idx", False),
        "scale_attn_by_inverse_layer_idx",
        "loom scales all layers alike",
    )
    _refuse(hf.get("add_cross_attention", False), "add_cross_attention = true", "loom models are decoder-only")
    d_model = _need(hf, "n_embd")
    return ModelConfig(
        preset="custom",
        family="gpt2",
        n_layers=_need(hf, "n_layer"),
        d_model=d_model,
        n_heads=_need(hf, "n_head"),
        n_kv_heads=None,
        d_ff=hf.get("n_inner") or 4 * d_model,
        vocab_size=_need(hf, "vocab_size"),
        max_seq_len=_need(hf, "n_positions"),
        dropout=float(hf.get("resid_pdrop", 0.1)),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        rope_theta=10000.0,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bias=True,
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def _llama_config(hf: dict[str, Any]) -> ModelConfig:
    d_model, n_heads = _need(hf, "hidden_size"), _need(hf, "num_attention_heads")
    act, head_dim = hf.get("hidden_act", "silu"), hf.get("head_dim")
    _refuse(act != "silu", f"hidden_act = {act!r}", "loom's Llama MLP is SwiGLU (silu)")
    _refuse(
        head_dim is not None and head_dim * n_heads != d_model,
        f"head_dim = {head_dim} with hidden_size = {d_model} and num_attention_heads = {n_heads}",
        "loom's head dimension is always hidden_size / num_attention_heads",
    )
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    _refuse(
        attn_bias != mlp_bias, f"attention_bias = {attn_bias} with mlp_bias = {mlp_bias}", "loom has one bias switch"
    )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _refuse(
        rope_type not in ROPE_TYPES,
        f"rope scaling {rope_type!r}",
        "loom implements plain RoPE and the linear and llama3 scalings",
    )
    _refuse(rope.get("partial_rotary_factor", 1.0) != 1.0, "partial_rotary_factor", "loom rotates the whole head")
    _refuse(rope.get("attention_factor") not in (None, 1.0), "rope attention_factor", "loom does not rescale attention")
    scaling = {}
    if rope_type != "default":
        scaling = {"rope_scaling": ROPE_TYPES[rope_type], "rope_factor": float(_need(rope, "factor"))}
    if rope_type == "llama3":
        scaling |= {
            "rope_low_freq_factor": float(_need(rope, "low_freq_factor")),
            "rope_high_freq_factor": float(_need(rope, "high_freq_factor")),
            "rope_original_max_seq_len": int(_need(rope, "original_max_position_embeddings")),
        }
    return ModelConfig(
        preset="custom",
        family="llama",
        n_layers=_need(hf, "num_hidden_layers"),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_ff=_need(hf, "intermediate_size"),
        vocab_size=_need(hf, "vocab_size"),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        dropout=float(hf.get("attention_dropout", 0.0)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        **scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bias=attn_bias,
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The HF config.json dict (``transformers.AutoConfig.for_model(**d)`` accepts it) for ``cfg``."""
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tied, "initializer_range": cfg.init_std}
    _refuse(
        cfg.attention != "dense",
        f"model.attention = {cfg.attention!r}",
        "Hugging Face GPT-2 and Llama attend densely, so the exported model would compute something else",
        where="export",
        fix="export a model trained with model.attention = 'dense', or keep the loom checkpoint",
    )
    if cfg.family == "gpt2":
        _refuse(
            not cfg.use_bias,
            "a gpt2-family model with bias = false",
            "Hugging Face GPT-2 always has biases",
            where="export",
            fix="train with model.bias = true, or use family = 'llama'",
        )
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "n_layer": cfg.n_layers,
            "n_embd": cfg.d_model,
            "n_head": cfg.n_heads,
            "n_inner": cfg.ffn_dim,
            "n_positions": cfg.max_seq_len,
            "n_ctx": cfg.max_seq_len,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new",
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            **common,
        }
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": cfg.n_layers,
        "hidden_size": cfg.d_model,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        # rope_theta (and rope_scaling) for transformers 4.x, rope_parameters for 5.x.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, **_rope_to_hf(cfg)},
        **({"rope_scaling": _rope_to_hf(cfg)} if cfg.rope_scaling != "none" else {}),
        "max_position_embeddings": cfg.max_seq_len,
        "attention_bias": cfg.use_bias,
        "mlp_bias": cfg.use_bias,
        "attention_dropout": cfg.dropout,
        **common,
    }


ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}  # HF rope_type -> model.rope_scaling


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.rope_scaling == "none":
        return {"rope_type": "default"}
    out: dict[str, Any] = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_factor}
    if cfg.rope_scaling == "llama3":
        out |= {
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len,
        }
    return out


def _need(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise LoomError(
            f"the Hugging Face config has no {key!r}.", "use the config.json save_pretrained wrote with the weights."
        )
    return hf[key]


def _refuse(bad: bool, feature: str, why: str, where: str = "import", fix: str = "") -> None:
    if bad:
        fix = fix or "use a checkpoint without this feature; loom cannot reproduce it exactly."
        raise LoomError(f"cannot {where} {feature}: {why}.", fix)


# ----------------------------------------------------------------------------- tensor names


def _name_table(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
    """loom name -> (HF name without prefix, transposed?) for all tensors but GPT-2's fused qkv."""
    suffixes = ("weight", "bias") if cfg.use_bias else ("weight",)
    table: dict[str, tuple[str, bool]] = {}
    if cfg.family == "gpt2":
        table |= {"tok_emb.weight": ("wte.weight", False), "pos_emb.weight": ("wpe.weight", False)}
        # (loom module, HF module, is a Conv1D whose weight is stored transposed)
        modules = [
            ("attn_norm", "ln_1", False),
            ("attn.o_proj", "attn.c_proj", True),
            ("mlp_norm", "ln_2", False),
            ("mlp.up_proj", "mlp.c_fc", True),
            ("mlp.down_proj", "mlp.c_proj", True),
        ]
        for i in range(cfg.n_layers):
            for loom, hf, conv1d in modules:
                table |= {f"blocks.{i}.{loom}.{s}": (f"h.{i}.{hf}.{s}", conv1d and s == "weight") for s in suffixes}
        table |= {f"final_norm.{s}": (f"ln_f.{s}", False) for s in suffixes}
    else:
        table["tok_emb.weight"] = ("embed_tokens.weight", False)
        for i in range(cfg.n_layers):
            table[f"blocks.{i}.attn_norm.weight"] = (f"layers.{i}.input_layernorm.weight", False)
            table[f"blocks.{i}.mlp_norm.weight"] = (f"layers.{i}.post_attention_layernorm.weight", False)
            projections = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
            for hf in projections:
                loom = hf.replace("self_attn.", "attn.")
                table |= {f"blocks.{i}.{loom}.{s}": (f"layers.{i}.{hf}.{s}", False) for s in suffixes}
        table["final_norm.weight"] = ("norm.weight", False)
    if not cfg.tied:
        table["lm_head.weight"] = ("lm_head.weight", False)
    return table


def _fused_qkv(cfg: ModelConfig) -> list[tuple[str, list[str]]]:
    """GPT-2's (HF c_attn name, [loom q, k, v names]) pairs; none for Llama."""
    if cfg.family != "gpt2":
        return []
    suffixes = ("weight", "bias") if cfg.use_bias else ("weight",)
    return [
        (f"h.{i}.attn.c_attn.{s}", [f"blocks.{i}.attn.{p}_proj.{s}" for p in "qkv"])
        for i in range(cfg.n_layers)
        for s in suffixes
    ]


def _hf_key(name: str, cfg: ModelConfig) -> str:
    return name if name == "lm_head.weight" else _PREFIX[cfg.family] + name


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """loom state dict from HF tensors (prefixed or not); missing or unknown names -> LoomError."""
    prefix = _PREFIX[cfg.family]
    hf = {k.removeprefix(prefix): v for k, v in hf_state.items() if not _BUFFERS.fullmatch(k.removeprefix(prefix))}
    if cfg.tied:
        hf.pop("lm_head.weight", None)
    out: dict[str, torch.Tensor] = {}
    used = set()
    for loom, (name, transposed) in _name_table(cfg).items():
        out[loom] = _take(hf, name, used).t().contiguous() if transposed else _take(hf, name, used)
    for name, qkv in _fused_qkv(cfg):
        fused = _take(hf, name, used)
        # Weight (in, 3d): split the out dim, transpose each; bias (3d,): split, clone to unshare storage.
        parts = fused.split(cfg.d_model, dim=-1)
        out |= {k: (p.t().contiguous() if p.dim() == 2 else p.clone()) for k, p in zip(qkv, parts)}
    unknown = sorted(set(hf) - used)
    if unknown:
        raise LoomError(
            f"the Hugging Face weights hold tensors a loom {cfg.family} model has no place for: {', '.join(unknown[:8])}.",
            "import a plain causal-LM checkpoint (GPT2LMHeadModel / LlamaForCausalLM) matching its config.json.",
        )
    return out


def _take(hf: dict[str, torch.Tensor], name: str, used: set[str]) -> torch.Tensor:
    if name not in hf:
        raise LoomError(
            f"the Hugging Face weights lack {name!r}.",
            "check that the weights and config.json belong to the same model.",
        )
    used.add(name)
    return hf[name]


def state_dict_to_hf(loom_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors, named as ``*ForCausalLM.save_pretrained`` names them; exact inverse of state_dict_from_hf."""
    out = {
        _hf_key(name, cfg): (loom_state[loom].t().contiguous() if transposed else loom_state[loom])
        for loom, (name, transposed) in _name_table(cfg).items()
    }
    for name, qkv in _fused_qkv(cfg):
        parts = [loom_state[k] for k in qkv]
        out[_hf_key(name, cfg)] = torch.cat([p.t() for p in parts], dim=1) if parts[0].dim() == 2 else torch.cat(parts)
    return out


def check_loads(state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Raise a LoomError unless ``state`` has exactly the names and shapes of a loom model of ``cfg``."""
    try:
        # on the meta device nothing is allocated or drawn: this checks names and shapes only
        Transformer(cfg, device="meta").load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise LoomError(
            f"the weights do not fit a loom model with this config: {exc}",
            "check that weights and config belong together.",
        ) from None
