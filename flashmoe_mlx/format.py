"""flashmoe checkpoint v1: the on-disk layout of the streamed experts (docs/FORMAT.md is the spec).

Owns the layer-file header, the per-layer tensor table, the manifest, record checksums, and the
validation of every field. Errors name the file and the field. Nothing here touches the model graph.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FORMAT_NAME = "flashmoe"
FORMAT_VERSION = 1
ALIGNMENT = 16384  # Apple's page size: one record = one aligned, contiguous read
TENSOR_ALIGNMENT = 64  # each tensor in a record starts on a cache line
EXPERTS_DIR = "experts"
MANIFEST_NAME = "manifest.json"
MAGIC = b"FLASHMOE"
# magic, version, layer, num_experts, tensor_count, record_size, data_offset, table_crc32
HEADER = struct.Struct("<8sIIIIQQI")

# dtype name -> (numpy dtype used to move the bytes, bytes per element)
DTYPES = {
    "uint32": np.uint32,
    "uint8": np.uint8,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.uint16,  # numpy has no bfloat16: the bytes travel as uint16
}
QUANT_MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")


class FormatError(ValueError):
    """A flashmoe checkpoint field is missing, malformed, or disagrees with the data."""


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def layer_file_name(layer: int) -> str:
    return f"layer_{layer:03d}.bin"


def checksum(buf) -> int:
    # CRC-32 finds torn writes and flipped bits; zlib releases the GIL on large buffers.
    return zlib.crc32(buf) & 0xFFFFFFFF


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of an expert record: bytes [offset, offset + nbytes) of every record."""

    name: str  # relative to the expert module, e.g. "gate_proj.weight"
    dtype: str
    shape: tuple[int, ...]  # one expert's shape (the stacked tensor without its leading axis)
    offset: int
    nbytes: int
    bits: int | None = None  # quantization of the projection this tensor belongs to
    group_size: int | None = None
    mode: str | None = None


@dataclass
class LayerEntry:
    """One MoE layer: a file of `num_experts` fixed-size records after an aligned header."""

    layer: int
    module: str  # the mlx-lm module path of the expert block, e.g. "model.layers.3.mlp.switch_mlp"
    file: str
    num_experts: int
    record_size: int
    data_offset: int
    tensors: list[TensorEntry]
    checksums: list[int] = field(default_factory=list)

    def record_offset(self, expert: int) -> int:
        return self.data_offset + expert * self.record_size

    @property
    def file_size(self) -> int:
        return self.data_offset + self.num_experts * self.record_size

    def table_crc(self) -> int:
        table = json.dumps([asdict(t) for t in self.tensors], sort_keys=True)
        return checksum(table.encode())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tensors"] = [
            {k: list(v) if k == "shape" else v for k, v in asdict(t).items() if v is not None} for t in self.tensors
        ]
        d["checksums"] = [f"{c:08x}" for c in self.checksums]
        return d

    def header_bytes(self) -> bytes:
        head = HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            self.layer,
            self.num_experts,
            len(self.tensors),
            self.record_size,
            self.data_offset,
            self.table_crc(),
        )
        return head.ljust(self.data_offset, b"\0")


@dataclass
class Manifest:
    layers: list[LayerEntry]
    alignment: int = ALIGNMENT
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        doc = {
            "format": FORMAT_NAME,
            "version": self.version,
            "alignment": self.alignment,
            "checksum": "crc32",
            "layers": [e.to_dict() for e in self.layers],
        }
        return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def plan_layer(layer: int, module: str, num_experts: int, tensors: dict[str, tuple[str, tuple, dict]]) -> LayerEntry:
    """Lay out a record: tensors back to back in name order, each 64-byte aligned, record padded to
    ALIGNMENT. `tensors` maps name -> (dtype, per-expert shape, quantization dict or {})."""
    entries, offset = [], 0
    for name in sorted(tensors):
        dtype, shape, quant = tensors[name]
        if dtype not in DTYPES:
            raise FormatError(f"expert tensor {module}.{name}: dtype {dtype} cannot be stored")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
        offset = _align(offset, TENSOR_ALIGNMENT)
        entries.append(
            TensorEntry(name, dtype, tuple(int(s) for s in shape), offset, nbytes,
                        quant.get("bits"), quant.get("group_size"), quant.get("mode"))
        )
        offset += nbytes
    return LayerEntry(layer, module, layer_file_name(layer), num_experts,
                      _align(max(offset, 1), ALIGNMENT), ALIGNMENT, entries)


