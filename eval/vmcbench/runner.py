"""Run a Hugging Face VLM folder (LLaVA: `LlavaForConditionalGeneration` + its processor) on VMCBench questions.

    model, processor = load_vlm("runs/vlm/export/step_0001000", device="cuda")
    outputs = run_model(model, processor, questions, mode="both", batch_size=8, max_new_tokens=16)
    outputs.responses[0], outputs.logprobs[0]          # "B", {"A": -3.1, "B": -0.2, ...}

Each question is one user turn holding the image and the prompt, rendered by the model's own chat template
(`processor.apply_chat_template(..., add_generation_prompt=True)`); batches are left-padded; decoding is greedy.
Option likelihood: the log-probability of each letter as the single next token after the generation prompt
(taken from the first generation step in mode "both", from one forward pass in mode "likelihood").
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from tqdm import tqdm

from eval.vmcbench.data import CHOICES, Question, open_image
from eval.vmcbench.parse import build_prompt

MODES = ("generate", "likelihood", "both")


class VMCBenchModelError(ValueError):
    """A model folder that cannot be evaluated, explained in one line."""


@dataclass
class ModelOutputs:
    responses: Optional[list[str]]  # generated text per question (modes generate / both)
    logprobs: Optional[list[dict[str, float]]]  # letter -> next-token log-probability (modes likelihood / both)


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VMCBenchModelError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if device != "cpu" and not device.startswith("cuda"):
        raise VMCBenchModelError(f"unknown device {device!r} (auto | cpu | cuda | cuda:N)")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    choices = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in choices:
        raise VMCBenchModelError(f"unknown dtype {dtype!r} (auto | {' | '.join(choices)})")
    return choices[dtype]


def load_vlm(model_dir: Union[str, Path], device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, processor) from a Hugging Face image-text-to-text folder, in eval mode, left padding."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = Path(model_dir)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise VMCBenchModelError(f"{folder} is not a Hugging Face model folder (config.json: {e})")
    if "model_type" not in config:
        raise VMCBenchModelError(f"{folder / 'config.json'} has no model_type (expected a llava export)")
    try:
        processor = AutoProcessor.from_pretrained(folder)
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype)
    except Exception as e:  # transformers raises many kinds; one line names the folder
        raise VMCBenchModelError(f"cannot load {folder} ({type(e).__name__}: {' '.join(str(e).split())[:300]})")
    if getattr(processor, "chat_template", None) is None:
        raise VMCBenchModelError(f"{folder}: the processor has no chat template (chat_template.jinja)")
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token_id is None:
        raise VMCBenchModelError(f"{folder}: the tokenizer has no pad token (batched generation needs one)")
    return model.to(device).eval(), processor


def letter_token_ids(tokenizer) -> list[int]:
    """The token id of each letter A-D as the answer's first token; each must be one token, all distinct."""
    ids = []
    for letter in CHOICES:
        tokens = tokenizer.encode(letter, add_special_tokens=False)
        if len(tokens) != 1:
            raise VMCBenchModelError(f"the tokenizer splits {letter!r} into {len(tokens)} tokens: option likelihood "
                                     "needs single-token letters (use --mode generate)")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise VMCBenchModelError(f"letters A-D share token ids {ids}: option likelihood cannot tell them apart")
    return ids


def chat_prompt(processor, q: Question) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_prompt(q)}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


@torch.inference_mode()
def run_model(model, processor, questions: Sequence[Question], mode: str = "generate", batch_size: int = 8,
              max_new_tokens: int = 16, progress: bool = True) -> ModelOutputs:
    if mode not in MODES:
        raise VMCBenchModelError(f"unknown mode {mode!r} ({' | '.join(MODES)})")
    from transformers import GenerationConfig

    tokenizer = processor.tokenizer
    generate, likelihood = mode in ("generate", "both"), mode in ("likelihood", "both")
    letters = letter_token_ids(tokenizer) if likelihood else []
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else tokenizer.eos_token_id
    greedy = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos,
                              pad_token_id=tokenizer.pad_token_id, output_logits=likelihood,
                              return_dict_in_generate=True)
    responses: list[str] = []
    logprobs: list[dict[str, float]] = []
    bar = tqdm(total=len(questions), unit="q", desc=f"VMCBench {mode}", disable=not progress)
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        inputs = processor(images=[open_image(q) for q in batch], text=[chat_prompt(processor, q) for q in batch],
                           return_tensors="pt", padding=True).to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        if generate:
            out = model.generate(**inputs, generation_config=greedy)
            new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
            responses += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            first_logits = out.logits[0] if likelihood else None  # (B, V): raw logits of the first new token
        else:
            first_logits = model(**inputs).logits[:, -1]  # left padding: the last position is the prompt's end
        if likelihood:
            scores = torch.log_softmax(first_logits.float(), dim=-1)[:, letters].cpu()  # (B, 4)
            logprobs += [dict(zip(CHOICES, row.tolist())) for row in scores]
        bar.update(len(batch))
    bar.close()
    return ModelOutputs(responses if generate else None, logprobs if likelihood else None)
