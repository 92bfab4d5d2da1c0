"""Ray stages (shard dispatch, Ray Data for training reads) and storage I/O; knows nothing of diffusion internals.

layout.py     the on-disk contract: paths, Manifest, CommitRecord, key index schema, internal columns
catalog.py    a dataset's books: read (either layout), commit, fold + compact, read_dataset
plan.py       a run's work: the source listing diffed against the key index (extend / sync)
lease.py      one writer per dataset
sources.py    list SRC (fsspec: local, s3://, gs://, globs; files, tar shards, Parquet), read bytes
storage.py    StorageOptions (endpoint; credentials from the environment), one retry policy, atomic writes
schema.py     the Parquet schemas of bitstream and decoded datasets
rows.py       row helpers every stage shares (tables, output names, one-line errors)
transform.py  image decoding / PNG encoding of rows
actors.py     EncodeActor / DecodeActor: the row engines (codec loaded once)
workers.py    ShardEncoder / ShardDecoder: Ray actors that read, code and write a shard, return its record
dispatch.py   the shard workers' actor pool: one call per shard, the driver asleep in ray.wait
raystart.py   the one Ray start-up policy of every job
run.py        compress() / decompress(): lease -> reconcile -> plan -> workers -> commit
audit.py, report.py, train.py, verify.py: the other jobs (see their docstrings)
"""
