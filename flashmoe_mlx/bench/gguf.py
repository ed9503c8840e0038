"""GGUF copies of a make-synthetic model for the llama.cpp engines, run by the interpreter that has
llama-cpp-python: `PYTHON gguf.py CONVERT_SCRIPT HF_DIR OUT_DIR TYPE...` (TYPE: Q4_0, Q8_0, ...).

llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python sdist; not part of this project) writes Q8_0;
other types are requantized from it with `llama_model_quantize`. The converter recognizes BPE pre-tokenizers by
hashing known ones; the bundled tokenizer is plain byte-level BPE with the GPT-2 split, so it is declared
"gpt-2" (its ids match the HF tokenizer's).
"""

from __future__ import annotations

import ctypes
import runpy
import sys
from pathlib import Path


def convert(script: Path, hf: Path, out: Path):
    sys.path.insert(0, str(script.parent))
    import conversion.base  # llama.cpp's converter package, beside its script

    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    sys.argv = [str(script), str(hf), "--outtype", "q8_0", "--outfile", str(out)]
    runpy.run_path(str(script), run_name="__main__")


def quantize(src: Path, dst: Path, kind: str):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.allow_requantize = True  # from Q8_0: the bf16 source would need twice the disk
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"error: llama_model_quantize {src} -> {dst} ({kind}) failed")


def main():
    script, hf, out, *kinds = (Path(a) for a in sys.argv[1:])
    out.mkdir(parents=True, exist_ok=True)
    q8 = out / "model-Q8_0.gguf"
    if not q8.exists():
        partial = q8.with_suffix(".partial")
        convert(script, hf, partial)
        partial.rename(q8)
    for kind in (str(k) for k in kinds):
        if kind.upper() != "Q8_0" and not (out / f"model-{kind}.gguf").exists():
            quantize(q8, out / f"model-{kind}.gguf", kind)
    if "Q8_0" not in (str(k).upper() for k in kinds):
        q8.unlink()


if __name__ == "__main__":
    main()
