"""`fcodec verify DATASET`: check every record of a bitstream dataset without decoding it
(Parquet, schema, CRC, hashes, fingerprints, size and t columns, v2 binding tags, safe keys,
counts against the manifest and commit markers, duplicates, orphan part files; with an HMAC key,
record and books signatures); exit 0 only when the archive is whole."""
from __future__ import annotations

import argparse
import json


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("verify", help="check a bitstream dataset is whole (CRC, hashes, counts) without decoding it",
                       description="Check every record of a `fcodec compress` dataset: readable Parquet with the "
                                   "bitstream schema, every ok row's bitstream parses (magic, version, CRC, lengths) "
                                   "and matches its sha256, n_bytes, size and codec fingerprint; row counts and "
                                   "totals match the commit markers and _manifest.json; no duplicate or unsafe keys; "
                                   "no part file without a commit marker; the width/height/t columns match the "
                                   "records and v2 records are bound to their row's key and source_sha256. With "
                                   "$FCODEC_HMAC_KEY (or --hmac-key-file) also every record's HMAC and the books "
                                   "signature. Exit status 0: whole; 1: problems (listed); 2: the dataset could "
                                   "not be read at all.")
    p.add_argument("dataset", help="bitstream dataset folder or bucket prefix (s3://bucket/prefix)")
    p.add_argument("--decode-sample", type=int, default=0, metavar="N",
                   help="also decode N random ok rows with the dataset's codec options and check their size (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the decode sample (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, metavar="K", help="DDIM steps for the decode sample (default: the dataset's)")
    p.add_argument("--backbone", default=None, help="decode sample: override the manifest's backbone")
    p.add_argument("--vae", default=None, metavar="DIR", help="decode sample: override the manifest's VAE folder")
    p.add_argument("--codec-weights", default=None, metavar="DIR", help="decode sample: override the manifest's codec weights")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="pixel cap for parsed records (default: codec.limits' cap; never taken from the dataset)")
    p.add_argument("--max-bitstream-bytes", type=int, default=None, metavar="N",
                   help="a bitstream larger than this is reported, not loaded (default: codec.limits.MAX_VERIFY_BITSTREAM_BYTES)")
    p.add_argument("--hmac-key-file", default=None, metavar="PATH",
                   help="file holding the archive's HMAC key (default: $FCODEC_HMAC_KEY or $FCODEC_HMAC_KEY_FILE)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON instead of the summary")
    s = p.add_argument_group("storage (credentials come from AWS_* environment variables, never from flags)")
    s.add_argument("--s3-endpoint", default=None, metavar="URL", help="S3-compatible endpoint (default $FCODEC_S3_ENDPOINT or AWS)")
    s.add_argument("--s3-region", default=None)
    s.add_argument("--anon", action="store_true", help="anonymous access (public buckets)")
    return p


def run(args: argparse.Namespace) -> int:
    from pipeline import integrity
    from pipeline.storage import MANIFEST, StorageOptions
    from pipeline.verify import MANIFEST_FIELDS, KEY_FROM_ENV, format_report, shaped, verify_dataset

    opts = StorageOptions.from_env(args.s3_endpoint, args.s3_region, args.anon)
    key = integrity.load_key({integrity.ENV_KEY_FILE: args.hmac_key_file}) if args.hmac_key_file else KEY_FROM_ENV
    spec = None
    overrides = {k: getattr(args, k) for k in ("backbone", "vae", "codec_weights", "steps") if getattr(args, k) is not None}
    if overrides:
        from pipeline.storage import get_fs, read_manifest

        manifest = shaped(read_manifest(*get_fs(args.dataset, opts)) or {}, MANIFEST_FIELDS, MANIFEST)
        codec = manifest.get("config", {}).get("codec", {})
        spec = {**(codec if isinstance(codec, dict) else {}), **overrides}
    rep = verify_dataset(args.dataset, opts, decode_sample=args.decode_sample, seed=args.seed, codec_spec=spec,
                         max_pixels=args.max_pixels, hmac_key=key, max_bitstream_bytes=args.max_bitstream_bytes)
    if args.json:
        print(json.dumps(rep, indent=2, sort_keys=True))
    else:
        print("\n".join(format_report(rep)))
    return 0 if rep["ok"] else 1
