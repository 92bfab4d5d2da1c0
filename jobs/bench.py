"""`fcodec bench`: where the time goes, pipeline overhead, scaling, memory — JSON + Markdown.

Sections: (1) codec stage breakdown per megapixel on the tiny backbone and on TAESD (when
../shared is present); (2) pipeline efficiency: the Ray compress job's images/s over a bare
in-process loop on the same codec and images, same run; (3) 1 vs 2 actors and the model of N
GPUs; (4) peak RSS per actor for a dataset and one 10x larger; (5) GPU section when a GPU is present.
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
    p.add_argument("--sections", default="stages,pipeline,scaling,memory,gpu",
                   help="comma list of sections to run (default: %(default)s)")
    p.add_argument("--docs", default=None, metavar="FILE", help="also rewrite this Markdown file (e.g. docs/performance.md)")
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
            if "pipeline" in sections:
                # End to end at N and 4N images; the difference cancels the fixed start-up (actor
                # processes, codec load), leaving the per-image cost that dominates real archives.
                big = write_samples(data / "big", n=4 * args.images, sizes=((args.size, args.size),))
                shard = max(args.batch, args.images // 2)
                bare_n, bare_4n = bare_loop(small, spec, args.batch), bare_loop(big, spec, args.batch)
                job_n = ray_job(str(data / "small"), spec, 1, args.batch, shard)
                job_4n = ray_job(str(data / "big"), spec, 1, args.batch, shard)
                marginal = lambda a, b: (b["images"] - a["images"]) / max(1e-9, b["seconds"] - a["seconds"])  # noqa: E731
                res["pipeline"] = {"bare_loop": bare_n, "bare_loop_4x": bare_4n, "ray_job_1_actor": job_n,
                                   "ray_job_1_actor_4x": job_4n,
                                   "end_to_end_efficiency": job_4n["images_per_s"] / bare_4n["images_per_s"],
                                   "bare_marginal_images_per_s": marginal(bare_n, bare_4n),
                                   "ray_marginal_images_per_s": marginal(job_n, job_4n),
                                   "fixed_startup_s": job_n["seconds"] - job_n["images"] / marginal(job_n, job_4n)}
                res["pipeline"]["efficiency"] = res["pipeline"]["ray_marginal_images_per_s"] / res["pipeline"]["bare_marginal_images_per_s"]
                print(f"pipeline efficiency: {res['pipeline']['efficiency']:.2f}x the bare loop (steady state); "
                      f"end to end on {job_4n['images']} images: {res['pipeline']['end_to_end_efficiency']:.2f}x")
            if "scaling" in sections:
                one = ray_job(str(data / "small"), spec, 1, args.batch, max(args.batch, args.images // 4))
                base = res.get("pipeline", {}).get("ray_marginal_images_per_s") or one["images_per_s"]
                two = ray_job(str(data / "small"), spec, 2, args.batch, max(args.batch, args.images // 4))
                eff = two["images_per_s"] / (2 * one["images_per_s"])
                res["scaling"] = {"1_actor": one, "2_actors": two, "speedup": two["images_per_s"] / one["images_per_s"],
                                  "per_actor_efficiency": eff,
                                  "model_n_gpus": {n: base * n for n in (1, 2, 4, 8, 16)},
                                  "note": f"this machine has {res['machine']['cpus']} CPUs shared by reading, actors and the driver, "
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

    if "gpu" in sections and torch.cuda.is_available():
        res["gpu"] = _gpu_section(args)
    elif "gpu" in sections:
        res["gpu"] = {"skipped": "no CUDA device on this machine"}

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "bench.json", json.dumps(res, indent=2).encode())
    md = to_markdown(res)
    atomic_write(out / "bench.md", md.encode())
    if args.docs:
        atomic_write(args.docs, md.encode())
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


def _gpu_section(args) -> dict:
    """SD-2.1 architecture with random weights at 512x512 and 768x512: encode/decode images/s at
    several t and batch sizes, fp32 vs bf16."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from codec import Backbone, CodecConfig, DiffusionCodec
    from codec.backbone import sd_alphas_cumprod
    from jobs.samples import sample_image

    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, sample_size=768)
    unet = UNet2DConditionModel(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                                use_linear_projection=True)
    bb = Backbone(vae=vae.eval(), unet=unet.eval(), alphas_cumprod=sd_alphas_cumprod(), prediction_type="v_prediction",
                  prompt_embeds=torch.zeros(1, 77, 1024), scaling_factor=0.18215, name="sd21-arch-random")
    bb.to("cuda")
    rows = []
    for prec in ("float32", "bfloat16"):
        codec = DiffusionCodec(bb, config=CodecConfig(precision=prec))
        for (h, w) in ((512, 512), (512, 768)):
            for batch in (1, 4):
                imgs = [sample_image(i, h, w) for i in range(batch)]
                for t in (50, 200):
                    codec.encode(imgs, t=t)  # warm-up
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    enc = codec.encode(imgs, t=t)
                    torch.cuda.synchronize()
                    t1 = time.perf_counter()
                    codec.decode([e.data for e in enc], steps=args.steps)
                    torch.cuda.synchronize()
                    t2 = time.perf_counter()
                    rows.append({"precision": prec, "size": f"{w}x{h}", "batch": batch, "t": t,
                                 "encode_img_s": batch / (t1 - t0), "decode_img_s": batch / (t2 - t1)})
    return {"rows": rows, "device": torch.cuda.get_device_name(0)}


