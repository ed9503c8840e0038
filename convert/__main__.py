"""Command line of the converter: `python -m flashmoe_mlx.convert --hf-path SRC --out DST` and friends."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from flashmoe_mlx.architecture import UnsupportedModel
from flashmoe_mlx.format import FormatError, read_manifest, verify_checkpoint

from .calibration import WINDOW, CalibrationError, CalibrationText
from .pipeline import ConvertError, convert
from .quantization import DENSE_BITS, EXPERT_BITS, GROUP_SIZES, RECIPES, ROUTER_BITS, Precision, QuantizationError
from .sources import SourceError
from .staging import OutputError

USER_ERRORS = (ConvertError, SourceError, QuantizationError, UnsupportedModel, OutputError, FormatError, CalibrationError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flashmoe_mlx.convert",
        description="Convert a Hugging Face checkpoint (quantizing) or repack an mlx-lm quantized checkpoint "
        "(bit for bit) into a flashmoe checkpoint whose routed experts stream from disk.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--hf-path", metavar="SRC", help="local HF safetensors directory or hub repo id (bf16/fp16/fp32/FP8)")
    src.add_argument("--mlx-path", metavar="SRC", help="mlx-lm / mlx-community quantized checkpoint to repack, no requantization")
    src.add_argument("--verify", metavar="DST", help="check a flashmoe checkpoint's manifest and every record checksum")
    p.add_argument("--out", metavar="DST", help="output directory (written as DST.partial, renamed when complete)")
    p.add_argument("--recipe", choices=RECIPES, default=None,
                   help="expert precision: 4bit (default) = experts 4-bit; 3bit = experts 3-bit with down_proj 4-bit; "
                   "2bit = experts 2-bit with down_proj 4-bit (LOSSY: degrades output noticeably)")
    p.add_argument("--expert-bits", type=int, choices=EXPERT_BITS, default=None,
                   help="bits for every routed-expert projection (instead of --recipe)")
    p.add_argument("--bits", type=int, choices=DENSE_BITS, default=4,
                   help="bits for attention and dense layers (default 4); embeddings and lm_head get max(bits, 6)")
    p.add_argument("--router-bits", type=int, choices=ROUTER_BITS, default=8,
                   help="bits for routers and shared-expert gates; 16 keeps them unquantized (default 8)")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64, help="quantization group size (default 64)")
    p.add_argument("--search", action="store_true",
                   help="experts: search each group's scale and bias for the least squared error (about 20%% lower "
                        "error than round-to-nearest; ~2 s per 4096x1024 matrix on a 2-core CPU; not bit-identical to "
                        "mlx_lm.convert)")
    p.add_argument("--calibrate", metavar="TEXT",
                   help="experts: GPTQ on this UTF-8 text's activations (text like what the model will read; it "
                        "never leaves the machine); a third to a half less KL divergence than round-to-nearest, and the "
                        "slowest option")
    p.add_argument("--calibrate-tokens", type=int, default=None, metavar="N",
                   help=f"tokens of the --calibrate text to use, in windows of {WINDOW} (default {CalibrationText.tokens})")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="dtype of unquantized tensors and scales (default: the config's torch_dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace DST (or an interrupted DST.partial)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted conversion into DST.partial")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _verify(path: str, quiet: bool) -> str:
    total = sum(e.num_experts * e.record_size for e in read_manifest(path).layers)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"verifying {path}", disable=quiet) as bar:
        manifest = verify_checkpoint(path, progress=bar.update)
    records = sum(e.num_experts for e in manifest.layers)
    return f"{path}: OK, {len(manifest.layers)} expert layers, {records} records, checksums match"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.verify:
            print(_verify(args.verify, args.quiet))
            return 0
        if not (args.hf_path or args.mlx_path):
            parser.error("one of --hf-path, --mlx-path or --verify is required")
        if not args.out:
            parser.error("--out is required")
        precision = None
        if args.mlx_path:
            given = [f for f, v in (("--recipe", args.recipe), ("--expert-bits", args.expert_bits),
                                    ("--dtype", args.dtype)) if v is not None]
            given += ["--search"] if args.search else []
            given += [f for f, v in (("--calibrate", args.calibrate), ("--calibrate-tokens", args.calibrate_tokens))
                      if v is not None]
            given += [f for f, v, d in (("--bits", args.bits, 4), ("--router-bits", args.router_bits, 8),
                                        ("--group-size", args.group_size, 64)) if v != d]
            if given:
                parser.error(f"{given[0]} does not apply to --mlx-path: a repack copies the stored precision")
        if args.hf_path:
            precision = Precision.from_flags(bits=args.bits, router_bits=args.router_bits, group_size=args.group_size,
                                             expert_bits=args.expert_bits, recipe=args.recipe, search=args.search)
        if args.calibrate_tokens is not None and not args.calibrate:
            parser.error("--calibrate-tokens needs --calibrate")
        calibration = None
        if args.calibrate:
            tokens = {} if args.calibrate_tokens is None else {"tokens": args.calibrate_tokens}
            calibration = CalibrationText(args.calibrate, **tokens)
        out = convert(args.out, hf_path=args.hf_path, mlx_path=args.mlx_path, precision=precision,
                      calibration=calibration, dtype=args.dtype,
                      overwrite=args.overwrite, resume=args.resume, progress=not args.quiet)
        print(f"wrote {out}")
        return 0
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
