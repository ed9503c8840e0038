"""The conversion: a Hugging Face or mlx-lm checkpoint -> a flashmoe checkpoint, one unit at a time.

A unit is one decoder layer (its dense tensors -> one safetensors shard, its routed experts -> one
layer file of packed records) or the non-layer tensors (embeddings, final norm, lm_head). Source tensors
are lazy, so peak memory is one unit plus buffers. Quantization goes through mlx-lm's own modules
(`to_quantized`) so results equal `mlx_lm.convert` at the same precision.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm import __version__ as mlx_lm_version
from tqdm import tqdm

from flashmoe_mlx import __version__
from flashmoe_mlx.architecture import ExpertBlock, build_model, expert_blocks, layer_of
from flashmoe_mlx.layout import projection_quant
from flashmoe_mlx.format import (
    EXPERTS_DIR,
    FORMAT_VERSION,
    MANIFEST_NAME,
    LayerEntry,
    Manifest,
    checksum,
    pack_record,
    parse_layer,
    plan_layer,
)

from .affine_search import quantize_searched
from .calibration import CalibrationText, Calibrator, ExpertInputs, token_windows
from .gptq import quantize_gptq
from .quantization import Precision, config_block, quantization_plan
from .sources import Source, open_source
from .staging import Staging, disk_error

CAST_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
CHUNK_BYTES = 256 << 20  # experts are quantized this many source bytes at a time
HESSIAN_BYTES = 512 << 20  # and, when calibrated, this many bytes of their inputs' H at a time
SHARED_INPUT = ("gate_proj", "up_proj")  # expert projections that multiply the same inputs
_EMPTY = mx.zeros((0,))


class ConvertError(ValueError):
    pass


def _to_numpy(a: mx.array) -> tuple[np.ndarray, str]:
    name = str(a.dtype).split(".")[-1]
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.array(a, copy=False), name


def _source_dtype(config: dict, requested: str | None):
    name = requested or config.get("torch_dtype") or config.get("dtype") or config.get("text_config", {}).get("dtype")
    return CAST_DTYPES.get(name)


class Converter:
    def __init__(self, source: Source, precision: Precision | None, dtype: str | None,
                 calibration: CalibrationText | None = None, progress: bool = False):
        self.source = source
        self.progress = progress  # per-expert bars inside a layer, where a layer takes minutes (GPTQ)
        self.config = source.config
        self.model_type = self.config.get("model_type", "?")
        self.model = build_model(self.config)
        self.blocks = {b.layer: b for b in expert_blocks(self.model, self.model_type)}
        self.precision = precision
        if source.quantized:
            self.weights = source.weights
            self.plan = None
            self.dtype = None
        else:
            # Only the sanitized table may hold the lazy source tensors, so each is freed once written.
            weights, source.weights = source.weights, {}
            if hasattr(self.model, "sanitize"):
                weights = self.model.sanitize(weights)
            self.dtype = _source_dtype(self.config, dtype)
            self.weights = self._cast(weights, self.dtype)
            self._check_keys()
            self.plan = quantization_plan(self.model, list(self.blocks.values()), precision)
        self.units = self._units()
        self.calibration, self.calibrator = None, None
        if calibration is not None:
            if source.quantized:
                raise ConvertError("--calibrate quantizes from unquantized weights; it does not apply to --mlx-path")
            self.calibrator = Calibrator(self.model, self._calibration_windows(calibration))
            self.calibration = calibration.job()

    def _calibration_windows(self, calibration: CalibrationText):
        from mlx_lm.utils import load_tokenizer

        text = calibration.read()
        try:
            tokenizer = load_tokenizer(self.source.path)
        except (OSError, ValueError) as e:
            raise ConvertError(f"{self.source.path}: no tokenizer to read the calibration text with ({e})") from None
        return token_windows(tokenizer, text, calibration.tokens, calibration.path)

    def _cast(self, weights: dict, dtype) -> dict:
        if dtype is None:
            return weights
        keep = getattr(self.model, "cast_predicate", lambda _: True)
        return {
            k: v.astype(dtype) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }

    def _check_keys(self):
        expected = {k for k, _ in tree_flatten(self.model.parameters())}
        missing = sorted(expected - set(self.weights))
        extra = sorted(set(self.weights) - expected)
        where = self.source.path
        if missing:
            raise ConvertError(f"{where}: tensor '{missing[0]}' that {self.model_type} needs is missing"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if extra:
            shard = self.source.shard_of.get(extra[0], "the sanitized weights")
            raise ConvertError(f"{where}/{shard}: tensor '{extra[0]}' is not a parameter of {self.model_type}")
        for k, v in self.weights.items():
            if k in self.source.shard_of and v.size and v.dtype not in (*CAST_DTYPES.values(), mx.uint32, mx.uint8):
                raise ConvertError(f"{where}/{self.source.shard_of[k]}: tensor '{k}' has unsupported dtype {v.dtype}")

    def _units(self) -> list[tuple[int | None, list[str]]]:
        """[(None, non-layer keys), (0, layer 0 keys), ...] in file order."""
        by_layer: dict[int | None, list[str]] = {}
        for k in self.weights:
            by_layer.setdefault(layer_of(k), []).append(k)
        order = [None] + sorted(k for k in by_layer if k is not None)
        return [(layer, sorted(by_layer.get(layer, []))) for layer in order]

    @staticmethod
    def shard_name(unit: int, count: int) -> str:
        return f"model-{unit + 1:05d}-of-{count:05d}.safetensors"

    # ---------------------------------------------------------------- one unit

    def calibrate(self, unit: int, keep_expert_inputs: bool = True) -> ExpertInputs | None:
        """Carry the calibration hidden states through this unit's source weights (loaded into the model
        until `release`); returns what its expert block saw."""
        layer, keys = self.units[unit]
        self.model.load_weights([(k, self.weights[k]) for k in keys], strict=False)
        if layer is None:
            self.calibrator.embed()
            return None
        return self.calibrator.advance(layer, self.blocks.get(layer) if keep_expert_inputs else None)

    def release(self, unit: int, written=()):
        """Free this unit (its source tensors, and what was `written` from the model): evaluated tensors stay
        alive while the model or the weight table holds them."""
        keys = self.units[unit][1]
        self.model.load_weights([(k, _EMPTY) for k in sorted({*keys, *written})], strict=False)
        for k in keys:
            del self.weights[k]

    def convert_unit(self, staging: Staging, unit: int) -> dict:
        layer, keys = self.units[unit]
        block = self.blocks.get(layer)
        inputs = self.calibrate(unit) if self.calibrator is not None else None
        prefix = block.path + "." if block else None
        expert_keys = [k for k in keys if prefix and k.startswith(prefix)]
        dense = self._dense_tensors(layer, [k for k in keys if not (prefix and k.startswith(prefix))], prefix)
        files = []
        shard = self.shard_name(unit, len(self.units))
        tmp = staging.temp(shard)
        try:
            mx.save_safetensors(str(tmp), dict(sorted(dense.items())), metadata={"format": "mlx"})
        except (OSError, RuntimeError, ValueError) as e:
            raise disk_error(e, tmp) from None
        staging.publish(shard)
        files.append(shard)
        entry = None
        if block is not None:
            entry = self._write_experts(staging, block, expert_keys, inputs)
            files.append(f"{EXPERTS_DIR}/{entry.file}")
        self.release(unit, dense)
        return {
            "files": files,
            "dense": {shard: sorted(dense)},
            "dense_bytes": sum(v.nbytes for v in dense.values()),
            "layer": entry.to_dict() if entry else None,
        }

    def _dense_tensors(self, layer, keys: list[str], expert_prefix: str | None) -> dict[str, mx.array]:
        if self.plan is None:  # mlx-lm checkpoint: copied as stored
            tensors = {k: self.weights[k] for k in keys}
        else:
            self.model.load_weights([(k, self.weights[k]) for k in keys], strict=False)
            unit_plan = {
                p: q for p, q in self.plan.items()
                if layer_of(p + ".") == layer and not (expert_prefix and (p + ".").startswith(expert_prefix))
            }
            nn.quantize(self.model, class_predicate=lambda p, _: unit_plan.get(p, False))
            tensors = {
                k: v for k, v in tree_flatten(self.model.parameters())
                if layer_of(k) == layer and not (expert_prefix and k.startswith(expert_prefix))
            }
        mx.eval(list(tensors.values()))
        return tensors

    def _expert_tensors(self, block: ExpertBlock, keys: list[str],
                        inputs: ExpertInputs | None) -> tuple[dict[str, np.ndarray], dict]:
        """Stacked expert tensors as numpy ({'gate_proj.weight': [E, ...], ...}) and their precision."""
        arrays, dtypes = {}, {}
        names = sorted(k[len(block.path) + 1 :] for k in keys)
        specs = {proj: self._expert_precision(block, proj, names) for proj in sorted({n.split(".")[0] for n in names})}
        if self.plan is not None:
            # gate_proj and up_proj multiply the same inputs: at one precision they are quantized as one stack of
            # rows (calibrated: one factor of their shared H). Rows are independent, so the bytes are the same.
            batches = [[proj] for proj, spec in specs.items() if spec and proj not in SHARED_INPUT]
            shared = [proj for proj in SHARED_INPUT if specs.get(proj)]
            same = len(shared) == 2 and specs[shared[0]] == specs[shared[1]]
            batches += [shared] if same else [[proj] for proj in shared]
            for batch in batches:
                weights = [self.weights[f"{block.path}.{proj}.weight"] for proj in batch]
                for proj, out in zip(batch, self._quantize_experts(weights, specs[batch[0]], batch, inputs)):
                    for part, value in zip(("weight", "scales", "biases"), out):
                        arrays[f"{proj}.{part}"], dtypes[f"{proj}.{part}"] = value
        for name in names:
            if name not in arrays:  # unquantized tensors (linear biases), and every tensor of an mlx-lm repack
                src = self.weights[f"{block.path}.{name}"]
                mx.eval(src)
                arrays[name], dtypes[name] = _to_numpy(src)
        return {n: (arrays[n], dtypes[n]) for n in arrays}, {proj: spec or {} for proj, spec in specs.items()}

    def _expert_precision(self, block: ExpertBlock, proj: str, names: list[str]) -> dict | None:
        path = f"{block.path}.{proj}"
        if self.plan is not None:
            return self.plan.get(path) or None
        if f"{proj}.scales" not in names:
            return None
        weight, scales = self.weights[f"{path}.weight"], self.weights[f"{path}.scales"]
        return projection_quant(self.config["quantization"], path, block.shapes[proj][2], weight.shape, scales.shape,
                                str(scales.dtype).split(".")[-1])

    def _quantize_experts(self, weights: list[mx.array], spec: dict, projs: list[str],
                          inputs: ExpertInputs | None) -> list[list[tuple[np.ndarray, str]]]:
        """Quantize stacked experts [E, out_i, in] that share their input as one stack of rows, in chunks of
        experts (experts and rows are independent, so this equals one call per matrix). Per matrix: its
        (weight, scales, biases) as numpy."""
        mx.eval(weights)
        step = max(1, CHUNK_BYTES // max(1, sum(w[0].nbytes for w in weights)))
        grid = {"group_size": spec["group_size"], "bits": spec["bits"]}
        if inputs is not None and spec["mode"] == "affine":
            step = max(1, min(step, HESSIAN_BYTES // (4 * weights[0].shape[-1] ** 2)))

            def quantize(chunk, first):
                return quantize_gptq(chunk, inputs.hessians(projs[0], range(first, first + len(chunk))), **grid)
        elif self.precision.expert_search and spec["mode"] == "affine":
            def quantize(chunk, first):
                return quantize_searched(chunk, **grid)
        else:
            def quantize(chunk, first):
                return mx.quantize(chunk, **grid, mode=spec["mode"])
        parts, experts = [], weights[0].shape[0]
        with tqdm(total=experts, desc=f"  {'+'.join(projs)} (GPTQ)", unit="expert", leave=False,
                  disable=not (self.progress and inputs is not None)) as bar:
            for e in range(0, experts, step):
                chunks = [w[e : e + step] for w in weights]
                parts.append(quantize(chunks[0] if len(chunks) == 1 else mx.concatenate(chunks, axis=1), e))
                bar.update(parts[-1][0].shape[0])
        ends = np.cumsum([w.shape[1] for w in weights])[:-1]
        out = []
        for i in range(len(parts[0])):
            pieces = []
            for p in parts:
                mx.eval(p[i])
                pieces.append(_to_numpy(p[i]))
            out.append((np.concatenate([a for a, _ in pieces]), pieces[0][1]))
        split = [(np.split(a, ends, axis=1), dtype) for a, dtype in out]  # per matrix: its rows of each
        return [[(pieces[m], dtype) for pieces, dtype in split] for m in range(len(weights))]

    def _write_experts(self, staging: Staging, block: ExpertBlock, keys: list[str],
                       inputs: ExpertInputs | None) -> LayerEntry:
        tensors, quant = self._expert_tensors(block, keys, inputs)
        entry = plan_layer(
            block.layer, block.path, block.num_experts,
            {n: (dtype, a.shape[1:], quant[n.split(".")[0]]) for n, (a, dtype) in tensors.items()},
        )
        name = f"{EXPERTS_DIR}/{entry.file}"
        tmp = staging.temp(name)
        record = np.empty(entry.record_size, np.uint8)
        try:
            with open(tmp, "wb") as f:
                f.write(entry.header_bytes())
                for e in range(block.num_experts):
                    pack_record(entry, {n: a[e] for n, (a, _) in tensors.items()}, record)
                    entry.checksums.append(checksum(record))
                    f.write(record)
        except OSError as e:
            raise disk_error(e, tmp) from None
        staging.publish(name)
        return entry

    # ---------------------------------------------------------------- the whole job

    def job(self) -> dict:
        return {
            "flashmoe_version": __version__,
            "source": str(self.source.path.resolve()),
            "source_kind": "mlx" if self.source.quantized else "hf",
            "precision": asdict(self.precision) if self.plan is not None else None,
            "calibration": self.calibration,
            "dtype": str(self.dtype),
            "mlx": mx.__version__,
            "mlx_lm": mlx_lm_version,
            "units": len(self.units),
        }

    def finish(self, staging: Staging, records: list[dict]):
        layers = [parse_layer(r["layer"], "unit record") for r in records if r["layer"]]
        manifest = Manifest(layers)
        staging.write_text(staging.path(f"{EXPERTS_DIR}/{MANIFEST_NAME}"), manifest.to_json())
        weight_map = {k: shard for r in records for shard, keys in r["dense"].items() for k in keys}
        dense_bytes = sum(r["dense_bytes"] for r in records)
        index = {"metadata": {"total_size": dense_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        staging.write_json(staging.path("model.safetensors.index.json"), index)
        staging.write_json(staging.path("config.json"), self.output_config(manifest, dense_bytes))
        for side in self.source.side_files():
            staging.copy_in(side)

    def output_config(self, manifest: Manifest, dense_bytes: int) -> dict:
        config = {k: v for k, v in self.config.items() if k != "_name_or_path"}
        if self.plan is not None:
            config["quantization"] = config_block(self.plan, self.precision)
        else:
            # mlx-lm infers a module's precision from its scales in the shards; expert scales now live in
            # records, so every expert projection is named explicitly.
            experts = {
                f"{e.module}.{t.name.split('.')[0]}": {"group_size": t.group_size, "bits": t.bits, "mode": t.mode}
                for e in manifest.layers for t in e.tensors if t.bits
            }
            config["quantization"] = {**config["quantization"], **experts}
        config["quantization_config"] = config["quantization"]
        text = config.get("text_config", config)
        config["flashmoe"] = {
            "format_version": FORMAT_VERSION,
            "experts": f"{EXPERTS_DIR}/{MANIFEST_NAME}",
            "expert_modules": [e.module for e in manifest.layers],
            "memory_hints": {
                "dense_bytes": dense_bytes,
                "expert_bytes": sum(e.num_experts * e.record_size for e in manifest.layers),
                "record_bytes_max": max(e.record_size for e in manifest.layers),
                "num_experts": max(e.num_experts for e in manifest.layers),
                "experts_per_token": text.get("num_experts_per_tok"),
            },
        }
        if self.plan is not None:
            config["flashmoe"]["recipe"] = {
                "bits": self.precision.bits,
                "expert_bits": dict(self.precision.expert_bits),
                "router_bits": self.precision.router_bits,
                "group_size": self.precision.group_size,
                "expert_search": self.precision.expert_search,
                "expert_calibration": self.calibration,
            }
        return config


def convert(
    out: str | Path,
    *,
    hf_path: str | None = None,
    mlx_path: str | None = None,
    precision: Precision | None = None,
    calibration: CalibrationText | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Convert `hf_path` (quantizing) or repack `mlx_path` (bit-for-bit) into a flashmoe checkpoint.
    `calibration`: quantize experts with GPTQ on that text's inputs (gptq.py) instead of round-to-nearest."""
    if (hf_path is None) == (mlx_path is None):
        raise ConvertError("give exactly one of hf_path / mlx_path")
    out = Path(out)
    source = open_source(hf_path or mlx_path, expect_quantized=mlx_path is not None)
    converter = Converter(source, precision or Precision(), dtype, calibration, progress)
    staging = Staging(out, converter.job(), resume=resume, overwrite=overwrite)

    def check(record):
        if record["layer"]:
            parse_layer(record["layer"], "unit record")

    records = []
    bar = tqdm(range(len(converter.units)), desc=f"converting {out.name}", unit="layer", disable=not progress)
    for unit in bar:
        record = staging.finished_unit(unit, check) if resume else None
        if record is None:
            record = converter.convert_unit(staging, unit)
            staging.finish_unit(unit, record)
        elif converter.calibrator is not None:  # the next layer's calibration inputs come through this one
            converter.calibrate(unit, keep_expert_inputs=False)
            converter.release(unit)
        records.append(record)
    converter.finish(staging, records)
    staging.commit()
    return out
