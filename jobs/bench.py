"""`fcodec bench`: where the time goes, pipeline overhead, scaling, memory — JSON + Markdown.

Sections: (1) stages: codec stage breakdown per megapixel on the tiny backbone and on TAESD
(when ../shared is present); fastpath: channels-last and overlapped entropy coding on/off;
(2) pipeline: the Ray compress job's marginal images/s (N vs 4N images: fixed costs cancel)
over a bare in-process loop's on the same codec and images, same run, median of --repeats; (3) scaling: 1 vs 2 actors and the model of N
GPUs; (4) memory: peak RSS per actor for a dataset and one 10x larger; (5) gpu: SD-2.1
architecture, fp32 vs bf16, when a GPU is present.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="benchmark the codec stages and the pipeline; write JSON and Markdown",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out", help="folder for bench.json and bench.md (default: %(default)s)")
    p.add_argument("--backbone", default="tiny", help="backbone for the pipeline sections (default: %(default)s)")
    p.add_argument("--images", type=int, default=48, help="dataset size for pipeline sections (default: %(default)s)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default: %(default)s)")
    p.add_argument("--t", type=int, default=100)
    p.add_argument("--steps", type=int, default=4, help="DDIM steps in the decode stages (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="images per actor call / loop batch, as compress --rows-per-batch (default: %(default)s)")
    p.add_argument("--shared", default=None, help="folder with models/taesd (default: ../shared beside the repo)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the pipeline comparison; the median is reported (default: %(default)s)")
    p.add_argument("--sections", default="stages,fastpath,pipeline,scaling,memory,gpu",  # = pipeline.bench.SECTIONS
                   help="comma list of sections to run, or none (default: %(default)s)")
    p.add_argument("--docs", default=None, metavar="FILE", help="also rewrite this Markdown file (e.g. docs/performance.md)")
    # simulated cluster (pipeline/simcluster.py): the real compress job on K fake-GPU nodes, stand-in codec
    p.add_argument("--sim-cluster", type=int, default=0, metavar="K",
                   help="also run the simulated-cluster section on K fake-GPU nodes (default: skip)")
    p.add_argument("--sim-inputs", type=int, default=20000, metavar="N", help="tiny PNG inputs (default: %(default)s)")
    p.add_argument("--sim-latency-ms", type=float, default=100.0, metavar="MS",
                   help="stand-in codec's sleep per batch (default: %(default)s)")
    p.add_argument("--sim-batch", type=int, default=8, help="images per stand-in batch (default: %(default)s)")
    p.add_argument("--sim-sweep", default="", metavar="K,K", help="smaller cluster sizes to run too, e.g. 1,4,8 (the knee)")
    return p


def run(args: argparse.Namespace) -> int:
    from jobs.samples import sample_image, write_samples
    from pipeline.bench import BenchConfig, parse_sections, run_bench
    from pipeline.bench_report import write_report

    shared = Path(args.shared) if args.shared else Path(__file__).resolve().parents[2] / "shared"
    cfg = BenchConfig(backbone=args.backbone, images=args.images, size=args.size, t=args.t, steps=args.steps,
                      batch=args.batch, repeats=args.repeats, shared=str(shared),
                      sections=parse_sections(args.sections))  # checked before the simulated cluster runs
    out = Path(args.out)
    sim = None
    if args.sim_cluster:  # runs in subprocesses with their own Ray: before this process starts one
        from pipeline.simcluster import bench_section

        sim = bench_section(args.sim_cluster, args.sim_inputs, args.sim_latency_ms, args.sim_batch,
                            workdir=out / "sim", sweep=tuple(int(x) for x in args.sim_sweep.split(",") if x))
    res = run_bench(cfg, sample_image, lambda d, n, size: write_samples(d, n=n, sizes=((size, size),)), out / "data")
    if sim is not None:
        res["sim_cluster"] = sim
    write_report(res, out, args.docs)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0
