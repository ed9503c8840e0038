"""Where each expert's bytes are on disk, for a flashmoe checkpoint or a stock mlx-lm checkpoint.

Owns `LayerLayout`: per MoE layer, the tensors of one expert and the byte segments to read for it. A
flashmoe layer is one segment per expert (the packed record: one read). A stock mlx-lm checkpoint keeps
each expert tensor stacked in safetensors, so an expert is one span per tensor (9 for a SwiGLU), and
consecutive experts' spans are adjacent on disk, which lets the store merge them into one read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .architecture import ExpertBlock
from .format import DTYPES, FORMAT_VERSION, FormatError, check_layer_file, read_manifest

SAFETENSORS_DTYPES = {"U32": "uint32", "U8": "uint8", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True)
class ExpertTensor:
    name: str  # relative to the expert module: "gate_proj.weight"
    dtype: str
    shape: tuple[int, ...]  # one expert
    segment: int  # which segment holds it
    offset: int  # byte offset inside that segment
    quant: dict | None  # {"bits", "group_size", "mode"} of its projection, None when unquantized

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(DTYPES[self.dtype]).itemsize


@dataclass(frozen=True)
class Segment:
    file: Path
    offsets: np.ndarray  # int64 [num_experts]: file offset of expert e's bytes
    length: int  # bytes per expert


@dataclass(frozen=True)
class LayerLayout:
    layer: int
    module: str
    num_experts: int
    tensors: tuple[ExpertTensor, ...]
    segments: tuple[Segment, ...]
    checksums: np.ndarray | None  # uint32 per expert record (flashmoe only)

    @property
    def packed(self) -> bool:
        """A flashmoe record (one segment, checksummed) rather than spans of a stock checkpoint."""
        return self.checksums is not None

    def projection(self, proj: str) -> dict[str, ExpertTensor]:
        return {t.name.split(".", 1)[1]: t for t in self.tensors if t.name.split(".", 1)[0] == proj}


def flashmoe_layouts(checkpoint: Path) -> list[LayerLayout]:
    layouts = []
    for entry in read_manifest(checkpoint).layers:
        path = check_layer_file(checkpoint, entry)
        tensors = tuple(
            ExpertTensor(t.name, t.dtype, t.shape, 0, t.offset,
                         {"bits": t.bits, "group_size": t.group_size, "mode": t.mode or "affine"} if t.bits else None)
            for t in entry.tensors
        )
        offsets = entry.data_offset + np.arange(entry.num_experts, dtype=np.int64) * entry.record_size
        layouts.append(LayerLayout(entry.layer, entry.module, entry.num_experts, tensors,
                                   (Segment(path, offsets, entry.record_size),),
                                   np.array(entry.checksums, dtype=np.uint32)))
    return layouts


def safetensors_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header dict) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < path.stat().st_size:
                raise ValueError(f"header length {n}")
            return 8 + n, json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not a safetensors file ({e})") from None


def check_safetensors_file(path: Path) -> dict:
    """The header, after checking the file holds every byte the header promises."""
    start, header = safetensors_header(path)
    end = start + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    size = path.stat().st_size
    if size < end:
        raise FormatError(f"{path}: truncated ({size} bytes, its header describes {end})")
    return header


def stock_layouts(checkpoint: Path, config: dict, blocks: dict[int, ExpertBlock]) -> list[LayerLayout]:
    """Layouts over a stock mlx-lm checkpoint's stacked expert tensors, for the model's expert blocks.
    The shards' sizes must have been checked (`check_safetensors_file`)."""
    where = {}
    for shard in sorted(checkpoint.glob("model*.safetensors")):
        start, header = safetensors_header(shard)
        for key, info in header.items():
            if key != "__metadata__":
                where[key] = (shard, start, info)
    quantization = config.get("quantization") or {}
    layouts = []
    for layer, block in sorted(blocks.items()):
        module = block.path
        names = sorted(k[len(module) + 1 :] for k in where if k.startswith(module + "."))
        if not names:
            unstacked = any(k.startswith(module.rsplit(".", 1)[0] + ".experts.") for k in where)
            why = "stores experts unstacked" if unstacked else "has no tensors for it"
            raise FormatError(f"{checkpoint}: expert block '{module}': the checkpoint {why}; "
                              "convert it with `python -m flashmoe_mlx.convert`")
        tensors, segments, num_experts = [], [], None
        for name in names:
            shard, start, info = where[f"{module}.{name}"]
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise FormatError(f"{shard}: tensor '{module}.{name}' has dtype {info['dtype']}, which cannot stream")
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            num_experts = num_experts or shape[0]
            if shape[0] != num_experts or (end - begin) % shape[0]:
                raise FormatError(f"{shard}: tensor '{module}.{name}' is not stacked over {num_experts} experts")
            per_expert = (end - begin) // shape[0]
            offsets = start + begin + np.arange(shape[0], dtype=np.int64) * per_expert
            proj = name.split(".", 1)[0]
            scales = where.get(f"{module}.{proj}.scales")
            quant = projection_quant(quantization, f"{module}.{proj}", block.shapes[proj][2],
                                     where[f"{module}.{proj}.weight"][2]["shape"], scales[2]["shape"],
                                     SAFETENSORS_DTYPES.get(scales[2]["dtype"])) if scales else None
            tensors.append(ExpertTensor(name, dtype, shape[1:], len(segments), 0, quant))
            segments.append(Segment(shard, offsets, per_expert))
        layouts.append(LayerLayout(layer, module, num_experts, tuple(tensors), tuple(segments), None))
    return layouts