def pack_record(entry: LayerEntry, arrays: dict[str, np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
    """One expert's tensors (numpy, per-expert shapes) -> its record bytes (zero padded)."""
    rec = out if out is not None else np.empty(entry.record_size, np.uint8)
    rec[:] = 0
    for t in entry.tensors:
        a = np.ascontiguousarray(arrays[t.name])
        if a.dtype != DTYPES[t.dtype] or tuple(a.shape) != t.shape:
            raise FormatError(
                f"{entry.module}.{t.name}: got {a.dtype}{list(a.shape)}, table says {t.dtype}{list(t.shape)}"
            )
        rec[t.offset : t.offset + t.nbytes] = a.reshape(-1).view(np.uint8)
    return rec


def unpack_record(entry: LayerEntry, record) -> dict[str, np.ndarray]:
    """Record bytes -> {tensor name: numpy array view} (bfloat16 comes back as uint16 bits)."""
    buf = np.frombuffer(record, np.uint8)
    return {
        t.name: buf[t.offset : t.offset + t.nbytes].view(DTYPES[t.dtype]).reshape(t.shape)
        for t in entry.tensors
    }


# ---------------------------------------------------------------- reading and validation


def _require(doc: dict, key: str, kind, where: str):
    if key not in doc:
        raise FormatError(f"{where}: field '{key}' is missing")
    value = doc[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise FormatError(f"{where}: field '{key}' should be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _parse_tensor(doc: dict, where: str) -> TensorEntry:
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: a tensor entry should be an object, got {doc!r}")
    name = _require(doc, "name", str, where)
    where = f"{where} tensor '{name}'"
    dtype = _require(doc, "dtype", str, where)
    if dtype not in DTYPES:
        raise FormatError(f"{where}: field 'dtype' is {dtype!r}, expected one of {sorted(DTYPES)}")
    shape = tuple(_require(doc, "shape", list, where))
    if not all(isinstance(s, int) and s > 0 for s in shape):
        raise FormatError(f"{where}: field 'shape' must hold positive integers, got {list(shape)}")
    offset = _require(doc, "offset", int, where)
    nbytes = _require(doc, "nbytes", int, where)
    if offset < 0 or offset % TENSOR_ALIGNMENT:
        raise FormatError(f"{where}: field 'offset' {offset} is not a multiple of {TENSOR_ALIGNMENT}")
    if nbytes != int(np.prod(shape)) * np.dtype(DTYPES[dtype]).itemsize:
        raise FormatError(f"{where}: field 'nbytes' {nbytes} disagrees with dtype {dtype} and shape {list(shape)}")
    quant = {}
    for key, kind in (("bits", int), ("group_size", int), ("mode", str)):
        if key in doc:
            quant[key] = _require(doc, key, kind, where)
    if quant.get("mode", "affine") not in QUANT_MODES:
        raise FormatError(f"{where}: field 'mode' is {quant['mode']!r}, expected one of {QUANT_MODES}")
    if "bits" in quant and quant["bits"] not in (2, 3, 4, 5, 6, 8):
        raise FormatError(f"{where}: field 'bits' is {quant['bits']}, expected 2, 3, 4, 5, 6 or 8")
    return TensorEntry(name, dtype, shape, offset, nbytes, **quant)


def parse_layer(doc: dict, where: str, alignment: int = ALIGNMENT) -> LayerEntry:
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: a layer entry should be an object, got {doc!r}")
    layer = _require(doc, "layer", int, where)
    where = f"{where} layer {layer}"
    module = _require(doc, "module", str, where)
    file = _require(doc, "file", str, where)
    if file != layer_file_name(layer):
        raise FormatError(f"{where}: field 'file' is {file!r}, expected {layer_file_name(layer)!r}")
    num_experts = _require(doc, "num_experts", int, where)
    record_size = _require(doc, "record_size", int, where)
    data_offset = _require(doc, "data_offset", int, where)
    for key, value in (("record_size", record_size), ("data_offset", data_offset)):
        if value <= 0 or value % alignment:
            raise FormatError(f"{where}: field '{key}' {value} is not a positive multiple of {alignment}")
    if num_experts <= 0:
        raise FormatError(f"{where}: field 'num_experts' must be positive, got {num_experts}")
    tensors = [_parse_tensor(t, where) for t in _require(doc, "tensors", list, where)]
    if not tensors:
        raise FormatError(f"{where}: field 'tensors' is empty")
    end = 0
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.offset < end:
            raise FormatError(f"{where}: tensor '{t.name}' overlaps the tensor before it")
        end = t.offset + t.nbytes
    if end > record_size:
        raise FormatError(f"{where}: tensors end at byte {end}, past field 'record_size' {record_size}")
    sums = _require(doc, "checksums", list, where)
    if len(sums) != num_experts:
        raise FormatError(f"{where}: field 'checksums' has {len(sums)} entries for {num_experts} experts")
    if not all(isinstance(c, str) and re.fullmatch("[0-9a-f]{8}", c) for c in sums):
        raise FormatError(f"{where}: field 'checksums' must hold 8-digit lower-case hex strings")
    checksums = [int(c, 16) for c in sums]
    return LayerEntry(layer, module, file, num_experts, record_size, data_offset, tensors, checksums)


def read_manifest(checkpoint: str | Path) -> Manifest:
    path = Path(checkpoint) / EXPERTS_DIR / MANIFEST_NAME
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FormatError(f"{path}: the expert manifest is missing; not a flashmoe checkpoint") from None
    except OSError as e:
        raise FormatError(f"{path}: unreadable ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    where = str(path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise FormatError(f"{where}: field 'format' should be {FORMAT_NAME!r}")
    version = _require(doc, "version", int, where)
    if version != FORMAT_VERSION:
        raise FormatError(f"{where}: field 'version' is {version}; this flashmoe-mlx reads version {FORMAT_VERSION}")
    if doc.get("checksum") != "crc32":
        raise FormatError(f"{where}: field 'checksum' should be 'crc32'")
    alignment = _require(doc, "alignment", int, where)
    if alignment <= 0 or alignment % 4096:
        raise FormatError(f"{where}: field 'alignment' {alignment} is not a positive multiple of 4096")
    layers = [parse_layer(e, where, alignment) for e in _require(doc, "layers", list, where)]
    seen = set()
    for e in layers:
        if e.layer in seen:
            raise FormatError(f"{where}: layer {e.layer} appears twice")
        seen.add(e.layer)
    return Manifest(layers, alignment, version)


def check_layer_file(checkpoint: str | Path, entry: LayerEntry) -> Path:
    """Header sanity and size of one layer file (cheap; done at every open)."""
    path = Path(checkpoint) / EXPERTS_DIR / entry.file
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
    except FileNotFoundError:
        raise FormatError(f"{path}: expert file for layer {entry.layer} is missing") from None
    if len(raw) < HEADER.size:
        raise FormatError(f"{path}: truncated header ({size} bytes)")
    magic, version, layer, num_experts, ntensors, record_size, data_offset, table_crc = HEADER.unpack(raw)
    expected = {
        "magic": (magic, MAGIC),
        "version": (version, FORMAT_VERSION),
        "layer": (layer, entry.layer),
        "num_experts": (num_experts, entry.num_experts),
        "tensor_count": (ntensors, len(entry.tensors)),
        "record_size": (record_size, entry.record_size),
        "data_offset": (data_offset, entry.data_offset),
        "table_crc32": (table_crc, entry.table_crc()),
    }
    for name, (got, want) in expected.items():
        if got != want:
            raise FormatError(f"{path}: header field '{name}' is {got!r}, manifest says {want!r}")
    if size != entry.file_size:
        state = "truncated" if size < entry.file_size else "too long"
        raise FormatError(f"{path}: {state}: {size} bytes, manifest says {entry.file_size}")
    return path


def verify_checkpoint(checkpoint: str | Path, progress=None) -> Manifest:
    """Check the manifest, every layer header and every record's checksum; raise on the first fault."""
    manifest = read_manifest(checkpoint)
    for entry in manifest.layers:
        path = check_layer_file(checkpoint, entry)
        fd = os.open(path, os.O_RDONLY)
        try:
            for expert in range(entry.num_experts):
                rec = os.pread(fd, entry.record_size, entry.record_offset(expert))
                if len(rec) != entry.record_size or checksum(rec) != entry.checksums[expert]:
                    raise FormatError(f"{path}: layer {entry.layer} expert {expert}: checksum mismatch")
                if progress is not None:
                    progress(entry.record_size)
        finally:
            os.close(fd)
    return manifest


def to_mx(array: np.ndarray, dtype: str):
    """A record tensor (numpy view) as an mx.array of its stored dtype."""
    import mlx.core as mx

    out = mx.array(array)
    return out.view(mx.bfloat16) if dtype == "bfloat16" else out


def read_stacked_experts(checkpoint: str | Path, entry: LayerEntry) -> dict:
    """Every expert of one layer, stacked back into mlx-lm's `[num_experts, ...]` tensors (keyed by full path).

    Reads the whole layer file: for tools and tests (the runtime streams single records instead)."""
    path = check_layer_file(checkpoint, entry)
    data = np.fromfile(path, np.uint8)
    records = [unpack_record(entry, data[entry.record_offset(e) : entry.record_offset(e) + entry.record_size])
               for e in range(entry.num_experts)]
    return {
        f"{entry.module}.{t.name}": to_mx(np.stack([r[t.name] for r in records]), t.dtype) for t in entry.tensors
    }
