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
import json
import platform
import time
from pathlib import Path

from .common import atomic_write


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
    p.add_argument("--sections", default="stages,fastpath,pipeline,scaling,memory,gpu",
                   help="comma list of sections to run (default: %(default)s)")
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
    import torch

    from codec import load_codec
    from codec.profiling import stage_breakdown
    from jobs.samples import sample_image, write_samples

    out = Path(args.out)
    sections = set(args.sections.split(","))
    res: dict = {"machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform(),
                             "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
                 "params": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    imgs = [sample_image(i, args.size, args.size) for i in range(4)]
    if getattr(args, "sim_cluster", 0):  # runs in subprocesses with their own Ray: before this process starts one
        from pipeline.simcluster import bench_section

        res["sim_cluster"] = bench_section(args.sim_cluster, args.sim_inputs, args.sim_latency_ms, args.sim_batch,
                                           workdir=out / "sim", sweep=tuple(int(x) for x in args.sim_sweep.split(",") if x))

    if "stages" in sections:
        res["stages"] = {"tiny": stage_breakdown(load_codec("tiny"), imgs, t=args.t, steps=args.steps)}
        shared = Path(args.shared) if args.shared else Path(__file__).resolve().parents[2] / "shared"
        if (shared / "models" / "taesd").is_dir():
            res["stages"]["tiny+taesd"] = stage_breakdown(load_codec("tiny", vae=str(shared / "models" / "taesd")),
                                                          imgs, t=args.t, steps=args.steps)
        print(json.dumps({k: round(v["total_s_per_mp"], 3) for k, v in res["stages"].items()}), "s/MP")

    if sections & {"pipeline", "scaling", "memory"}:
        import ray

        from pipeline.bench import bare_loop, ray_job

        spec = {"backbone": args.backbone, "t": args.t, "batch_size": args.batch, "threads": 1}
        data = out / "data"
        small = write_samples(data / "small", n=args.images, sizes=((args.size, args.size),))
        ray.init(address="local", num_cpus=__import__("os").cpu_count(), include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
        try:
            # warm-up: imports, codec construction and Ray worker start-up are not what we compare
            ray_job(str(data / "small"), spec, 1, args.batch, args.images)
            bare_loop(small[: args.batch], spec, args.batch)
            if sections & {"pipeline", "scaling"}:  # N = 4x --images and 4N, a shard per batch
                mid = write_samples(data / "pipeline", n=4 * args.images, sizes=((args.size, args.size),))
                big = write_samples(data / "pipeline_4x", n=16 * args.images, sizes=((args.size, args.size),))
            if "pipeline" in sections:
                res["pipeline"] = _pipeline_section(args, spec, mid, big)
                pl = res["pipeline"]
                print(f"pipeline efficiency: {pl['efficiency']:.2f}x the bare loop (steady state, median of "
                      f"{len(pl['repeats'])}); image decoding moved {'into the actor' if pl['image_stage'] else 'to the read tasks'}: {pl['efficiency_other']:.2f}x; "
                      f"end to end {pl['end_to_end_efficiency']:.2f}x (start-up {pl['startup_s']:.1f} s)")
            if "scaling" in sections:
                shard = args.batch
                one = ray_job(str(data / "pipeline_4x"), spec, 1, args.batch, shard)
                two = ray_job(str(data / "pipeline_4x"), spec, 2, args.batch, shard)
                rate = lambda r: r["steady_images_per_s"] or r["images_per_s"]  # noqa: E731
                base = res.get("pipeline", {}).get("ray_marginal_images_per_s") or rate(one)
                res["scaling"] = {"1_actor": one, "2_actors": two, "speedup": rate(two) / rate(one),
                                  "per_actor_efficiency": rate(two) / (2 * rate(one)),
                                  "model_n_gpus": {n: base * n for n in (1, 2, 4, 8, 16)},
                                  "note": f"This machine has {res['machine']['cpus']} CPUs shared by reading, actors and the driver, "
                                          "so two actors compete for them; on GPUs each actor owns its device, so the model is "
                                          "N x one actor's steady-state rate (an upper bound: shared reads and the driver's commits are not modelled)"}
                print(f"scaling: 2 actors = {res['scaling']['speedup']:.2f}x one")
            if "memory" in sections:
                write_samples(data / "large", n=args.images * 10, sizes=((args.size, args.size),))
                a = ray_job(str(data / "small"), spec, 1, args.batch, args.images, sample_rss=True)
                b = ray_job(str(data / "large"), spec, 1, args.batch, args.images, sample_rss=True)
                pa, pb = max(a["peak_rss_mb_per_actor"] or [0]), max(b["peak_rss_mb_per_actor"] or [0])
                res["memory"] = {"dataset": a, "dataset_10x": b, "peak_rss_mb": [pa, pb],
                                 "growth": (pb / pa - 1) if pa else None}
                print(f"memory: peak RSS per actor {pa:.0f} MB -> {pb:.0f} MB with 10x the data")
        finally:
            ray.shutdown()

    if "fastpath" in sections:
        res["fastpath"] = _fastpath_section(args)
        print("fastpath:", ", ".join(f"cl={r['channels_last']} overlap={r['overlap_entropy']}: "
                                     f"{r['encode_img_s']:.1f}/{r['decode_img_s']:.1f} img/s" for r in res["fastpath"]["rows"]))

    if "gpu" in sections and torch.cuda.is_available():
        res["gpu"] = _gpu_section(args)
    elif "gpu" in sections:
        res["gpu"] = {"skipped": "no CUDA device on this machine"}

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "bench.json", json.dumps(res, indent=2).encode())
    md = to_markdown(res)
    atomic_write(out / "bench.md", md.encode())
    if args.docs:  # the page's hand-written "## Notes" (if any) survive the rewrite
        old = Path(args.docs).read_text() if Path(args.docs).is_file() else ""
        notes = old[old.index("\n## Notes"):] if "\n## Notes" in old else ""
        atomic_write(args.docs, (md.rstrip("\n") + "\n" + notes if notes else md).encode())
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


def _pipeline_section(args, spec: dict, small: list[Path], big: list[Path]) -> dict:
    """Bare loop vs the Ray job (as configured by default, and with image decoding in the other
    place: read tasks vs actors) on N and 4N images,
    `repeats` times in turn. Each rate is marginal: (4N - N) images over the difference of the
    two runs' wall times, which cancels every fixed cost (the job's start-up, the read tasks'
    processes starting) and leaves the per-image rate a long archive job runs at. The figures
    are medians over the repeats."""
    from statistics import median

    from pipeline.bench import bare_loop, ray_job

    def marginal(a: dict, b: dict) -> float:
        return (b["images"] - a["images"]) / max(1e-9, b["seconds"] - a["seconds"])

    src_n, src_4n = str(small[0].parent), str(big[0].parent)
    reps = []
    for _ in range(max(1, args.repeats)):
        runs = {"bare_loop": bare_loop(small, spec, args.batch), "bare_loop_4x": bare_loop(big, spec, args.batch)}
        for name in ("ray_job", "ray_job_other"):
            # the default placement of image decoding, then the other place
            stage = None if name == "ray_job" else not runs["ray_job"]["image_stage"]
            runs[name] = ray_job(src_n, spec, 1, args.batch, args.batch, image_stage=stage)
            runs[name + "_4x"] = ray_job(src_4n, spec, 1, args.batch, args.batch, image_stage=stage)
        bare = marginal(runs["bare_loop"], runs["bare_loop_4x"])
        job, other = marginal(runs["ray_job"], runs["ray_job_4x"]), marginal(runs["ray_job_other"], runs["ray_job_other_4x"])
        reps.append({**runs, "bare_marginal_images_per_s": bare, "ray_marginal_images_per_s": job,
                     "ray_other_marginal_images_per_s": other, "efficiency": job / bare, "efficiency_other": other / bare,
                     "end_to_end_efficiency": runs["ray_job_4x"]["images_per_s"] / runs["bare_loop_4x"]["images_per_s"],
                     "fixed_startup_s": runs["ray_job"]["seconds"] - runs["ray_job"]["images"] / job})
    med = lambda k: median(r[k] for r in reps)  # noqa: E731
    return {"images": [len(small), len(big)], "repeats": reps, "efficiency": med("efficiency"),
            "image_stage": reps[0]["ray_job"]["image_stage"], "efficiency_other": med("efficiency_other"), "end_to_end_efficiency": med("end_to_end_efficiency"),
            "startup_s": med("fixed_startup_s"), "first_output_s": median(r["ray_job_4x"]["first_output_s"] or 0 for r in reps),
            "bare_marginal_images_per_s": med("bare_marginal_images_per_s"), "ray_marginal_images_per_s": med("ray_marginal_images_per_s")}


def _fastpath_section(args) -> dict:
    """The codec's own speed options side by side on one process: channels-last weights and
    entropy coding overlapped with the model, each on and off (encode and decode images/s)."""
    import torch

    from codec import CodecConfig, load_codec
    from jobs.samples import sample_image

    imgs = [sample_image(i, args.size, args.size) for i in range(2 * args.batch)]
    rows = []
    for cl, ov in ((False, False), (True, False), (False, True), (True, True)):
        codec = load_codec("tiny", config=CodecConfig(batch_size=8, t=args.t, steps=args.steps, channels_last=cl, overlap_entropy=ov))
        recs = [e.data for e in codec.encode(imgs[:8])]  # warm-up
        codec.decode(recs)
        best_e = best_d = 0.0
        for _ in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            recs = [e.data for e in codec.encode(imgs)]
            t1 = time.perf_counter()
            codec.decode(recs)
            t2 = time.perf_counter()
            best_e, best_d = max(best_e, len(imgs) / (t1 - t0)), max(best_d, len(imgs) / (t2 - t1))
        rows.append({"channels_last": cl, "overlap_entropy": ov, "encode_img_s": best_e, "decode_img_s": best_d})
    return {"rows": rows, "threads": torch.get_num_threads(), "images": len(imgs), "size": args.size}


def sd21_random_backbone():
    """Stable Diffusion 2.1's architecture (VAE + v-prediction UNet, 1024-d cross-attention) with
    random weights: the speed of the real model without its download."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from codec import Backbone
    from codec.backbone import sd_alphas_cumprod

    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, sample_size=768)
    unet = UNet2DConditionModel(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                                use_linear_projection=True)
    return Backbone(vae=vae.eval().requires_grad_(False), unet=unet.eval().requires_grad_(False),
                    alphas_cumprod=sd_alphas_cumprod(), prediction_type="v_prediction",
                    prompt_embeds=torch.zeros(1, 77, 1024), scaling_factor=0.18215, name="sd21-arch-random")


def _gpu_section(args, device: str = "cuda", build=sd21_random_backbone, sizes=((512, 512), (512, 768)),
                 batches=(1, 4), ts=(50, 200)) -> dict:
    """Encode/decode images/s at several sizes, t and batch sizes, fp32 vs bf16 (SD-2.1
    architecture on the GPU by default; tests run the same loop on the CPU with the tiny one)."""
    import torch

    from codec import CodecConfig, DiffusionCodec
    from jobs.samples import sample_image

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    bb = build().to(device)
    rows = []
    for prec in ("float32", "bfloat16"):
        codec = DiffusionCodec(bb, config=CodecConfig(precision=prec, batch_size=max(batches)))
        for (h, w) in sizes:
            for batch in batches:
                imgs = [sample_image(i, h, w) for i in range(batch)]
                for t in ts:
                    codec.decode([e.data for e in codec.encode(imgs, t=t)], steps=args.steps)  # warm-up
                    sync()
                    t0 = time.perf_counter()
                    enc = codec.encode(imgs, t=t)
                    sync()
                    t1 = time.perf_counter()
                    codec.decode([e.data for e in enc], steps=args.steps)
                    sync()
                    t2 = time.perf_counter()
                    rows.append({"precision": prec, "size": f"{w}x{h}", "batch": batch, "t": t,
                                 "bpp": sum(e.bpp for e in enc) / len(enc),
                                 "encode_img_s": batch / (t1 - t0), "decode_img_s": batch / (t2 - t1)})
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else device
    return {"rows": rows, "device": name, "backbone": bb.name, "steps": args.steps}


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
        where = lambda stage: "in the read tasks" if stage else "inside the actor"  # noqa: E731
        lines += ["## Pipeline efficiency", "",
                  f"pipeline efficiency: {pl['efficiency']:.2f}× the bare loop", "",
                  f"Steady state, median of {len(pl['repeats'])} repeats: the Ray compress job (1 actor; read, decode-image "
                  f"and encode stages; Parquet commits) against a bare loop over the same codec and files in one process. "
                  f"Each rate is marginal: runs on N = {pl['images'][0]} and 4N = {pl['images'][1]} images, the extra images "
                  f"over the extra seconds, so fixed costs cancel: the job's start-up ({pl['startup_s']:.1f} s here: actor "
                  f"process, torch and diffusers imports, codec load; first output after {pl['first_output_s']:.1f} s) is "
                  f"reported apart, not hidden. End to end on 4N, start-up included: {pl['end_to_end_efficiency']:.2f}×. "
                  f"Images are decoded {where(pl['image_stage'])} by default here; {where(not pl['image_stage'])} instead: "
                  f"{pl['efficiency_other']:.2f}×.", "",
                  f"| repeat | bare loop img/s | Ray job img/s | ratio | decode {where(not pl['image_stage'])} img/s | ratio | end to end (4N) |",
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