QUANT_MODES_BY_SHAPE = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}  # modes whose scales are uint8


def projection_quant(quantization: dict, path: str, in_dims: int, weight_shape, scales_shape, scales_dtype: str):
    """A stored projection's precision, decided by mlx-lm's loader rules: the config's own entry for the path,
    else inferred from the shapes (group size from the input size and the scales, bits from the packing)."""
    entry = quantization.get(path)
    if entry is False:
        return None
    if isinstance(entry, dict):
        return {"group_size": entry["group_size"], "bits": entry["bits"], "mode": entry.get("mode", "affine")}
    group_size = in_dims // scales_shape[-1]
    bits = weight_shape[-1] * 32 // in_dims
    if scales_dtype != "uint8":
        return {"group_size": group_size, "bits": bits, "mode": "affine"}
    if (bits, group_size) not in QUANT_MODES_BY_SHAPE:
        raise FormatError(f"{path}: cannot infer the quantization of {bits} bits with group size {group_size}")
    return {"group_size": group_size, "bits": bits, "mode": QUANT_MODES_BY_SHAPE[(bits, group_size)]}


def check_layouts(checkpoint: Path, layouts: list[LayerLayout], blocks: dict[int, ExpertBlock]):
    """The expert data must be what the model's expert blocks expect: same layers, experts and shapes."""
    found = {l.layer: l for l in layouts}
    for layer, block in sorted(blocks.items()):
        layout = found.pop(layer, None)
        if layout is None or layout.module != block.path:
            raise FormatError(f"{checkpoint}: the expert data does not match config.json: expert block "
                              f"{block.path} has none")
        if layout.num_experts != block.num_experts:
            raise FormatError(f"{checkpoint}: layer {layer}: {layout.num_experts} experts stored, "
                              f"config.json says {block.num_experts}")
        for proj, (_, out_dims, in_dims) in block.shapes.items():
            weight = layout.projection(proj).get("weight")
            quant = weight.quant if weight else None
            want = (out_dims, in_dims * quant["bits"] // 32 if quant else in_dims)
            if weight is None or weight.shape != want:
                got = list(weight.shape) if weight else "nothing"
                raise FormatError(f"{checkpoint}: layer {layer}: {proj}.weight is {got} per expert, "
                                  f"the model expects {list(want)}")
    if found:
        raise FormatError(f"{checkpoint}: the expert data does not match config.json: "
                          f"{next(iter(found.values())).module} is not in the model")


def is_flashmoe(checkpoint: Path, config: dict) -> bool:
    """A flashmoe checkpoint (of a version this reader knows), rather than a stock mlx-lm one."""
    block = config.get("flashmoe")
    if block is None:
        return False
    version = block.get("format_version") if isinstance(block, dict) else None
    if version != FORMAT_VERSION:
        raise FormatError(f"{checkpoint / 'config.json'}: field 'flashmoe.format_version' is {version!r}; "
                          f"this flashmoe-mlx reads version {FORMAT_VERSION}")
    return True
