"""Where the codec's time goes, measured side by side in one process (used by `fcodec bench`;
tests check the structure, never the timings).

* `stage_breakdown`: wall time per megapixel of each stage, following the data flow: VAE
  encode, estimator (if trained), quantize + entropy encode + pack, parse + entropy decode,
  each UNet step, VAE decode; timed through `DiffusionCodec`'s public stage methods;
* `speed_options`: channels-last weights and overlapped entropy coding, on and off;
* `precision_speed`: fp32 vs bf16 at several sizes, batches and t (SD-2.1 architecture on a GPU).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from . import bitstream as bs
from .denoise import ddim_schedule
from .model import DiffusionCodec
from .noise import to_x_t


class _Clock:
    def __init__(self, device: torch.device) -> None:
        self.device, self.totals = device, {}

    @contextmanager
    def stage(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0


def stage_breakdown(codec: DiffusionCodec, images: list[np.ndarray], t: int = 100, steps: int = 4,
                    repeats: int = 1) -> dict:
    """Seconds per megapixel for each stage over `images` (batch of one size, one batch).

    Returns {"megapixels", "stages": {name: s/MP}, "entropy_share": fraction of encode+decode
    time spent in entropy coding and bitstream handling}.
    """
    bb = codec.backbone
    h, w = images[0].shape[:2]
    x = codec.to_tensor(images)
    mp = len(images) * h * w / 1e6 * repeats
    clock = _Clock(bb.device)
    with torch.inference_mode():
        for _ in range(repeats):
            with clock.stage("vae_encode"):
                z = bb.encode(x).cpu()
            gammas = []
            with clock.stage("estimator"):
                for zi in z:
                    gammas.append(codec.gamma(zi))
            records = []
            with clock.stage("entropy_encode"):
                for zi, (shift, scale, _), im in zip(z, gammas, images):
                    records.append(codec.encode_at(zi, im, t, shift, scale).data)
            with clock.stage("entropy_decode"):
                z_hat = torch.stack([codec.decode_latent(codec.parse(r)) for r in records])
            ts = torch.full((len(images),), t, dtype=torch.long)
            sched = ddim_schedule(ts, steps)
            xt = to_x_t(z_hat.to(bb.device, bb.dtype), bb.alphas_cumprod[ts])
            for i in range(sched.shape[0]):
                with clock.stage(f"unet_step_{i + 1}"):
                    bb.predict(xt, sched[i])
            with clock.stage("vae_decode"):
                bb.decode(z_hat.to(bb.device, bb.dtype))
    stages = {k: v / mp for k, v in clock.totals.items()}
    if codec.estimator is None:
        stages.pop("estimator", None)
    total = sum(stages.values())
    entropy = stages["entropy_encode"] + stages["entropy_decode"]
    return {"megapixels": mp, "image_size": [h, w], "batch": len(images), "t": t, "steps": int(sched.shape[0]),
            "stages_s_per_mp": stages, "total_s_per_mp": total, "entropy_share": entropy / total,
            "bytes_per_image": float(np.mean([len(r) for r in records])),
            "header_bytes": header_bytes(codec.parse(records[0]))}


def header_bytes(rec: bs.Record) -> int:
    """Bytes of a record that are not entropy-coded payload: the record packed without its side
    information and strings (fixed fields, γ, lengths, symbol hash, CRC)."""
    return len(bs.pack(replace(rec, side=b"", strings=[])))


def speed_options(images: list[np.ndarray], t: int, steps: int, repeats: int = 1, batch_size: int = 8) -> dict:
    """The codec's own speed options side by side in this process: channels-last weights and
    entropy coding overlapped with the model, each on and off (best encode and decode images/s
    over `repeats`, tiny backbone, after a warm-up)."""
    from . import load_codec
    from .model import CodecConfig

    rows = []
    for cl, ov in ((False, False), (True, False), (False, True), (True, True)):
        codec = load_codec("tiny", config=CodecConfig(batch_size=batch_size, t=t, steps=steps, channels_last=cl,
                                                      overlap_entropy=ov))
        codec.decode([e.data for e in codec.encode(images[:batch_size])])  # warm-up
        best_e = best_d = 0.0
        for _ in range(max(1, repeats)):
            enc_s, dec_s, _ = _timed_round_trip(codec, images, None, None, torch.device("cpu"))
            best_e, best_d = max(best_e, len(images) / enc_s), max(best_d, len(images) / dec_s)
        rows.append({"channels_last": cl, "overlap_entropy": ov, "encode_img_s": best_e, "decode_img_s": best_d})
    return {"rows": rows, "threads": torch.get_num_threads(), "images": len(images), "size": int(images[0].shape[0])}


def sd21_random_backbone():
    """Stable Diffusion 2.1's architecture (VAE + v-prediction UNet, 1024-d cross-attention) with
    random weights: the speed of the real model without its download."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from .backbone import Backbone, sd_alphas_cumprod

    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, sample_size=768)
    unet = UNet2DConditionModel(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                                use_linear_projection=True)
    return Backbone(vae=vae.eval().requires_grad_(False), unet=unet.eval().requires_grad_(False),
                    alphas_cumprod=sd_alphas_cumprod(), prediction_type="v_prediction",
                    prompt_embeds=torch.zeros(1, 77, 1024), scaling_factor=0.18215, name="sd21-arch-random")


def precision_speed(make_image: Callable[[int, int, int], np.ndarray], steps: int, device: str = "cuda",
                    build: Callable = sd21_random_backbone, sizes=((512, 512), (512, 768)), batches=(1, 4),
                    ts=(50, 200)) -> dict:
    """Encode/decode images/s at several sizes, t and batch sizes, fp32 vs bf16 (the SD-2.1
    architecture on the GPU by default; tests run the same loop on the CPU with the tiny one).
    `make_image(seed, height, width)` supplies the images."""
    from .model import CodecConfig

    bb = build().to(device)
    dev = torch.device(device)
    rows = []
    for prec in ("float32", "bfloat16"):
        codec = DiffusionCodec(bb, config=CodecConfig(precision=prec, batch_size=max(batches)))
        for (h, w) in sizes:
            for batch in batches:
                imgs = [make_image(i, h, w) for i in range(batch)]
                for t in ts:
                    codec.decode([e.data for e in codec.encode(imgs, t=t)], steps=steps)  # warm-up
                    enc_s, dec_s, enc = _timed_round_trip(codec, imgs, t, steps, dev)
                    rows.append({"precision": prec, "size": f"{w}x{h}", "batch": batch, "t": t,
                                 "bpp": sum(e.bpp for e in enc) / len(enc),
                                 "encode_img_s": batch / enc_s, "decode_img_s": batch / dec_s})
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else device
    return {"rows": rows, "device": name, "backbone": bb.name, "steps": steps}


def _timed_round_trip(codec: DiffusionCodec, images: list[np.ndarray], t: int | None, steps: int | None,
                      device: torch.device) -> tuple[float, float, list]:
    """(encode seconds, decode seconds, encoded) of one whole-list round trip; the GPU is
    synchronised around each clock read so queued kernels are counted."""
    clock = _Clock(device)
    with clock.stage("encode"):
        enc = codec.encode(images, t=t)
    with clock.stage("decode"):
        codec.decode([e.data for e in enc], steps=steps)
    return clock.totals["encode"], clock.totals["decode"], enc
