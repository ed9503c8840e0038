"""`bench make-synthetic`: one random-weight model, written once for every engine of `bench run`.

DIR/hf (bf16 Hugging Face layout, with the bundled tokenizer), DIR/flashmoe (the converter's checkpoint),
optionally DIR/mlx-lm (stock `mlx_lm.convert` at the same bits, the resident baseline) and DIR/gguf/model-TYPE.gguf
(llama.cpp's converter and quantizer, run by the llama-cpp-python interpreter: gguf.py), and DIR/synthetic.json
(what was asked). A step whose output is complete is not redone, so a run can be extended (say, --mlx-lm
later); different parameters over an existing DIR are refused. Memory stays near one layer throughout, except
mlx_lm.convert, which is mlx-lm's own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from ..synthetic import preset, write_hf_checkpoint

RECORD = "synthetic.json"
GGUF_SCRIPT = Path(__file__).with_name("gguf.py")


def make_synthetic(out: Path, shape_name: str, *, layers: int | None = None, bits: int = 4, router_skew: float = 0.0,
                   seed: int = 0, mlx_lm: bool = False, gguf: tuple[str, ...] = (), llama_python: str | None = None,
                   convert_script: Path | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    shape = preset(shape_name, layers)
    if gguf and not (llama_python and convert_script and Path(convert_script).is_file()):
        raise ValueError("--gguf needs --llama-python and --convert-script (an existing convert_hf_to_gguf.py)")
    if router_skew < 0:
        raise ValueError(f"--router-skew must be >= 0, not {router_skew}")
    precision = _precision(bits)
    record = {"shape": shape_name, "layers": shape.num_hidden_layers, "bits": bits, "router_skew": router_skew,
              "seed": seed, "config": asdict(shape), "layout": "qwen3_moe"}
    out = Path(out)
    if overwrite and out.exists():
        shutil.rmtree(out)
    if (out / RECORD).exists():
        old = json.loads((out / RECORD).read_text())
        if old != record:
            changed = next(k for k in record if old.get(k) != record[k])
            raise ValueError(f"{out}: holds a model made with another {changed} ({old.get(changed)}); "
                             f"use --overwrite or another directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / RECORD).write_text(json.dumps(record, indent=1) + "\n")

    hf = out / "hf"
    if not (hf / "config.json").exists():  # config.json is written last
        with tqdm(total=shape.num_hidden_layers + 1, desc=f"writing {hf}", unit="shard", disable=not progress) as bar:
            write_hf_checkpoint(hf, shape, seed=seed, router_skew=router_skew, tokenizer=True, progress=bar.update)
    from flashmoe_mlx.convert import convert

    if not (out / "flashmoe" / "config.json").exists():
        convert(out / "flashmoe", hf_path=str(hf), precision=precision, overwrite=True, progress=progress)
    if gguf:  # before mlx-lm: the Q8_0 intermediate is the largest file on disk at once
        subprocess.run([llama_python, str(GGUF_SCRIPT), str(convert_script), str(hf), str(out / "gguf"), *gguf],
                       check=True)
    if mlx_lm and not (out / "mlx-lm" / "config.json").exists():
        from mlx_lm.convert import convert as mlx_convert

        shutil.rmtree(out / "mlx-lm", ignore_errors=True)
        mlx_convert(str(hf), str(out / "mlx-lm"), quantize=True, q_bits=bits, q_group_size=precision.group_size)
    return record


def _precision(bits: int):
    """Experts at `bits`; attention and dense layers at `bits` too where the converter allows it (else 4),
    so that at 8 bits both converters quantize every module alike."""
    from flashmoe_mlx.convert import Precision
    from flashmoe_mlx.convert.quantization import DENSE_BITS

    return Precision.from_flags(bits=bits if bits in DENSE_BITS else 4, expert_bits=bits)
