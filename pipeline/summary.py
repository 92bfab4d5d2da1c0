"""A bitstream dataset's summary (`fcodec inspect DATASET`): what its manifest and books say,
either layout, local or object storage. No torch, no Ray: the books and one small column of
each part (`codec_version`)."""
from __future__ import annotations

from .catalog import Books
from .storage import StorageOptions, get_fs


def inspect_dataset(url: str, opts: StorageOptions | None = None) -> dict:
    """The summary of the dataset at `url`: codec, counts, shards, mean bpp, dates, versions."""
    from codec import registry
    from codec.inspect import InspectError

    fs, root = get_fs(str(url), opts)
    books = Books(fs, root)
    try:
        m = books.read_manifest()
        if m is None:
            raise InspectError(f"no manifest in '{url}': not a bitstream dataset (made by `fcodec compress`)")
        cat = books.read()
        versions: set[str] = set()
        for rec in cat.shards.values():
            if rec.file:
                versions.update(v for v in books.read_columns(books.path(rec.file), ["codec_version"])
                                .column(0).to_pylist() if v)
    except InspectError:
        raise
    except (OSError, ValueError) as e:
        raise InspectError(f"unreadable dataset books in '{url}': {e}") from None
    tot = m.totals
    fp = m.codec_fingerprint or ""
    bb = registry.backbone_for_fingerprint(fp[:16]) if len(fp) == 32 else None
    committed = [r.committed_at for r in cat.shards.values() if r.committed_at]
    return {
        "kind": "dataset", "source": str(url), "layout": m.layout, "format": m.format, "complete": m.complete,
        "codec": {k: m.codec.get(k) for k in ("backbone", "vae", "entropy", "codec_weights", "t", "target_bpp")},
        "codec_fingerprint": fp, "backbone": {"fingerprint": fp[:16], "name": bb.name if bb else None},
        "rows": tot.get("rows"), "ok": tot.get("ok"), "failed": tot.get("failed"),
        "rows_in_commits": sum(r.rows for r in cat.shards.values()),
        "shards_committed": len(cat.shards), "shards_planned": m.shards_planned, "part_files": len(books.part_files()),
        "mean_bpp": tot.get("mean_bpp"), "input_bytes": tot.get("input_bytes"), "output_bytes": tot.get("output_bytes"),
        "ratio": tot.get("ratio"), "errors": tot.get("errors") or {},
        "created_at": m.created_at or (min(committed) if committed else None), "updated_at": m.updated_at,
        "software_versions": sorted(versions | ({m.software_version} if m.software_version else set())),
    }


def format_dataset(info: dict) -> list[str]:
    """Human-readable lines for `inspect_dataset` output."""
    c = info["codec"]
    opts = ", ".join(f"{k}={v}" for k, v in c.items() if v is not None)
    bpp = f"{info['mean_bpp']:.4f}" if info["mean_bpp"] is not None else "-"
    planned = f" of {info['shards_planned']} planned" if info["shards_planned"] is not None else ""
    bb = info["backbone"]
    return [
        f"dataset:      {info['source']} (layout {info['layout']}, {'complete' if info['complete'] else 'incomplete'})",
        f"codec:        {opts}",
        f"backbone:     {bb['name'] or 'not a built-in'} ({bb['fingerprint']})",
        f"fingerprint:  {info['codec_fingerprint']}",
        f"images:       {info['rows']} rows: {info['ok']} ok, {info['failed']} failed",
        f"shards:       {info['shards_committed']} committed{planned}, {info['part_files']} part files",
        f"mean bpp:     {bpp} (input {info['input_bytes']} B, output {info['output_bytes']} B)",
        f"created:      {info['created_at'] or '-'}",
        f"updated:      {info['updated_at'] or '-'}",
        f"written by:   {', '.join(f'foundation-codec {v}' for v in info['software_versions']) or '-'}",
    ]
