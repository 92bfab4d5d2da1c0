"""Ray Data stages and storage I/O; knows nothing of diffusion internals.

sources.py  list SRC (fsspec: local, s3://, gs://, globs; files, tar shards, Parquet), stable shards, read bytes
storage.py  StorageOptions (endpoint; credentials from the environment), atomic writes, dataset layout
schema.py   the Parquet schemas of bitstream and decoded datasets
actors.py   EncodeActor / DecodeActor: codec loaded once per actor; callable on a batch without Ray
run.py      compress() / decompress(): plan, Ray Data graph, per-shard commits, resume, stats
audit.py, report.py, train.py: the audit, report and training jobs (see their docstrings)
"""
