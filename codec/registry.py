"""Built-in backbones and shipped codec weights, versioned and keyed by fingerprint.

An archive names its models only by fingerprint (docs/bitstream.md), so the package must keep
every model it ever shipped under a name that never changes meaning:

* backbones: `tiny` (built in code), and one folder per trained version under
  `codec/weights/<family>-v<N>/` (a diffusers snapshot with `weights.sha256.json`, which records
  its fingerprint). `nano` is an alias of the newest `nano-v<N>`. A retrained nano is added as
  `nano-v2` beside `nano-v1`, never over it, so records of `nano-v1` still decode.
* codec weights (entropy model, estimator): any folder under `codec/weights/` holding a
  `codec_config.json` (as `DiffusionCodec.save_pretrained` writes it), keyed by the codec
  fingerprint recorded there. `--entropy auto` (the default) encodes with the ones trained for
  the chosen built-in backbone (`default_codec_weights`).

Lookups need no torch: fingerprints come from the JSON files beside the weights (and a constant
for `tiny`, whose weights are a seeded random init; tests/test_registry.py recomputes it).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
# Backbone.tiny(0) under the pinned torch; golden records carry it (tests/golden/v1).
TINY_FINGERPRINT = "8e0ab3e836b8832c"
# The static entropy model's fingerprint (format 1 + its scale table); it needs no weights.
STATIC_CODEC_FINGERPRINT = "9d211aaae4f75951"
VERSIONED_NAME = re.compile(r"(?P<family>[a-z][a-z0-9]*)-v(?P<version>[0-9]+)")


class RegistryError(ValueError):
    """A name or fingerprint the registry does not know; the message lists what it knows."""


@dataclass(frozen=True)
class BuiltinBackbone:
    """One built-in backbone: `path` is its snapshot folder (None: built in code, `tiny`)."""

    name: str
    fingerprint: str  # 16 hex digits, as records carry it
    path: Path | None = None

    @property
    def family(self) -> str:
        m = VERSIONED_NAME.fullmatch(self.name)
        return m["family"] if m else self.name

    @property
    def version(self) -> int:
        m = VERSIONED_NAME.fullmatch(self.name)
        return int(m["version"]) if m else 0


@dataclass(frozen=True)
class ShippedCodec:
    """One set of codec weights (a `save_pretrained` folder) and the models it belongs to."""

    name: str
    codec_fingerprint: str
    backbone_fingerprint: str
    entropy: str
    path: Path


_backbones: dict[str, BuiltinBackbone] = {}
_codecs: dict[str, ShippedCodec] = {}
_scanned = False


def _scan() -> None:
    """Register what ships in codec/weights/ once (folders named <family>-v<N> or with codec_config.json)."""
    global _scanned
    if _scanned:
        return
    _scanned = True
    _backbones.setdefault("tiny", BuiltinBackbone("tiny", TINY_FINGERPRINT))
    if not WEIGHTS_DIR.is_dir():
        return
    for d in sorted(WEIGHTS_DIR.iterdir()):
        if (d / "codec_config.json").is_file():
            register_codec_weights(d.name, d)
        elif VERSIONED_NAME.fullmatch(d.name) and (d / "model_index.json").is_file():
            register_backbone(d.name, d)


def register_backbone(name: str, path: str | Path, fingerprint: str | None = None) -> BuiltinBackbone:
    """Add a backbone snapshot folder under a versioned name (`nano-v2`); `nano` then aliases the newest.

    The fingerprint comes from `fingerprint`, else the folder's `weights.sha256.json`, else it is
    computed by loading the folder (torch). A name is never reused for other weights.
    """
    _scan()
    if not VERSIONED_NAME.fullmatch(name):
        raise RegistryError(f"built-in backbone names are versioned, like 'nano-v2' (got '{name}')")
    path = Path(path)
    if fingerprint is None:
        sums = path / SUMS_FILE
        if sums.is_file():
            fingerprint = json.loads(sums.read_text()).get("backbone_fingerprint")
    if fingerprint is None:
        from .backbone import Backbone

        fingerprint = Backbone.from_pretrained(str(path)).fingerprint().hex()
    old = _backbones.get(name)
    if old is not None and old.fingerprint != fingerprint:
        raise RegistryError(f"backbone '{name}' is already registered with fingerprint {old.fingerprint}; "
                            f"retrained weights get a new version, e.g. '{old.family}-v{newest(old.family).version + 1}'")
    entry = BuiltinBackbone(name, fingerprint, path)
    _backbones[name] = entry
    return entry


SUMS_FILE = "weights.sha256.json"
UNSUMMED = {SUMS_FILE, "MODEL_CARD.md", "metrics.json"}  # documentation beside the weights, free to improve


def write_weight_sums(path: str | Path) -> dict:
    """Record a snapshot folder's sha256 per file and its backbone fingerprint (loaded fresh) in
    `weights.sha256.json`, which registration reads and the tests check; returns what it wrote."""
    import hashlib

    from .backbone import Backbone

    path = Path(path)
    files = {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(path.rglob("*")) if p.is_file() and p.name not in UNSUMMED
             and not p.name.startswith(("ckpt_", "vae_trained"))}
    bb = Backbone.from_pretrained(str(path))
    sums = {"files": files, "backbone_fingerprint": bb.fingerprint().hex(), "scaling_factor": bb.scaling_factor,
            "prediction_type": bb.prediction_type, "vae_kind": bb.vae_kind}
    (path / SUMS_FILE).write_text(json.dumps(sums, indent=2) + "\n")
    return sums


def unregister_backbone(name: str) -> None:
    """Forget a backbone registered at run time (tests)."""
    _scan()
    _backbones.pop(name, None)


def register_codec_weights(name: str, path: str | Path) -> ShippedCodec:
    """Add a codec-weights folder (codec_config.json + safetensors), keyed by its codec fingerprint."""
    path = Path(path)
    cfg_path = path / "codec_config.json"
    if not cfg_path.is_file():
        raise RegistryError(f"no codec weights at '{path}' (expected codec_config.json from `fcodec train`)")
    cfg = json.loads(cfg_path.read_text())
    entry = ShippedCodec(name, cfg["codec_fingerprint"], cfg["backbone_fingerprint"], cfg["entropy"], path)
    _codecs[name] = entry
    return entry


def unregister_codec_weights(name: str) -> None:
    """Forget codec weights registered at run time (tests)."""
    _codecs.pop(name, None)


def codec_weights_path(name_or_dir: str) -> str:
    """A `--codec-weights` value as a folder: the name of shipped weights, or the folder itself."""
    _scan()
    found = _codecs.get(name_or_dir)
    return str(found.path) if found is not None and not Path(name_or_dir).is_dir() else name_or_dir


def weights_entropy(name_or_dir: str) -> str:
    """The entropy model a codec-weights folder (or shipped name) holds, from its codec_config.json."""
    cfg = Path(codec_weights_path(name_or_dir)) / "codec_config.json"
    try:
        return json.loads(cfg.read_text())["entropy"]
    except (OSError, ValueError, KeyError):
        return "hyperprior"  # unreadable here (e.g. a URL): loading it reports what is wrong


def default_codec_weights(backbone_fp: str, entropy: str | None = None) -> ShippedCodec | None:
    """The shipped weights `--entropy auto` (or `--entropy hyperprior|checkerboard`: only those of
    that model) uses with a built-in backbone: the last by name of those trained for its
    fingerprint, or None (the static model needs none)."""
    found = [c for c in codec_weights() if c.backbone_fingerprint == backbone_fp and entropy in (None, c.entropy)]
    return max(found, key=lambda c: c.name) if found else None


def backbones() -> list[BuiltinBackbone]:
    """Every built-in backbone, by family then version."""
    _scan()
    return sorted(_backbones.values(), key=lambda b: (b.family, b.version))


def codec_weights() -> list[ShippedCodec]:
    """Every shipped (or registered) set of codec weights, by name."""
    _scan()
    return sorted(_codecs.values(), key=lambda c: c.name)


def newest(family: str) -> BuiltinBackbone | None:
    """The highest version of a family (`nano` -> `nano-v1` today), or None."""
    found = [b for b in backbones() if b.family == family and b.version > 0]
    return max(found, key=lambda b: b.version) if found else None


def lookup(spec: str) -> BuiltinBackbone | None:
    """A built-in backbone by name or alias (`tiny`, `nano`, `nano-v1`); None for anything else
    (a hub id or a folder, which `load_backbone` loads as such)."""
    _scan()
    if spec in _backbones:
        return _backbones[spec]
    if VERSIONED_NAME.fullmatch(spec):
        return None
    return newest(spec)


def aliases() -> dict[str, str]:
    """Family alias -> the versioned name it resolves to now, e.g. {'nano': 'nano-v1'}."""
    return {b.family: newest(b.family).name for b in backbones() if b.version > 0}


def backbone_for_fingerprint(fp: bytes | str) -> BuiltinBackbone | None:
    """The built-in backbone whose weights a record's backbone fingerprint names, or None."""
    fp = fp.hex() if isinstance(fp, bytes) else fp
    return next((b for b in backbones() if b.fingerprint == fp), None)


