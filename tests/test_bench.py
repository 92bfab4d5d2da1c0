"""fcodec bench: the structure of what it reports (never the timings themselves)."""
import json
import subprocess
import sys

import pytest

from pipeline.bench_report import to_markdown


def test_stage_breakdown_covers_every_stage(tiny_codec, sample_images):
    from codec.profiling import stage_breakdown

    r = stage_breakdown(tiny_codec, [sample_images[0]] * 2, t=50, steps=3)
    stages = r["stages_s_per_mp"]
    assert {"vae_encode", "entropy_encode", "entropy_decode", "vae_decode"} <= set(stages)
    assert [k for k in stages if k.startswith("unet_step_")] == ["unet_step_1", "unet_step_2", "unet_step_3"]
    assert all(v > 0 for v in stages.values()) and 0 < r["entropy_share"] < 1
    assert r["megapixels"] == pytest.approx(2 * 64 * 64 / 1e6)


@pytest.mark.slow
def test_bench_cli_writes_json_markdown_and_the_efficiency_line(tmp_path):
    out = tmp_path / "bench"
    (tmp_path / "perf.md").write_text("# old figures\n\n## Notes\n\n- kept by hand\n")
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "bench", "--out", str(out), "--images", "4", "--size", "32",
                        "--batch", "4", "--repeats", "1", "--sections", "stages,fastpath,pipeline,gpu",
                        "--docs", str(tmp_path / "perf.md")], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "bench.json").read_text())
    rep = res["pipeline"]["repeats"][0]
    for name in ("bare_loop", "ray_job", "ray_job_other"):
        assert rep[name]["images"] == 16 and rep[name + "_4x"]["images"] == 64, name
    # the default run reads and decodes in 4 I/O threads per actor; the comparison run in one
    assert rep["ray_job"]["io_threads"] == 4 and rep["ray_job_other"]["io_threads"] == 1
    # 4 shards of 4 images reach the driver one by one: the job measures its own start-up and rate
    assert rep["ray_job"]["steady_images_per_s"] > 0 and rep["ray_job"]["first_output_s"] > 0
    assert rep["efficiency"] == rep["ray_marginal_images_per_s"] / rep["bare_marginal_images_per_s"]
    assert res["pipeline"]["efficiency"] > 0 and "tiny" in res["stages"]
    assert [(r["channels_last"], r["overlap_entropy"]) for r in res["fastpath"]["rows"]] == [
        (False, False), (True, False), (False, True), (True, True)]
    md = (tmp_path / "perf.md").read_text()
    assert "pipeline efficiency: " in md and "× the bare loop" in md and "fcodec bench" in md
    assert md.endswith("## Notes\n\n- kept by hand\n") and "old figures" not in md


def test_markdown_has_every_section():
    stage = {"stages_s_per_mp": {"vae_encode": 1.0, "unet_step_1": 2.0}, "entropy_share": 0.01, "total_s_per_mp": 3.0}
    run = {"images": 10, "seconds": 2.0, "images_per_s": 5.0, "steady_images_per_s": 6.0, "first_output_s": 1.0}
    res = {"started": "now", "machine": {"cpus": 2, "platform": "x", "torch": "2", "gpu": None},
           "params": {"images": 10, "size": 64, "t": 100, "steps": 4, "batch": 8},
           "stages": {"tiny": stage},
           "pipeline": {"images": [40, 160], "repeats": [{"bare_marginal_images_per_s": 6.0, "ray_marginal_images_per_s": 5.58,
                                                           "ray_other_marginal_images_per_s": 4.8, "efficiency": 0.93,
                                                           "efficiency_other": 0.8, "end_to_end_efficiency": 0.5}],
                        "efficiency": 0.93, "io_threads": 4, "efficiency_other": 0.8, "end_to_end_efficiency": 0.5,
                        "startup_s": 3.0,
                        "first_output_s": 3.5, "bare_marginal_images_per_s": 6.0, "ray_marginal_images_per_s": 5.58},
           "fastpath": {"rows": [{"channels_last": True, "overlap_entropy": False, "encode_img_s": 9.5, "decode_img_s": 2.25}],
                        "threads": 1, "images": 16, "size": 64},
           "scaling": {"speedup": 1.5, "per_actor_efficiency": 0.75, "model_n_gpus": {1: 5.0, 2: 7.5}, "note": "n"},
           "memory": {"dataset": run, "dataset_10x": run, "peak_rss_mb": [500.0, 520.0], "growth": 0.04},
           "gpu": {"skipped": "no CUDA device on this machine"}}
    md = to_markdown(res)
    assert "pipeline efficiency: 0.93× the bare loop" in md and "with 1: 0.80×" in md
    for h in ("## Codec stages", "## Scaling", "## Memory", "+4.0%", "## GPU", "1.00%", "| on | off | 9.5 | 2.2 |",
              "| 1 | 6.00 | 5.58 | 0.93 | 4.80 | 0.80 | 0.50 |"):
        assert h in md


def test_gpu_section_loop_runs_on_the_cpu_with_the_tiny_backbone():
    """The GPU section's loop (fp32 vs bf16, sizes, batches, t) on the CPU: it cannot time a GPU
    here, but it must not first fail on the day a GPU is lent."""
    from codec import Backbone
    from codec.profiling import precision_speed
    from jobs.samples import sample_image

    res = precision_speed(sample_image, steps=2, device="cpu", build=lambda: Backbone.tiny(0), sizes=((32, 48),),
                          batches=(1, 2), ts=(50,))
    assert [(r["precision"], r["batch"]) for r in res["rows"]] == [("float32", 1), ("float32", 2), ("bfloat16", 1), ("bfloat16", 2)]
    assert all(r["size"] == "48x32" and r["encode_img_s"] > 0 and r["decode_img_s"] > 0 and r["bpp"] > 0 for r in res["rows"])
    md = to_markdown({"started": "now", "machine": {"cpus": 2, "platform": "x", "torch": "2", "gpu": "cpu"},
                      "params": {"images": 1, "size": 32, "t": 50, "steps": 2, "batch": 2}, "gpu": res})
    assert "| bfloat16 | 48x32 | 2 | 50 |" in md and "tiny-0" in md


@pytest.mark.slow
def test_gpu_section_builds_the_sd21_architecture():
    """The random SD-2.1 backbone of the GPU section has SD 2.1's parameter counts."""
    from codec.profiling import sd21_random_backbone

    bb = sd21_random_backbone()
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(bb.unet) == 865_910_724 and n(bb.vae) == 83_653_863
    assert bb.prediction_type == "v_prediction" and bb.latent_channels == 4 and bb.pad_multiple == 64  # 8x VAE, 8x UNet


def test_sections_none_and_unknown_names():
    from pipeline.bench import SECTIONS, parse_sections

    assert parse_sections("none") == () and parse_sections("stages, gpu") == ("stages", "gpu")
    assert parse_sections(",".join(SECTIONS)) == SECTIONS
    with pytest.raises(ValueError, match=r"unknown bench sections \['stage'\].*or none"):
        parse_sections("stage,gpu")
