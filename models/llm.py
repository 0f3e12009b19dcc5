"""Causal language models for the VLM stage: any local Hugging Face folder, or a tiny one built from a config.

    model, tokenizer = load_llm("tiny-llama")                 # tests: 2 layers, a tokenizer trained here
    model, tokenizer = load_llm("/models/vicuna-7b-v1.5")     # any transformers causal LM folder
    model, tokenizer = load_llm("smollm2-135m-instruct")      # the offline SmolLM2 (models/convert/gguf_llm.py)

The tiny tokenizers are trained here, deterministically, on a fixed corpus (the synthetic world's vocabulary
and the templates' words): `tiny-llama` imitates Llama's sentencepiece style (a "▁" word prefix, `<s>` added
in front, `</s>` = end of turn), `tiny-qwen2` Qwen2/SmolLM2's byte-level BPE (no BOS, `<|im_end|>` = end of
turn, and pad == eos as SmolLM2 ships).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

TINY_VOCAB = 1024


@dataclass(frozen=True)
class TinyLLM:
    family: str  # llama | qwen2 (transformers config class)
    tokenizer: str  # metaspace (Llama-style) | bytelevel (Qwen2 / SmolLM2-style)
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    max_positions: int = 1024


TINY_LLMS: dict[str, TinyLLM] = {
    "tiny-llama": TinyLLM("llama", "metaspace"),
    "tiny-qwen2": TinyLLM("qwen2", "bytelevel"),
}


def _corpus() -> list[str]:
    from data import synthetic as world

    words = [*world.SHAPES, *world.WORDS, *world.COLORS, *world.STYLES, *world.SIZES, *world.CAPTION_TEMPLATES]
    sentences = [
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions.",
        "You are a helpful assistant.",
        "USER: ASSISTANT: system user assistant",
        "Question: Options: A. B. C. D. Answer with the option's letter from the given choices directly.",
        "What shape is shown? How many objects are there? Which word is written? What colour is it? Where is it?",
        "Describe the image briefly. Give a short description. The image shows one two three four five.",
        "left right top bottom centre center middle larger smaller bigger tallest shortest bar chart table value row",
        "0 1 2 3 4 5 6 7 8 9 10 20 30 40 50 60 70 80 90 100 yes no the a an of in on is are with and",
    ]
    characters = "".join(chr(c) for c in range(32, 127)) + "\n\t"  # every printable ASCII character has a token
    return sentences * 20 + [" ".join(words)] * 20 + [w.capitalize() for w in words] * 5 + [characters]


def build_tiny_tokenizer(style: str):
    """A fast tokenizer (transformers `PreTrainedTokenizerFast`) trained on a fixed corpus: same files every time."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style == "metaspace":
        specials = ["<unk>", "<s>", "</s>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet: list[str] = []
    elif style == "bytelevel":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        raise ValueError(f"unknown tiny tokenizer style {style!r} (metaspace | bytelevel)")
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    if style == "metaspace":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                       model_max_length=TINY_LLMS["tiny-llama"].max_positions)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token=None, unk_token=None,
                                   model_max_length=TINY_LLMS["tiny-qwen2"].max_positions)


def build_tiny_llm(name: str, seed: int = 0, attn_implementation: str = "sdpa"):
    """(model, tokenizer) of a named tiny config; the weights are a function of the seed."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if name not in TINY_LLMS:
        raise ValueError(f"unknown tiny LLM {name!r}; choose from {', '.join(TINY_LLMS)} or give a model folder")
    spec = TINY_LLMS[name]
    tokenizer = build_tiny_tokenizer(spec.tokenizer)
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[spec.family]
    config = config_cls(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                        num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_positions,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=spec.family == "qwen2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model, tokenizer


def load_llm(spec: str, dtype: torch.dtype = torch.float32, seed: int = 0, cache_dir: str = "data_cache/llm",
             attn_implementation: str = "sdpa"):
    """(causal LM in training mode, fast tokenizer) from a tiny name, a model folder, a .gguf file or a known offline
    package name."""
    if spec in TINY_LLMS:
        model, tokenizer = build_tiny_llm(spec, seed, attn_implementation)
        return model.to(dtype), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(spec)
    if not (folder / "config.json").is_file():
        from models.convert.gguf_llm import ensure_llm

        folder = ensure_llm(spec, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: no usable tokenizer (tokenizer.json or tokenizer.model): "
                         f"{str(e).splitlines()[0]}") from None
    if not tokenizer.is_fast:
        raise ValueError(f"{folder}: the VLM stage needs a fast tokenizer (tokenizer.json) for its label masks")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    return model.train(), tokenizer  # from_pretrained leaves eval(): HF gradient checkpointing needs training mode