def codec_for_fingerprint(codec_fp: bytes | str, backbone_fp: bytes | str | None = None) -> ShippedCodec | None:
    """Shipped codec weights with this codec fingerprint (and backbone, if given), or None."""
    codec_fp = codec_fp.hex() if isinstance(codec_fp, bytes) else codec_fp
    backbone_fp = backbone_fp.hex() if isinstance(backbone_fp, bytes) else backbone_fp
    return next((c for c in codec_weights() if c.codec_fingerprint == codec_fp
                 and (backbone_fp is None or c.backbone_fingerprint == backbone_fp)), None)


def known_backbones_text() -> str:
    """'tiny (8e0a…), nano-v1 (ca97…; alias nano)' for error messages."""
    alias = {v: k for k, v in aliases().items()}
    return ", ".join(f"{b.name} ({b.fingerprint}" + (f"; alias {alias[b.name]})" if b.name in alias else ")")
                     for b in backbones())


def shipped_entropy_text(entropy: str) -> str:
    """Which built-in backbones ship weights of a learned entropy model, for error messages:
    "taesd-v1 (taesd-v1-hyperprior)", or "none"."""
    names = {b.fingerprint: b.name for b in backbones()}
    found = [f"{names[c.backbone_fingerprint]} ({c.name})" for c in codec_weights()
             if c.entropy == entropy and c.backbone_fingerprint in names]
    return ", ".join(found) or "none"


