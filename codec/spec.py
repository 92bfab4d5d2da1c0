"""`CodecSpec`: every codec option once — its default, its help text, and whether it must match
across the runs that write (or decode) one dataset.

Jobs build a spec from their flags (`jobs/options.py` generates the flags from this file),
actors build the codec from it (`spec.build()`), and manifests store it (`to_dict()` /
`from_dict()`), so a dataset names the codec that wrote it. Importing this module is cheap (no
torch): `--help` and argument errors never wait for the model libraries.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

# `flag`: None = a CLI option of every job that encodes/decodes; "" = only of jobs that can run a
# baseline codec (audit, compare); "-" = set by the pipeline, never a CLI option.
# `match` says which runs must agree on an option:
#   "dataset": every run writing one dataset (else rows would mix codecs), and its decoders;
#   "decode":  needed to decode, but free to differ between encode runs (none today);
#   None:      a speed/quality knob of this run only (device, batch size, steps, ...).
DATASET, LOCAL = "dataset", None


def _opt(default: Any, help: str, match: str | None = LOCAL, flag: str | None = None, choices: tuple | None = None,
         metavar: str | None = None, encode: bool = True, decode: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "match": match, "flag": flag, "choices": choices,
                                            "metavar": metavar, "encode": encode, "decode": decode})


PRECISION_CHOICES = ("auto", "float32", "exact", "float64", "bfloat16", "float16")


@dataclass(frozen=True)
class CodecSpec:
    """The codec options of a job (plain data: picklable to any node, JSON in manifests)."""

    backbone: str | None = _opt(None, "taesd (TAESD, SD's latent space, with the project's SD-latent denoiser) | nano "
                                "(the project's own small VAE + UNet) | tiny (random, for trying the system) | a hub id "
                                "(stabilityai/stable-diffusion-2-1) | a local snapshot folder; taesd-v1, nano-v1, ... name "
                                "a version (default: the best built-in that is installed, taesd)", DATASET)
    vae: str | None = _opt(None, "a TAESD-style autoencoder folder used instead of the backbone's VAE", DATASET,
                           metavar="DIR")
    entropy: str = _opt("auto", "entropy model: auto (the hyperprior shipped for the backbone when there is one, else "
                        "static) | static (training-free per-channel Gaussian) | hyperprior, checkerboard (hyperprior + spatial "
                        "context), channel-checkerboard (that context over channel groups too) (the weights shipped for "
                        "the backbone, else --codec-weights)", DATASET,
                        choices=("auto", "static", "hyperprior", "checkerboard", "channel-checkerboard"))
    codec_weights: str | None = _opt(None, "trained entropy model / estimator: a folder from `fcodec train`, or the name "
                                     "of shipped weights", DATASET, metavar="DIR")
    t: int | None = _opt(None, "diffusion step whose noise the quantization matches (1..999; larger = fewer bits; "
                         "default: the trained estimator's choice, else the shipped weights' t, else 100)", DATASET, metavar="N", decode=False)
    target_bpp: float | None = _opt(None, "search t per image to meet X bits per pixel", DATASET, metavar="X",
                                    decode=False)
    steps: int | None = _opt(None, "decoder DDIM budget: at most K UNet calls from t to 0; 0 = no denoising "
                             "(default: the backbone's own, e.g. 1 for taesd-v2, else 8)", metavar="K", encode=False)
    device: str | None = _opt(None, "torch device for the networks (default: cuda if available, else cpu)")
    precision: str = _opt("auto", "network precision; auto = bfloat16 on a GPU, float32 on the CPU; exact (float64) "
                          "makes decoded pixels identical across batch sizes and thread counts", choices=PRECISION_CHOICES)
    batch_size: int = _opt(8, "images per model call")
    threads: int | None = _opt(None, "torch CPU threads per process (default: torch's choice)", flag="-")
    max_pixels: int | None = _opt(None, "refuse images larger than this many pixels (default: the codec's cap)",
                                  flag="-")
    # Baseline codecs (audit/compare): JPEG/WebP/AVIF/CompressAI behind the same API.
    baseline: str | None = _opt(None, "a baseline codec instead of ours: jpeg | webp | avif | jxl | compressai:ARCH",
                                DATASET, flag="", encode=False)
    quality: int | None = _opt(None, "baseline quality", DATASET, flag="", encode=False)

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, d: dict | None, where: str = "codec spec") -> "CodecSpec":
        """A spec from a plain dict (manifest, config file, old-style job dict); unknown keys are an
        error naming them, so a typo never passes silently."""
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{where}: unknown codec options {unknown} (known: {sorted(names)})")
        return cls(**{k: v for k, v in d.items() if v is not None})

    def to_dict(self) -> dict:
        """Every option, defaults included (what manifests store)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def pinned(self) -> "CodecSpec":
        """This spec with the backbone and entropy model resolved (what a manifest stores and workers load)."""
        if self.baseline:
            return self
        entropy, weights = self.resolved_entropy()
        return replace(self, backbone=self.resolved_backbone(), entropy=entropy, codec_weights=weights)

    def replace(self, **changes: Any) -> "CodecSpec":
        return replace(self, **changes)

    # ------------------------------------------------------------------ compatibility
    @classmethod
    def dataset_keys(cls) -> tuple[str, ...]:
        """Options every run of one dataset must agree on."""
        return tuple(f.name for f in fields(cls) if f.metadata["match"] == DATASET)

    def resolved_backbone(self) -> str:
        """The backbone with the default filled in and a built-in alias resolved to its version
        (`nano` -> `nano-v1`), so a manifest names weights that never change (cheap: no torch)."""
        from . import default_backbone
        from .registry import lookup

        name = self.backbone or default_backbone()
        builtin = lookup(name)
        return builtin.name if builtin is not None else name

    def resolved_entropy(self) -> tuple[str, str | None]:
        """(entropy, codec_weights) with `auto` resolved: given weights name their own model; else the
        weights shipped for this built-in backbone (by fingerprint), else the static model (no torch).
        A learned model named without weights (`--entropy hyperprior`) gets the shipped weights of
        that model for the backbone; where none ship it stays without (loading it says what to pass)."""
        from .registry import default_codec_weights, lookup, weights_entropy

        auto = self.entropy == "auto"
        if self.entropy == "static" or self.codec_weights:
            return (weights_entropy(self.codec_weights) if auto else self.entropy), self.codec_weights
        builtin = None if self.vae else lookup(self.resolved_backbone())  # another VAE: another fingerprint
        shipped = default_codec_weights(builtin.fingerprint, None if auto else self.entropy) if builtin is not None else None
        if shipped is not None:
            return shipped.entropy, shipped.name
        return ("static" if auto else self.entropy), None

    def identity(self, keys: tuple[str, ...] | None = None) -> dict:
        """The options that must match (default: `dataset_keys`), defaults resolved."""
        keys = keys or self.dataset_keys()
        d = {k: getattr(self, k) for k in keys}
        if not self.baseline:
            if "backbone" in d:
                d["backbone"] = self.resolved_backbone()
            if "entropy" in d or "codec_weights" in d:
                entropy, weights = self.resolved_entropy()
                d.update({k: v for k, v in (("entropy", entropy), ("codec_weights", weights)) if k in d})
        return d

    def conflicts(self, other: "CodecSpec", keys: tuple[str, ...] | None = None) -> dict[str, tuple]:
        """{option: (self's value, other's value)} for must-match options that differ."""
        a, b = self.identity(keys), other.identity(keys)
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    def merged_with(self, given: dict, keys: tuple[str, ...] | None = None, where: str = "the dataset") -> "CodecSpec":
        """This spec (what a dataset was written with) with the options a user `given` on the
        command line; a given must-match option that contradicts this spec is an error."""
        keys = keys or self.dataset_keys()
        given = {k: v for k, v in given.items() if v is not None}
        ours = self.identity(keys)
        bad = {k: (ours[k], v) for k, v in given.items() if k in keys and ours.get(k) != v
               and not (k == "backbone" and CodecSpec(backbone=v).resolved_backbone() == ours[k])}
        if bad:
            desc = ", ".join(f"--{k.replace('_', '-')} {v!r} (written with {o!r})" for k, (o, v) in bad.items())
            raise ValueError(f"{where} was written with other codec options: {desc}; drop those flags to use "
                             f"the dataset's own, or write to a new destination")
        return replace(self, **given)

    # ------------------------------------------------------------------ building
    def build(self):
        """The ready codec these options describe (loads torch and the weights)."""
        if self.baseline and self.baseline.split(":")[0] == "standin":  # benchmarks: sleeps, no model
            from .standin import StandinCodec, parse_standin

            return StandinCodec(*parse_standin(self.baseline), batch_size=int(self.batch_size))
        if self.baseline:
            from .baselines import make_baseline

            return make_baseline(self.baseline, int(self.quality or 75))
        import torch

        from . import load_codec
        from .model import CodecConfig

        if self.threads:
            torch.set_num_threads(int(self.threads))
        cfg = CodecConfig(batch_size=int(self.batch_size), precision=self.precision)
        for k in ("t", "target_bpp", "steps", "max_pixels"):
            if getattr(self, k) is not None:
                setattr(cfg, k, getattr(self, k))
        device = self.device or ("cuda" if torch.cuda.is_available() else None)
        entropy, weights = self.resolved_entropy()
        return load_codec(self.resolved_backbone(), vae=self.vae, entropy=entropy,
                          codec_weights=weights, device=device, config=cfg)


def spec_fields() -> list:
    """The dataclass fields with their metadata (default, help, match, choices) for option layers."""
    return [f for f in fields(CodecSpec)]


def field_default(f) -> Any:
    return None if f.default is MISSING else f.default


def codec_fingerprint_hex(codec) -> str:
    """The `codec_fingerprint` column: backbone fingerprint + codec fingerprint, 32 hex digits."""
    return codec.backbone.fingerprint().hex() + codec.fingerprint().hex()


def backbone_origin(spec: CodecSpec) -> dict:
    """What a manifest stores to name the backbone beside its fingerprint: the name or hub id as
    given, and for a local folder its folder name and the snapshot revision when it has one."""
    import os

    name = spec.resolved_backbone()
    out = {"name": name}
    if os.path.isdir(name):
        out["folder"] = os.path.basename(os.path.normpath(name))
        ref = os.path.join(name, ".revision")  # huggingface-cli download --local-dir leaves no ref; honour one if present
        if os.path.isfile(ref):
            out["revision"] = open(ref).read().strip()
    if spec.vae:
        out["vae_folder"] = os.path.basename(os.path.normpath(spec.vae))
    return out
