"""`fcodec bench`'s outputs: bench.json, and the Markdown page docs/performance.md keeps."""
from __future__ import annotations

import json
from pathlib import Path

from .storage import get_fs, write_atomic


def write_report(res: dict, out: Path, docs: str | None = None) -> None:
    """OUT/bench.json and OUT/bench.md; with `docs`, rewrite that Markdown page too, keeping its
    hand-written "## Notes" section (if any)."""
    def write(path: Path | str, text: str) -> None:  # readers never see half a file
        fs, p = get_fs(str(Path(path).resolve()))
        write_atomic(fs, p, text.encode())

    md = to_markdown(res)
    write(out / "bench.json", json.dumps(res, indent=2))
    write(out / "bench.md", md)
    if docs:
        old = Path(docs).read_text() if Path(docs).is_file() else ""
        notes = old[old.index("\n## Notes"):] if "\n## Notes" in old else ""
        write(docs, md.rstrip("\n") + "\n" + notes if notes else md)


def to_markdown(res: dict) -> str:
    """The figures as the Markdown page docs/performance.md keeps."""
    p = res["params"]
    lines = ["# Performance", "",
             f"Measured {res['started']} on {res['machine']['cpus']} CPUs ({res['machine']['platform']}), "
             f"torch {res['machine']['torch']}, GPU: {res['machine']['gpu'] or 'none'}.", "",
             "Produced by:", "", "```bash",
             f"fcodec bench --images {p['images']} --size {p['size']} --t {p['t']} --steps {p['steps']} --batch {p['batch']} "
             f"--repeats {p.get('repeats', 1)} --docs docs/performance.md",
             "```", ""]
    if "pipeline" in res:
        pl = res["pipeline"]
        lines += ["## Pipeline efficiency", "",
                  f"pipeline efficiency: {pl['efficiency']:.2f}× the bare loop", "",
                  f"Steady state, median of {len(pl['repeats'])} repeats: the Ray compress job (1 shard worker that reads, "
                  f"decodes, encodes and writes its Parquet parts; the driver commits each shard's record) against a bare loop over the same codec and files in one process. "
                  f"Each rate is marginal: runs on N = {pl['images'][0]} and 4N = {pl['images'][1]} images, the extra images "
                  f"over the extra seconds, so fixed costs cancel: the job's start-up ({pl['startup_s']:.1f} s here: actor "
                  f"process, torch and diffusers imports, codec load; first output after {pl['first_output_s']:.1f} s) is "
                  f"reported apart, not hidden. End to end on 4N, start-up included: {pl['end_to_end_efficiency']:.2f}×. "
                  f"The actor reads and decodes images in {pl['io_threads']} I/O threads beside the model by default; "
                  f"with 1: {pl['efficiency_other']:.2f}×.", "",
                  "| repeat | bare loop img/s | Ray job img/s | ratio | 1 I/O thread img/s | ratio | end to end (4N) |",
                  "|---|---|---|---|---|---|---|"]
        for i, r in enumerate(pl["repeats"], 1):
            lines.append(f"| {i} | {r['bare_marginal_images_per_s']:.2f} | {r['ray_marginal_images_per_s']:.2f} | "
                         f"{r['efficiency']:.2f} | {r['ray_other_marginal_images_per_s']:.2f} | "
                         f"{r['efficiency_other']:.2f} | {r['end_to_end_efficiency']:.2f} |")
        lines += ["", "Target: ≥ 0.90×.", ""]
    if "fastpath" in res:
        fp = res["fastpath"]
        lines += ["## Codec speed options (tiny backbone, one process)", "",
                  f"{fp['images']} images of {fp['size']} px, {fp['threads']} torch threads, best of the repeats.", "",
                  "| channels-last | entropy overlapped | encode img/s | decode img/s |", "|---|---|---|---|"]
        lines += [f"| {'on' if r['channels_last'] else 'off'} | {'on' if r['overlap_entropy'] else 'off'} | "
                  f"{r['encode_img_s']:.1f} | {r['decode_img_s']:.1f} |" for r in fp["rows"]] + [""]
    if "stages" in res:
        lines += ["## Codec stages (seconds per megapixel)", ""]
        names = list(dict.fromkeys(k for v in res["stages"].values() for k in v["stages_s_per_mp"]))
        lines += ["| stage | " + " | ".join(res["stages"]) + " |", "|---|" + "---|" * len(res["stages"])]
        for n in names:
            lines.append(f"| {n} | " + " | ".join(f"{v['stages_s_per_mp'].get(n, float('nan')):.4f}" for v in res["stages"].values()) + " |")
        lines.append("| **entropy coding + bitstream share** | " + " | ".join(f"{v['entropy_share'] * 100:.2f}%" for v in res["stages"].values()) + " |")
        lines += ["", "Target: entropy coding + bitstream handling ≤ 5% of encode+decode on the tiny backbone.", ""]
    if "scaling" in res:
        s = res["scaling"]
        lines += ["## Scaling", "", f"2 actors = {s['speedup']:.2f}× one actor on this machine "
                  f"(per-actor efficiency {s['per_actor_efficiency']:.2f}). {s['note']}.", "",
                  "| GPUs (model) | images/s |", "|---|---|"]
        lines += [f"| {n} | {v:.2f} |" for n, v in s["model_n_gpus"].items()] + [""]
    if "memory" in res:
        m = res["memory"]
        g = m["growth"]
        lines += ["## Memory", "", f"Peak RSS per actor: {m['peak_rss_mb'][0]:.0f} MB for {m['dataset']['images']} images, "
                  f"{m['peak_rss_mb'][1]:.0f} MB for {m['dataset_10x']['images']} images "
                  f"({'n/a' if g is None else f'{g * 100:+.1f}%'}; target within ±10%).", ""]
    if "gpu" in res:
        gp = res["gpu"]
        lines += ["## GPU", ""]
        if "rows" in gp:
            lines += [f"Device: {gp['device']}. Backbone: {gp.get('backbone', 'sd21-arch-random')} (SD 2.1 architecture, "
                      f"random weights), {gp.get('steps', p['steps'])} DDIM steps at decode.", "",
                      "| precision | size | batch | t | encode img/s | decode img/s |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['precision']} | {r['size']} | {r['batch']} | {r['t']} | {r['encode_img_s']:.2f} | {r['decode_img_s']:.2f} |" for r in gp["rows"]]
        else:
            lines.append(f"Skipped: {gp['skipped']}.")
        lines.append("")
    return "\n".join(lines)
