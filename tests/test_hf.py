"""Hugging Face interop: logits parity with transformers, bitwise round trips, user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from loom.config import config_from_dict
from loom.errors import LoomError
from loom.model.hf import config_from_hf, state_dict_from_hf, state_dict_to_hf
from loom.model.transformer import Transformer
from loom.train.checkpoint import load_checkpoint
from loom.train.convert import export_hf, import_hf

transformers = pytest.importorskip("transformers")

torch.set_num_threads(2)
VOCAB = 100


def gpt2(tied: bool = True):
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=64,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=tied,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def llama(tied: bool, kv_heads: int = 2, bias: bool = False, rope: dict | None = None):
    extra = {"rope_parameters": {"rope_theta": 500000.0, **rope}} if rope else {"rope_theta": 500000.0}
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=kv_heads,
            intermediate_size=96,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            tie_word_embeddings=tied,
            attention_bias=bias,
            mlp_bias=bias,
            bos_token_id=0,
            eos_token_id=1,
            **extra,
        )
    )


# Llama 3.1's frequency scaling, with a trained context (16) shorter than the test's sequence (48) so
# that every band (kept, blended, interpolated) of the head's frequencies occurs
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


MODELS = {
    "gpt2": lambda: gpt2(),
    "gpt2-untied": lambda: gpt2(tied=False),
    "llama-gqa": lambda: llama(tied=False),
    "llama-tied": lambda: llama(tied=True),
    "llama-mha-bias": lambda: llama(tied=False, kv_heads=4, bias=True),
    "llama3-rope-scaling": lambda: llama(tied=False, rope=LLAMA3_ROPE),
    "llama-linear-rope": lambda: llama(tied=False, rope={"rope_type": "linear", "factor": 2.0}),
}


def save_hf(name: str, folder: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    with torch.no_grad():  # HF zero-inits biases and sets norms to one; randomise them so the mapping is tested
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname or "ln_" in pname:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return model


def hf_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", list(MODELS))
def test_import_matches_transformers_and_round_trips(tmp_path: Path, name: str) -> None:
    hf_dir, run, out = tmp_path / "hf", tmp_path / "run", tmp_path / "export"
    model = save_hf(name, hf_dir)
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    want = hf_logits(model, ids)

    path = import_hf(hf_dir, run)
    ckpt = load_checkpoint(run)
    assert ckpt.path == path and ckpt.step == 0
    config = config_from_dict(ckpt.meta["config"])
    assert config.data.tokenizer == "byte" and "note" in ckpt.meta["source"]
    loom = Transformer(config.model).eval()
    loom.load_state_dict(ckpt.model_state, strict=True)
    with torch.no_grad():
        got = loom(ids)
    assert (got - want).abs().max().item() <= 1e-5

    export_hf(run, out)
    original = safetensors.torch.load_file(hf_dir / "model.safetensors")
    exported = safetensors.torch.load_file(out / "model.safetensors")
    assert exported.keys() == original.keys()
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(hf_logits(reloaded, ids), want)


def test_state_dict_mapping_is_exact_inverse() -> None:
    torch.manual_seed(0)
    for name in ("gpt2", "llama-gqa"):
        model = MODELS[name]()
        cfg = config_from_hf(model.config.to_dict())
        hf_state = {k: v for k, v in model.state_dict().items() if not (cfg.tied and k == "lm_head.weight")}
        back = state_dict_to_hf(state_dict_from_hf(hf_state, cfg), cfg)
        assert back.keys() == hf_state.keys()
        assert all(torch.equal(back[k], v) for k, v in hf_state.items())
        unprefixed = {k.split(".", 1)[1] if k != "lm_head.weight" else k: v for k, v in hf_state.items()}
        assert state_dict_from_hf(unprefixed, cfg).keys() == state_dict_from_hf(hf_state, cfg).keys()


def test_mapping_ignores_hf_buffers_and_keeps_dtype() -> None:
    torch.manual_seed(0)
    model = gpt2()
    cfg = config_from_hf(model.config.to_dict())
    hf_state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    buffers = {
        "transformer.h.0.attn.bias": torch.ones(1, 1, 64, 64),
        "transformer.h.1.attn.masked_bias": torch.tensor(-1e4),
    }
    with_buffers = {**hf_state, **buffers}
    loom = state_dict_from_hf(with_buffers, cfg)
    assert all(t.dtype == torch.bfloat16 for t in loom.values())
    back = state_dict_to_hf(loom, cfg)
    assert back.keys() == hf_state.keys() and all(torch.equal(back[k], v) for k, v in hf_state.items())
    with pytest.raises(LoomError, match="no place"):
        state_dict_from_hf({**hf_state, "score.weight": torch.zeros(2, 64)}, cfg)
    del hf_state["transformer.ln_f.bias"]
    with pytest.raises(LoomError, match="ln_f.bias"):
        state_dict_from_hf(hf_state, cfg)


def test_imports_sharded_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = llama(tied=False).eval()
    model.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    import_hf(tmp_path / "hf", tmp_path / "run")
    loom = Transformer(config_from_dict(load_checkpoint(tmp_path / "run").meta["config"]).model).eval()
    loom.load_state_dict(load_checkpoint(tmp_path / "run").model_state)
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert (loom(ids) - model(ids).logits).abs().max().item() <= 1e-5


def test_tokenizer_is_copied_both_ways(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    hf_dir = tmp_path / "hf"
    save_hf("gpt2", hf_dir)
    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.save(str(hf_dir / "tokenizer.json"))
    import_hf(hf_dir, tmp_path / "run")
    meta = load_checkpoint(tmp_path / "run").meta
    copied = tmp_path / "run" / "tokenizer.json"
    assert meta["config"]["data"]["tokenizer"] == str(copied.resolve()) and copied.is_file()
    export_hf(tmp_path / "run", tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == 0


def test_rejects_unsupported_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(LoomError, match="mistral"):
        import_hf(tmp_path, tmp_path / "run")


def test_reads_llama3_rope_and_rejects_other_scalings_and_odd_head_dim() -> None:
    base = {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "intermediate_size": 96,
        "vocab_size": VOCAB,
    }
    assert config_from_hf(base).rope_theta == 10000.0
    llama3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    with pytest.raises(LoomError, match="original_max_position_embeddings"):  # an incomplete llama3 entry
        config_from_hf({**base, "rope_parameters": llama3})
    cfg = config_from_hf({**base, "rope_parameters": {**llama3, "original_max_position_embeddings": 8192}})
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_seq_len) == ("llama3", 8.0, 8192)
    with pytest.raises(LoomError, match="yarn"):
        config_from_hf({**base, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(LoomError, match="head_dim"):
        config_from_hf({**base, "head_dim": 32})


def test_rejects_pickle_only_folder(tmp_path: Path) -> None:
    model = gpt2()
    model.config.to_json_file(tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(LoomError, match="safe_serialization"):
        import_hf(tmp_path, tmp_path / "run")


def test_rejects_missing_folder_and_config(tmp_path: Path) -> None:
    with pytest.raises(LoomError, match="does not exist"):
        import_hf(tmp_path / "nowhere", tmp_path / "run")
    save_hf("gpt2", tmp_path / "hf")
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(LoomError, match="config.json"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_export_rejects_gpt2_without_bias(tmp_path: Path) -> None:
    from dataclasses import asdict

    from loom.config import ModelConfig
    from loom.train.checkpoint import save_checkpoint

    cfg = ModelConfig(
        preset="custom", family="gpt2", n_layers=1, d_model=32, n_heads=2, vocab_size=VOCAB, max_seq_len=64, bias=False
    )
    state = Transformer(cfg).state_dict()
    save_checkpoint(
        tmp_path / "run", 1, state, {}, {"config": {"model": asdict(cfg), "train": {"seq_len": 64}}}, keep=1
    )
    with pytest.raises(LoomError, match="bias"):
        export_hf(tmp_path / "run", tmp_path / "out")


def test_cli_convert_both_ways_then_generate(tmp_path: Path, capsys) -> None:
    from loom.cli import main

    save_hf("llama-gqa", tmp_path / "hf")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "loom")]) == 0
    # no tokenizer.json in the HF folder: the byte tokenizer does not fit a 100-token vocabulary
    assert main(["generate", str(tmp_path / "loom"), "--tokens", "5"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert main(["convert", "--to-hf", str(tmp_path / "loom"), "--out", str(tmp_path / "back")]) == 0
    original = safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors")
    back = safetensors.torch.load_file(tmp_path / "back" / "model.safetensors")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    assert main(["convert", "--from-hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "fix:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("items", "match"),
    [
        (['model.rope_scaling="yarn"'], "model.rope_scaling = 'yarn'"),
        (['model.rope_scaling="llama3"'], "applies to the llama family"),
        (['model.family="llama"', 'model.rope_scaling="linear"', "model.rope_factor=0.5"], "below 1"),
        (
            [
                'model.family="llama"',
                'model.rope_scaling="llama3"',
                "model.rope_low_freq_factor=4",
                "model.rope_high_freq_factor=1",
            ],
            "0 < low < high",
        ),
    ],
)
def test_bad_rope_scaling_settings_name_the_field(items: list[str], match: str) -> None:
    from loom.config import load_config

    with pytest.raises(LoomError, match=match):
        load_config(None, items)
