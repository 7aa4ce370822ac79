"""GGUF files: open one, wrap its tensors as QTensors, and write a requantised copy.

This is where a model enters refinfer (file.gguf -> ModelConfig + {name: QTensor}).
`gguf.GGUFReader` memory-maps the file; every QTensor's raw blocks are a view
into that map, so loading copies nothing and dequantises nothing. Every way a
file can be wrong (missing, not GGUF, truncated, unsupported) becomes a
`ModelFileError` / `UnsupportedModelError` / `UnsupportedFormatError` with a
message that names the problem. A damaged file is caught while it is parsed:
every read must lie inside the file, every count and array length must fit in
the bytes left, every tensor must be 1-4 dimensions of whole blocks of a known
type lying inside the file, every string must be UTF-8. So a flipped byte can
neither make the reader allocate gigabytes or loop for ever, nor hand a kernel
a tensor shorter than its shape.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
)

from refinfer.config import ModelConfig
from refinfer.errors import ModelFileError, RefinferError
from refinfer.quant import (
    BF16,
    F16,
    F32,
    FORMATS,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Format,
    QTensor,
    check_writable,
    dequantize,
    format_of,
    quantize,
)

GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS: a tensor has 1 to 4 dimensions
# The fewest bytes an entry can take, to bound the header's counts by the file size:
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value (and an empty key)
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
MIN_ITEM_BYTES = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 4 + 8}  # their length fields
VALUE_TYPES = {int(t) for t in GGUFValueType}


@dataclass(frozen=True)
class GGUFFile:
    """An open GGUF: its key/value metadata and its tensors, still in the mmap."""

    path: Path
    metadata: dict[str, Any]  # e.g. 'llama.block_count' -> 30
    tensors: dict[str, QTensor]  # in file order
    file_size: int
    reader: GGUFReader  # keeps the map open; its fields carry the value types for writing

    @property
    def config(self) -> ModelConfig:
        """The validated model hyper-parameters (UnsupportedModelError if inconsistent)."""
        return ModelConfig.from_metadata(
            self.metadata, {name: t.shape for name, t in self.tensors.items()}
        )


class _Reader(GGUFReader):
    """GGUFReader with bounds checks, parsing through a plain ndarray view of its map.

    gguf's reader trusts the file: a read past the end returns a short array, an
    array length of 2^60 loops 2^60 times (a scalar past the end takes no bytes, so
    it never stops), a tensor may lie outside the file. Here every read, count, array
    length and tensor is checked against the file size before it is used, and a
    damaged file is a ModelFileError that says where.

    The reader slices its map once per value (about 250,000 times for a 49k-token
    vocabulary), and np.memmap's Python-level __getitem__/__array_finalize__ cost
    three quarters of the parse time: 4.3 s -> 1.1 s for SmolLM2. The view still
    maps the file (its .base is the memmap); nothing is read into memory.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(path)

    def _damaged(self, what: str) -> ModelFileError:
        """The error for a file whose structure cannot be what it claims."""
        return ModelFileError(f"{self.path}: damaged or truncated GGUF: {what}")

    def _get(self, offset, dtype, count=1, override_order=None):  # every read goes through _get
        if type(self.data) is np.memmap:
            self.data = self.data.view(np.ndarray)
        itemsize = np.dtype(dtype).itemsize
        if int(offset) + itemsize * int(count) > len(self.data):
            raise self._damaged(
                f"{int(count)} x {itemsize} bytes at byte {int(offset)} would run past the end "
                f"of the file ({len(self.data)} bytes)"
            )
        return super()._get(offset, dtype, count, override_order)

    def _build_fields(self, offs, count):  # called right after the header's two counts
        n_tensors = int(self.fields["GGUF.tensor_count"].parts[0][0])
        if int(count) * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES > len(self.data) - offs:
            raise self._damaged(
                f"the header claims {n_tensors} tensors and {int(count)} key/values, more "
                f"than the file's {len(self.data)} bytes can hold"
            )
        return super()._build_fields(offs, count)

    def _get_field_parts(self, orig_offs, raw_type):  # one value; arrays recurse through here
        if raw_type not in VALUE_TYPES:
            raise self._damaged(f"the value at byte {int(orig_offs)} has type {int(raw_type)}")
        if raw_type == GGUFValueType.ARRAY:
            item_type, length = self._check_array_length(int(orig_offs))
            if length and (
                item_type in self.gguf_scalar_to_np or item_type == GGUFValueType.STRING
            ):
                return self._get_array(int(orig_offs), item_type, length)
        return super()._get_field_parts(orig_offs, raw_type)

    def _get_array(self, offs: int, item_type: int, length: int) -> tuple:
        """An array of scalars or strings, as _get_field_parts returns it but without recursing.

        gguf's reader parses an array one item at a time through _get_field_parts, which
        took 31 s for Gemma 3's 262,144-token vocabulary (786,469 items in tokens, scores and
        token_type). Here an array of scalars is one read: one part holding every item, that
        the field's data points at (contents() flattens the parts it points at, so it gives
        the same list; only contents(i) for one item i > 0 would not, and refinfer never calls
        it). An array of strings is a tight loop making gguf's two parts of each string (its
        length, its bytes) as views of the map, each string checked to lie inside the file.
        Together: 31 s -> 1.3 s for Gemma 3, 4 s -> 0.6 s for SmolLM2.
        """
        head = [self._get(offs, np.uint32), self._get(offs + 4, np.uint64)]
        types = [GGUFValueType.ARRAY, GGUFValueType(item_type)]
        start = offs + 12
        if item_type != GGUFValueType.STRING:
            items = self._get(start, self.gguf_scalar_to_np[item_type], length)
            return 12 + items.nbytes, [*head, items], [2], types
        data, size, offs = self.data, len(self.data), start
        # u64_at[i] is the uint64 at byte i, as a view of shape (1,) (gguf's length part): rows
        # of 8 bytes, one byte apart. Indexing it is a quarter of the cost of slicing and
        # viewing the map for each string.
        rows = np.lib.stride_tricks.as_strided(data, (max(size - 7, 0), 8), (1, 1))
        u64_at = rows.view(np.dtype(np.uint64).newbyteorder(self.byte_order))
        parts = head
        for k in range(length):
            end = offs + 8 + int(u64_at[offs, 0]) if offs + 8 <= size else size + 1
            if end > size:
                raise self._damaged(
                    f"string {k} of the array at byte {start - 12} runs past the end of the file "
                    f"({size} bytes)"
                )
            parts += (u64_at[offs], data[offs + 8 : end])
            offs = end
        return offs - start + 12, parts, list(range(3, 2 * length + 3, 2)), types

    def _check_array_length(self, offs: int) -> tuple[int, int]:
        """The item type and length of the array at `offs`; ModelFileError if it claims more
        items than the file can hold."""
        item_type = int(self._get(offs, np.uint32)[0])
        length = int(self._get(offs + 4, np.uint64)[0])
        scalar = self.gguf_scalar_to_np.get(item_type)
        item_bytes = np.dtype(scalar).itemsize if scalar else MIN_ITEM_BYTES.get(item_type, 1)
        left = len(self.data) - offs - 12
        if length * item_bytes > left:
            raise self._damaged(
                f"the array at byte {offs} claims {length} items, more than the {left} bytes "
                f"after it can hold"
            )
        return item_type, length

    def _build_tensors(self, start_offs, fields):  # after the tensor-info table, before the data
        expected, before = 0, None  # where the data of the tensor before ends, padded
        for field in fields:
            n_bytes = self._tensor_bytes(field)
            self._check_place(field, int(start_offs), n_bytes, expected, before)
            expected += -(-n_bytes // self.alignment) * self.alignment
            before = field.name
        super()._build_tensors(start_offs, fields)

    def _tensor_bytes(self, field: Any) -> int:
        """Bytes of one tensor's data; ModelFileError naming it if its dims or type are wrong."""
        _, _, _, dims, raw_type, _ = field.parts
        where = f"{self.path}: tensor {field.name!r}"
        if not 1 <= len(dims) <= MAX_DIMS:
            raise ModelFileError(f"{where} has {len(dims)} dimensions (GGUF allows 1 to 4)")
        try:
            ggml_type = GGMLQuantizationType(int(raw_type[0]))
        except ValueError:
            raise ModelFileError(f"{where} has type {int(raw_type[0])}, no GGUF type") from None
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        if int(dims[0]) % block_size:
            raise ModelFileError(
                f"{where}: its rows of {int(dims[0])} weights are not whole {ggml_type.name} "
                f"blocks of {block_size}"
            )
        return math.prod(int(n) for n in dims) // block_size * type_size

    def _check_place(
        self, field: Any, start: int, n_bytes: int, expected: int, before: str | None
    ) -> None:
        """ModelFileError naming the tensor unless its data lies in the file, right after the
        data of the tensor before it (as llama.cpp's gguf.cpp requires, so a type or shape
        that changes a tensor's size is caught at the next tensor)."""
        offset = int(field.parts[5][0])
        where = f"{self.path}: tensor {field.name!r}"
        if start + offset + n_bytes > len(self.data):
            raise ModelFileError(
                f"{where}: its {n_bytes} bytes at byte {start + offset} run past the end of the "
                f"file ({len(self.data)} bytes): the file is truncated or its tensor table damaged"
            )
        if offset != expected:
            after = f"the data of {before!r} ends at {expected}" if before else "data starts at 0"
            raise ModelFileError(
                f"{where} starts at data offset {offset}, but {after}: a type, shape or offset "
                f"in the tensor table is damaged"
            )


def _open_reader(path: Path) -> GGUFReader:
    """GGUFReader for `path`, with ModelFileError for every way the file can be unreadable."""
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot be read ({e.strerror})") from None
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        return _Reader(path)
    except RefinferError:
        raise
    except UnicodeDecodeError as e:  # a key or a tensor name (values are decoded later)
        name = bytes(e.object[:60])
        raise ModelFileError(
            f"{path}: the name {name!r} is not UTF-8: the file is damaged"
        ) from None
    except Exception as e:  # the reader raises ValueError, KeyError, ... on damaged files
        raise ModelFileError(f"{path}: damaged or truncated GGUF ({e})") from None


def _metadata(path: Path, reader: GGUFReader) -> dict[str, Any]:
    """Every key/value of the file as Python values (str, int, float, bool or list)."""
    return {name: _value(path, name, field) for name, field in reader.fields.items()}


def _value(path: Path, name: str, field: Any) -> Any:
    """One field's value; ModelFileError naming the key (and item) if a string is not UTF-8."""
    try:
        return field.contents()
    except UnicodeDecodeError:
        bad = next((k for k in range(len(field.data)) if not _is_utf8(field, k)), None)
        item = f"[{bad}]" if field.types[0] == GGUFValueType.ARRAY and bad is not None else ""
        raise ModelFileError(
            f"{path}: metadata {name!r}{item} is not UTF-8 text: the file is damaged"
        ) from None


def _is_utf8(field: Any, k: int) -> bool:
    """Whether the k-th data part of a field decodes as UTF-8."""
    try:
        field.parts[field.data[k]].tobytes().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The key/value metadata of a GGUF (also of a vocabulary-only file)."""
    path = Path(path)
    return _metadata(path, _open_reader(path))


def _qtensor(path: Path, t: Any) -> QTensor:
    """Wrap one reader tensor: numpy-order shape, raw bytes as uint8[*shape[:-1], row_bytes]."""
    fmt = format_of(t.tensor_type, t.name)
    shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists ne0 (the row length) first
    row_bytes = fmt.row_bytes(shape[-1])
    expected = int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes
    if t.data.nbytes != expected:
        raise ModelFileError(
            f"{path}: tensor {t.name!r} holds {t.data.nbytes} bytes of the {expected} its shape "
            f"needs: the file is truncated"
        )
    raw = t.data.view(np.uint8).reshape(*shape[:-1], row_bytes)
    return QTensor(t.name, fmt, shape, raw)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file: metadata and QTensors, memory-mapped, nothing copied."""
    path = Path(path)
    reader = _open_reader(path)
    tensors = {t.name: _qtensor(path, t) for t in reader.tensors}
    return GGUFFile(path, _metadata(path, reader), tensors, path.stat().st_size, reader)


def load_weights(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, QTensor]]:
    """The validated ModelConfig and the tensors of a model file."""
    gf = read_gguf(path)
    return gf.config, gf.tensors


