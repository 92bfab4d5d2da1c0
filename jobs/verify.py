"""`fcodec verify DATASET`: check every record of a bitstream dataset without decoding it
(Parquet, schema, CRC, hashes, fingerprints, size and t columns, v2 binding tags, safe keys,
counts against the books, duplicates, orphan part files; with an HMAC key, record and books
signatures); exit 0 only when the archive is whole.

Check every record of a `fcodec compress` dataset: readable Parquet with the bitstream schema,
every ok row's bitstream parses (magic, version, CRC, lengths) and matches its sha256, n_bytes,
size and codec fingerprint; row counts and totals match the commit records and the manifest; no
duplicate or unsafe keys; no part file without a commit record; the width/height/t columns
match the records and v2 records are bound to their row's key and source_sha256. With
$FCODEC_HMAC_KEY (or --hmac-key-file) also every record's HMAC and the books signature.
"""
from __future__ import annotations

import argparse
import json

from .options import add_codec_options, add_storage_options, codec_given, job_parser, storage_options

EXIT_WHOLE, EXIT_WHOLE_WITH_FAILED_ROWS, EXIT_PROBLEMS = 0, 1, 3  # 2: could not be read at all


def add_parser(sub) -> argparse.ArgumentParser:
    p = job_parser(sub, "verify", help="check a bitstream dataset is whole (CRC, hashes, counts) without decoding it",
                   description=__doc__,
                   epilog="exit codes: 0 = whole; 1 = whole, but with failed rows (recorded failures of the "
                          "compress job); 3 = problems (listed); 2 = the dataset could not be read at all",
                   positionals=[("dataset", "bitstream dataset folder or bucket prefix (s3://bucket/prefix)")])
    p.add_argument("--decode-sample", type=int, default=0, metavar="N",
                   help="also decode N random ok rows with the dataset's codec (its manifest) and check their size")
    p.add_argument("--seed", type=int, default=0, help="seed of the decode sample (default: %(default)s)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="pixel cap for parsed records (default: codec.limits' cap; never taken from the dataset)")
    p.add_argument("--max-bitstream-bytes", type=int, default=None, metavar="N",
                   help="a bitstream larger than this is reported, not loaded (default: codec.limits.MAX_VERIFY_BITSTREAM_BYTES)")
    p.add_argument("--hmac-key-file", default=None, metavar="PATH",
                   help="file holding the archive's HMAC key (default: $FCODEC_HMAC_KEY or $FCODEC_HMAC_KEY_FILE)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON instead of the summary")
    add_storage_options(p)
    add_codec_options(p, encode=False, decode=True)
    return p


def run(args: argparse.Namespace) -> int:
    from pipeline import integrity
    from pipeline.verify import KEY_FROM_ENV, format_report, verify_dataset

    key = integrity.load_key({integrity.ENV_KEY_FILE: args.hmac_key_file}) if args.hmac_key_file else KEY_FROM_ENV
    rep = verify_dataset(args.dataset, storage_options(args), decode_sample=args.decode_sample, seed=args.seed,
                         codec_spec=codec_given(args), max_pixels=args.max_pixels, hmac_key=key,
                         max_bitstream_bytes=args.max_bitstream_bytes)
    if args.json:
        print(json.dumps(rep, indent=2, sort_keys=True))
    else:
        print("\n".join(format_report(rep)))
    if not rep["ok"]:
        return EXIT_PROBLEMS
    return EXIT_WHOLE_WITH_FAILED_ROWS if rep["failed_rows"] else EXIT_WHOLE