def resolve_backbone(fp: bytes | str) -> BuiltinBackbone:
    """The built-in backbone for a record's fingerprint; the error lists the known ones."""
    fp = fp.hex() if isinstance(fp, bytes) else fp
    found = backbone_for_fingerprint(fp)
    if found is None:
        raise RegistryError(
            f"the record's backbone fingerprint {fp} is not a built-in backbone (known: {known_backbones_text()}); "
            "pass --backbone DIR (and --vae DIR) with the backbone it was encoded with")
    return found


def resolve_codec_weights(codec_fp: bytes | str, backbone_fp: bytes | str | None = None,
                          entropy: str = "codec") -> ShippedCodec:
    """Shipped codec weights for a record; the error lists the known ones and says what to pass."""
    codec_fp = codec_fp.hex() if isinstance(codec_fp, bytes) else codec_fp
    found = codec_for_fingerprint(codec_fp, backbone_fp)
    if found is None:
        known = ", ".join(f"{c.name} ({c.codec_fingerprint})" for c in codec_weights()) or "none ship with this version"
        raise RegistryError(f"the record's {entropy} weights (codec fingerprint {codec_fp}) are not shipped (known: {known}); "
                            "pass --codec-weights DIR with the weights it was encoded with")
    return found




# entropy model id in a record -> name (codec.entropy.ENTROPY_IDS, without importing torch)
ENTROPY_NAMES = {0: "static", 1: "hyperprior", 2: "checkerboard", 3: "channel-checkerboard"}


__all__ = [
    "BuiltinBackbone", "ENTROPY_NAMES", "RegistryError", "STATIC_CODEC_FINGERPRINT", "ShippedCodec", "TINY_FINGERPRINT",
    "VERSIONED_NAME", "WEIGHTS_DIR", "aliases", "backbone_for_fingerprint", "backbones", "codec_for_fingerprint",
    "codec_weights", "known_backbones_text", "lookup", "newest", "register_backbone",
    "register_codec_weights", "resolve_backbone", "resolve_codec_weights", "unregister_backbone",
    "unregister_codec_weights", "write_weight_sums", "codec_weights_path", "weights_entropy", "default_codec_weights",
    "shipped_entropy_text",
]