# ---- writing a requantised copy ----------------------------------------------

_FILE_TYPE = {  # general.file_type: the 'mostly' type of a model file
    F32: LlamaFileType.ALL_F32,
    F16: LlamaFileType.MOSTLY_F16,
    BF16: LlamaFileType.MOSTLY_BF16,
    Q8_0: LlamaFileType.MOSTLY_Q8_0,
    Q4_0: LlamaFileType.MOSTLY_Q4_0,
    Q4_1: LlamaFileType.MOSTLY_Q4_1,
    Q5_0: LlamaFileType.MOSTLY_Q5_0,
    Q5_1: LlamaFileType.MOSTLY_Q5_1,
}


def target_format(t: QTensor, fmt: Format) -> Format:
    """The format a tensor gets in a `fmt` file: vectors (norms) and ragged rows stay F32."""
    if len(t.shape) < 2 or t.shape[-1] % fmt.block_size:
        return F32
    return fmt


def _copy_metadata(src: GGUFReader, writer: GGUFWriter, fmt: Format) -> None:
    """Every key/value of `src` except the header fields, with general.file_type updated."""
    for name, field in src.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue  # the writer adds the header, the architecture, and the new file type
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub_type)
    writer.add_file_type(_FILE_TYPE[fmt])


def write_quantized(
    src: GGUFFile,
    dst_path: str | os.PathLike,
    fmt: Format | str,
    progress: Callable[[int], None] = lambda n_bytes: None,
) -> None:
    """Write `dst_path`: the model `src` with every matrix requantised to `fmt`, metadata kept.

    Tensors are converted one at a time as they are written (memory stays about one
    tensor); `progress(n)` is called with the source bytes of each finished tensor.
    """
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    check_writable(fmt)
    arch = src.metadata.get("general.architecture", "llama")
    writer = GGUFWriter(os.fspath(dst_path), arch, use_temp_file=False)
    _copy_metadata(src.reader, writer, fmt)
    plan = [(t, target_format(t, fmt)) for t in src.tensors.values()]
    for t, out in plan:  # the writer takes uint8 tensors by their byte shape
        byte_shape = (*t.shape[:-1], out.row_bytes(t.shape[-1]))
        n_bytes = int(np.prod(byte_shape, dtype=np.int64))
        writer.add_tensor_info(
            t.name, byte_shape, np.dtype(np.uint8), n_bytes, raw_dtype=out.ggml_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t, out in plan:
        raw = t.data if out is t.format else quantize(dequantize(t.data, t.format), out)
        writer.write_tensor_data(raw)
        progress(t.nbytes)
    writer.close()


def file_type_name(value: Any) -> str | None:
    """general.file_type as llama.cpp names it ('MOSTLY_Q4_K_M'), or None when absent.

    A preset only names the mix llama-quantize aimed at; each tensor has its own type.
    """
    if value is None:
        return None
    try:
        return LlamaFileType(int(value)).name
    except (ValueError, TypeError):
        return f"unknown ({value!r})"


def summary(gf: GGUFFile) -> dict[str, Any]:
    """What `refinfer info` shows: hyper-parameters, tensor counts by type, sizes, KV bytes."""
    config = gf.config
    n_params = sum(t.n_elements for t in gf.tensors.values())
    by_type: dict[str, int] = {}
    bytes_by_type: dict[str, int] = {}
    for t in gf.tensors.values():
        by_type[t.format.name] = by_type.get(t.format.name, 0) + 1
        bytes_by_type[t.format.name] = bytes_by_type.get(t.format.name, 0) + t.nbytes
    order = sorted(by_type, key=lambda name: -bytes_by_type[name])
    return {
        "file": gf.path.name,
        "file_size": gf.file_size,
        "name": gf.metadata.get("general.name"),
        "config": config.to_dict(),
        "n_tensors": len(gf.tensors),
        "file_type": file_type_name(gf.metadata.get("general.file_type")),
        "tensor_types": {name: by_type[name] for name in order},
        "tensor_bytes": {name: bytes_by_type[name] for name in order},
        "n_parameters": n_params,
        "bytes_per_parameter": sum(t.nbytes for t in gf.tensors.values()) / n_params,
        "kv_dtype": "float32",
        "kv_bytes_per_token": config.kv_bytes_per_token(),
    }
