"""How hidden states are laid out on disk: chunking, sharding and compression.

Two access patterns decide the layout (figures in docs/benchmarks.md, "Storage layout"):

* a whole layer, for the density analyses: one shard file per (layer, block of samples), so a layer
  is a handful of large sequential files;
* one sample across all layers, for interactive serving: small inner chunks inside each shard, so
  a single sample decodes ~36 KiB per layer rather than megabytes.

Values are stored as float32, whatever the compute dtype: bf16 and fp16 embed exactly in float32, and
Blosc's byte shuffle turns the all-zero low mantissa bytes of bf16-valued floats into nothing, so the
file is smaller than raw fp16 while staying lossless and readable by any Zarr reader. LZ4HC level 3
compresses real states as well as zstd level 1 (1.53x below raw fp16), encodes as fast, and decodes
about 10x faster (measured on SmolLM2 states; see docs/benchmarks.md), which is what serving single samples needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numcodecs
import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

from actstore.store.blosc_split import split_byte_streams

STATE_DTYPE = "float32"
# What a capture run may store its states as (``--store-dtype``). bfloat16 is kept in a float32 container (Zarr
# has no bfloat16 type every reader knows): the values are bf16's, exact, and byte shuffle drops the zero bytes.
STORE_DTYPES = {"float32": "float32", "bfloat16": "float32", "float16": "float16"}
INNER_CHUNK_BYTES = 64 * 1024
SHARD_BYTES = 4 * 1024 * 1024
LABEL_CHUNK = 65536  # samples per chunk of the 1-D label arrays


def _floor_pow2(x: float) -> int:
    n = 1
    while n * 2 <= x:
        n *= 2
    return n


@dataclass(frozen=True)
class StateLayout:
    """Chunk and shard shapes of a (layer, row, hidden) array of states (rows: samples, or tokens)."""

    hidden: int
    itemsize: int = 4

    @property
    def inner_samples(self) -> int:
        return _floor_pow2(max(1.0, INNER_CHUNK_BYTES / (self.itemsize * self.hidden)))

    @property
    def shard_samples(self) -> int:
        return max(self.inner_samples, _floor_pow2(SHARD_BYTES / (self.itemsize * self.hidden)))

    @property
    def chunks(self) -> tuple[int, int, int]:
        return (1, self.inner_samples, self.hidden)

    @property
    def shards(self) -> tuple[int, int, int]:
        return (1, self.shard_samples, self.hidden)


BLOSC_CNAME, BLOSC_LEVEL = "lz4hc", 3


def state_compressor(itemsize: int = 4) -> BloscCodec:
    """Blosc LZ4HC level 3 with byte shuffle: ~1.5x smaller than raw fp16 for bf16 states, fast both ways."""
    return BloscCodec(cname=BLOSC_CNAME, clevel=BLOSC_LEVEL, shuffle="shuffle", typesize=itemsize)


def state_compressors(itemsize: int = 4) -> list[BloscCodec | Crc32cCodec]:
    """The states' chunk codecs after the bytes codec: Blosc, then a CRC-32C of the stored frame, so any reader
    (actstore's, zarr-python, xarray) detects a corrupted chunk instead of decoding it into wrong values.
    Costs 4 bytes per inner chunk and a few percent of a read (docs/explanation/checksums.md)."""
    return [state_compressor(itemsize), Crc32cCodec()]


# A capture writes every token of every site: encoding speed counts as much as size. Blosc with byte shuffle
# in all cases; float32 values computed in float32 do not compress (their low mantissa bytes are noise), so
# LZ4 at its fastest (~12x LZ4HC's encoding speed there, 4 % larger); 16-bit values (bfloat16 kept in float32,
# float16) compress, and Zstandard level 1 makes them 6-14 % smaller than LZ4HC while encoding ~4x faster.
# Measured on SmolLM2 states of MMLU text (docs/benchmarks.md, "Capture"). Each inner chunk is one Blosc block
# (CAPTURE_BLOCK_BYTES): Blosc's own choice for Zstandard level 1 cuts a chunk into 32 KiB blocks, each with its
# own entropy tables, which decodes ~1.3x slower and encodes ~1.1x slower (a 36 KiB chunk of SmolLM2's float16
# states) for no gain in size.
CAPTURE_CODECS = {"float32": ("lz4", 1), "bfloat16": ("zstd", 1), "float16": ("zstd", 1)}
CAPTURE_BLOCK_BYTES = INNER_CHUNK_BYTES


def capture_compressors(store_dtype: str) -> list[BloscCodec | Crc32cCodec]:
    """A capture run's chunk codecs for states stored as ``store_dtype`` (CAPTURE_CODECS), then the CRC-32C."""
    cname, clevel = CAPTURE_CODECS[store_dtype]
    itemsize = np.dtype(STORE_DTYPES[store_dtype]).itemsize
    blosc = BloscCodec(cname=cname, clevel=clevel, shuffle="shuffle", typesize=itemsize, blocksize=CAPTURE_BLOCK_BYTES)
    return [blosc, Crc32cCodec()]


def compressed_nbytes(states: np.ndarray, store_dtype: str | None = None) -> int:
    """What ``states`` would take on disk (for estimates before writing): under a capture run's codec for
    ``store_dtype``, else the study's runs' codec, in float32."""
    cname, clevel = CAPTURE_CODECS[store_dtype] if store_dtype else (BLOSC_CNAME, BLOSC_LEVEL)
    dtype = STORE_DTYPES[store_dtype] if store_dtype else STATE_DTYPE
    codec = numcodecs.Blosc(cname, clevel, numcodecs.Blosc.SHUFFLE)
    split_byte_streams()  # as runs are written
    return len(codec.encode(np.ascontiguousarray(states, dtype=dtype)))
