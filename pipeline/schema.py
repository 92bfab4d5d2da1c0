"""Parquet schemas of the datasets the jobs write, in one place (users query these columns by name).

Bitstream dataset (`fcodec compress`): one row per input image, ok or failed.
Decoded dataset (`fcodec decompress --format parquet`): one row per decoded image.

The `bitstream`/`png` blobs are `large_binary`, written without Parquet compression (they are
already entropy coded / deflated) and without dictionary encoding (every value is unique);
row groups are sized in bytes, not rows, so a group holds tens of MB of blobs.
"""
from __future__ import annotations

import pyarrow as pa

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_SKIPPED = "skipped"  # decoded datasets: the bitstream row had failed at compression

BITSTREAM_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),          # path relative to SRC (tar/parquet: shard/member)
    pa.field("source_uri", pa.string(), nullable=False),   # fsspec URL of the source (tar://m::s3://b/x.tar)
    pa.field("source_sha256", pa.string()),                # hex sha256 of the source bytes (null if unreadable)
    pa.field("width", pa.int32()),                         # original pixels (null when the image did not decode)
    pa.field("height", pa.int32()),
    pa.field("bitstream", pa.large_binary()),              # the record `fcodec decode` reads (null when failed)
    pa.field("bitstream_sha256", pa.string()),
    pa.field("n_bytes", pa.int64()),                       # len(bitstream)
    pa.field("bpp", pa.float64()),                         # n_bytes * 8 / (width * height)
    pa.field("t", pa.int32()),                             # diffusion step the quantization matched
    pa.field("codec_fingerprint", pa.string()),            # hex: backbone fingerprint (8 B) + codec fingerprint (8 B)
    pa.field("codec_version", pa.string()),
    pa.field("status", pa.string(), nullable=False),       # "ok" | "failed"
    pa.field("error", pa.string()),                        # null when ok; one clear line when failed
])

# WebDataset inputs: the other members of an image's key, byte for byte, as a list of
# {ext, data} (e.g. ext "json", "txt", "cls"; a list of structs, which every reader — HF
# datasets included — understands, unlike an Arrow map). Written in every layout-2 part (null
# for other inputs), so a dataset's parts agree on it.
SIDECARS_FIELD = pa.field("sidecars", pa.list_(pa.struct([("ext", pa.string()), ("data", pa.binary())])))


# --dedupe: a row whose source bytes equal an earlier row's stores no bitstream, only that
# row's key (decompress decodes the referenced bitstream). Null in every other row.
REF_KEY_FIELD = pa.field("ref_key", pa.string())


def carried_name(column: str) -> str:
    """The name a Parquet input's column gets in the bitstream dataset: its own, or
    `source_<name>` where it would clash with one of ours (e.g. a `key` or `status` column)."""
    ours = set(BITSTREAM_SCHEMA.names) | {SIDECARS_FIELD.name, REF_KEY_FIELD.name} | set(DECODED_SCHEMA_NAMES)
    return f"source_{column}" if column in ours else column


DECODED_SCHEMA_NAMES = ("key", "width", "height", "image", "image_sha256", "status", "error")
# Hugging Face's `Image` feature: a struct of the encoded bytes and a path (declared in the schema
# metadata below, so `datasets.load_dataset("parquet", ...)` shows an Image column).
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

DECODED_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("image", IMAGE_TYPE),                          # {bytes: PNG/WebP/JPEG, path: the output name}
    pa.field("image_sha256", pa.string()),
    pa.field("status", pa.string(), nullable=False),       # "ok" | "failed" | "skipped"
    pa.field("error", pa.string()),
])

BLOB_COLUMNS = {"bitstream", "image.bytes", "sidecars"}


def hf_features_metadata(schema: pa.Schema) -> dict[bytes, bytes]:
    """Schema metadata declaring `image` an HF `Image` feature (the other columns as their
    Arrow types), which is how `datasets` recognises an image column in a Parquet file."""
    import json

    feats = {}
    for f in schema:
        if f.name == "image":
            feats[f.name] = {"_type": "Image"}
        elif pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            feats[f.name] = {"dtype": "string", "_type": "Value"}
        elif pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_boolean(f.type):
            t = str(f.type)
            feats[f.name] = {"dtype": {"double": "float64", "float": "float32", "halffloat": "float16"}.get(t, t),
                             "_type": "Value"}
    return {b"huggingface": json.dumps({"info": {"features": feats}}).encode()}
ROW_GROUP_BYTES = 32 << 20  # target bytes of blobs per row group


def empty_table(schema: pa.Schema) -> pa.Table:
    """A zero-row table of `schema`."""
    return schema.empty_table()


def to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows (dicts with at least the schema's columns) -> a table with exactly `schema`'s columns."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)


def parquet_write_kwargs(table: pa.Table) -> dict:
    """`pyarrow.parquet.write_table` options: blobs uncompressed and without dictionary or
    statistics, small columns zstd; row groups sized so each holds ~ROW_GROUP_BYTES of data."""
    names = [f.name for f in table.schema if not pa.types.is_nested(f.type)]
    leaves = [f"{f.name}.{c.name}" for f in table.schema if pa.types.is_struct(f.type) for c in f.type]
    small = [n for n in names if n not in BLOB_COLUMNS]
    rows = max(1, table.num_rows)
    row_bytes = max(1, table.nbytes // rows)
    return {
        "compression": {n: ("NONE" if n in BLOB_COLUMNS else "ZSTD") for n in names + leaves},
        "use_dictionary": small,
        "write_statistics": small,
        "row_group_size": max(1, ROW_GROUP_BYTES // row_bytes),
    }


def check_schema(schema: pa.Schema, want: pa.Schema = BITSTREAM_SCHEMA) -> None:
    """Raise ValueError naming the difference when `schema` lacks `want`'s columns/types."""
    got = {f.name: f.type for f in schema}
    missing = [f.name for f in want if f.name not in got]
    wrong = [f"{f.name} is {got[f.name]}, expected {f.type}" for f in want if f.name in got and got[f.name] != f.type]
    if missing or wrong:
        raise ValueError("not a foundation-codec dataset: " + "; ".join(
            ([f"missing columns {missing}"] if missing else []) + wrong))
