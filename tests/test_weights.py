"""Checkpoint loading: sharded files, dtypes, and every way a folder can be wrong."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import specoff
from specoff import CheckpointError, UnsupportedModelError


def copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_sharded_equals_single_file(make_checkpoint):
    single = make_checkpoint("qwen3_moe")
    sharded = make_checkpoint("qwen3_moe", max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    a, b = specoff.load_model(single, "cpu"), specoff.load_model(sharded, "cpu")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name


def test_tied_head_is_the_embedding(make_checkpoint):
    model = specoff.load_model(make_checkpoint("qwen3", tie=True), "cpu")
    assert model.output.weight is model.tok_embeddings.weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(dtype, make_checkpoint):
    model = specoff.load_model(make_checkpoint("mixtral"), "cpu", dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_missing_tensor(make_checkpoint, tmp_path):
    path = copy(make_checkpoint("llama"), tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight is missing"):
        specoff.load_model(path, "cpu")


def test_unexpected_tensor(make_checkpoint, tmp_path):
    path = copy(make_checkpoint("llama"), tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError,
                       match=r"unexpected tensor model\.layers\.0\.mlp\.extra\.weight in .*model\.safetensors"):
        specoff.load_model(path, "cpu")


def test_wrong_shape(make_checkpoint, tmp_path):
    path = copy(make_checkpoint("mixtral"), tmp_path)
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.0.block_sparse_moe.experts.1.w3.weight"
    tensors[name] = tensors[name][:-1]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{name} in .*model\.safetensors has shape \[127, 64\], "
                                              r"the config implies \[128, 64\]"):
        specoff.load_model(path, "cpu")


def test_truncated_file(make_checkpoint, tmp_path):
    path = copy(make_checkpoint("llama"), tmp_path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        specoff.load_model(path, "cpu")


def test_missing_shard(make_checkpoint, tmp_path):
    path = copy(make_checkpoint("llama", max_shard_size="40KB"), tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name} is listed .* but missing"):
        specoff.load_model(path, "cpu")


def test_no_weights_and_no_config(make_checkpoint, tmp_path):
    path = copy(make_checkpoint("llama"), tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        specoff.load_model(path, "cpu")
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        specoff.load_model(tmp_path / "nowhere", "cpu")


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "gpt2"}, r"model_type 'gpt2' is not supported; supported: llama, mistral, "
                             r"mixtral, qwen2, qwen3, qwen3_moe"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope scaling of type 'yarn' is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true is not supported"),
])
def test_unsupported_config(changes, message, make_checkpoint, tmp_path):
    path = copy(make_checkpoint("llama"), tmp_path)
    edit_config(path, **changes)
    with pytest.raises(UnsupportedModelError, match=message):
        specoff.load_model(path, "cpu")


def test_qwen3_moe_dense_layers_are_refused(make_checkpoint, tmp_path):
    path = copy(make_checkpoint("qwen3_moe"), tmp_path)
    edit_config(path, mlp_only_layers=[1])
    with pytest.raises(UnsupportedModelError, match="mlp_only_layers"):
        specoff.load_model(path, "cpu")


def test_sliding_window_shorter_than_the_context(make_checkpoint, tmp_path):
    path = copy(make_checkpoint("mistral"), tmp_path)
    edit_config(path, sliding_window=32)
    llm = specoff.LLM(path, device="cpu")  # loads: short contexts are exact
    assert len(llm.generate([[5] * 10], specoff.SamplingParams(max_new_tokens=8))) == 1
    with pytest.raises(UnsupportedModelError, match=r"sliding-window attention \(window 32\) is "
                                                    r"not implemented.*40 tokens"):
        llm.generate([[5] * 30], specoff.SamplingParams(max_new_tokens=10))


def test_tokenizer_comes_from_the_folder(make_checkpoint, tokenizer):
    tok = specoff.load_tokenizer(make_checkpoint("qwen2"))
    assert tok("def f(x):")["input_ids"] == tokenizer("def f(x):")["input_ids"]
