"""load_causal_lm: tiny random decoders, the padding token choice, and the GGUF conversion cache."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tl_lightning.backbones.hf_decoder import convert_gguf, load_causal_lm, set_pad_token, smollm2_gguf


def test_tiny_llama_loads_with_tied_head_and_distinct_pad(tiny_llama):
    model, tokenizer = load_causal_lm(str(tiny_llama))
    assert model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token
    assert model.config.pad_token_id == tokenizer.pad_token_id == model.generation_config.pad_token_id


def test_pad_token_falls_back_to_eos_only_without_unk(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.unk_token = None
    tokenizer.pad_token = None
    set_pad_token(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token


def test_missing_gguf_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        load_causal_lm(str(tmp_path), gguf_file="nothing.gguf", cache_dir=tmp_path)


def _tiny_gguf(tiny_llama: Path, out: Path) -> Path:
    """Write the tiny Llama as an F32 GGUF file with the ``gguf`` package's writer."""
    import gguf
    from safetensors.torch import load_file

    config = json.loads((tiny_llama / "config.json").read_text())
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    real = smollm2_gguf()
    reader = gguf.GGUFReader(str(real))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
        field = reader.fields[key]
        writer.add_string(key, bytes(field.parts[field.data[0]]).decode())
    tokens = reader.fields["tokenizer.ggml.tokens"]
    writer.add_token_list([bytes(tokens.parts[i]).decode() for i in tokens.data])
    merges = reader.fields["tokenizer.ggml.merges"]
    writer.add_token_merges([bytes(merges.parts[i]).decode() for i in merges.data])
    types = reader.fields["tokenizer.ggml.token_type"]
    writer.add_token_types([int(types.parts[i][0]) for i in types.data])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    state = load_file(tiny_llama / "model.safetensors")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for i in range(config["num_hidden_layers"]):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    for name, tensor in state.items():
        if name not in names:
            continue
        array = tensor.float()
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's rotary layout, undone on load
            n = heads if "q_proj" in name else kv
            array = array.reshape(n, 2, array.shape[0] // n // 2, *array.shape[1:]).swapaxes(1, 2)
            array = array.reshape(tensor.shape)
        writer.add_tensor(names[name], array.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.mark.slow
def test_gguf_converts_once_atomically_and_matches_the_source(tiny_llama, tmp_path):
    gguf_path = _tiny_gguf(tiny_llama, tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    # two converters at once (threads: the race is in the file system): both get the same complete
    # folder, no temporary folder is left
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: str(convert_gguf(gguf_path, cache)), range(2)))
    assert folders[0] == folders[1]
    assert [p.name for p in cache.iterdir()] == [Path(folders[0]).name]
    stamp = (Path(folders[0]) / "model.safetensors").stat().st_mtime_ns
    model, tokenizer = load_causal_lm(str(tmp_path), gguf_file="tiny.gguf", cache_dir=cache)
    assert (Path(folders[0]) / "model.safetensors").stat().st_mtime_ns == stamp  # read, not converted again
    assert not hasattr(model.config, "quantization_config")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference, _ = load_causal_lm(str(tiny_llama))
    ids = torch.tensor([tokenizer("a small test of the conversion").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, reference.eval()(ids).logits)