def to_markdown(res: dict) -> str:
    """The figures as the Markdown page docs/performance.md keeps."""
    p = res["params"]
    lines = ["# Performance", "",
             f"Measured {res['started']} on {res['machine']['cpus']} CPUs ({res['machine']['platform']}), "
             f"torch {res['machine']['torch']}, GPU: {res['machine']['gpu'] or 'none'}.", "",
             "Produced by:", "", "```bash",
             f"fcodec bench --images {p['images']} --size {p['size']} --t {p['t']} --steps {p['steps']} --batch {p['batch']} --docs docs/performance.md",
             "```", ""]
    if "pipeline" in res:
        pl = res["pipeline"]
        lines += ["## Pipeline efficiency", "",
                  f"pipeline efficiency: {pl['efficiency']:.2f}× the bare loop", "",
                  "Steady state: images/s between a run of N and one of 4N images (the difference cancels the job's "
                  f"fixed start-up of {pl['fixed_startup_s']:.1f} s: actor processes, imports, codec load). "
                  f"End to end on {pl['ray_job_1_actor_4x']['images']} images, start-up included: "
                  f"{pl['end_to_end_efficiency']:.2f}×.", "",
                  "| | images | seconds | images/s |", "|---|---|---|---|"]
        for name, key in (("bare in-process loop", "bare_loop"), ("bare in-process loop, 4N", "bare_loop_4x"),
                          ("Ray compress job, 1 actor", "ray_job_1_actor"), ("Ray compress job, 1 actor, 4N", "ray_job_1_actor_4x")):
            r = pl[key]
            lines.append(f"| {name} | {r['images']} | {r['seconds']:.2f} | {r['images_per_s']:.2f} |")
        lines += [f"| marginal (steady state): bare | | | {pl['bare_marginal_images_per_s']:.2f} |",
                  f"| marginal (steady state): Ray job | | | {pl['ray_marginal_images_per_s']:.2f} |", "", "Target: ≥ 0.90×.", ""]
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
            lines += [f"Device: {gp['device']}. SD 2.1 architecture, random weights.", "",
                      "| precision | size | batch | t | encode img/s | decode img/s |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['precision']} | {r['size']} | {r['batch']} | {r['t']} | {r['encode_img_s']:.2f} | {r['decode_img_s']:.2f} |" for r in gp["rows"]]
        else:
            lines.append(f"Skipped: {gp['skipped']}.")
        lines.append("")
    return "\n".join(lines)
