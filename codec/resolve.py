"""The codec options a record implies: which built-in backbone, entropy model and shipped
weights made it (by fingerprint, through codec/registry.py), for callers that leave them out.
Separate from the registry, which needs no model code, because checking a backbone with a
replaced VAE loads it."""
from __future__ import annotations

from .registry import (ENTROPY_NAMES, STATIC_CODEC_FINGERPRINT, RegistryError, backbone_for_fingerprint, backbones,
                       known_backbones_text, lookup, resolve_backbone, resolve_codec_weights)


def options_for_record(data: bytes, backbone: str | None = None, vae: str | None = None,
                       entropy: str | None = None, codec_weights: str | None = None) -> dict:
    """Fill the codec options a caller left out (None) from what a record names.

    backbone: the built-in whose fingerprint the record carries (with `vae`, the built-in that,
    with that VAE, has it); entropy: the record's model; codec_weights: the shipped weights with
    the record's codec fingerprint (none for the static model). Options given are kept as they
    are. Errors name the fingerprint, list the known models and say which flag to pass.
    """
    from . import bitstream

    rec = bitstream.parse(data)
    if entropy is None:
        entropy = ENTROPY_NAMES.get(rec.entropy_id)
        if entropy is None:
            raise RegistryError(f"the record's entropy model id {rec.entropy_id} is unknown to this version "
                                f"(known: {', '.join(f'{k} {v}' for k, v in ENTROPY_NAMES.items())})")
    if backbone is None:
        backbone = backbone_with_vae(rec.backbone_fp, vae) if vae else resolve_backbone(rec.backbone_fp).name
    elif not vae:
        given, made = lookup(backbone), backbone_for_fingerprint(rec.backbone_fp)
        if given is not None and made is not None and given.name != made.name:
            # e.g. `--backbone nano` (now nano-v2) on an archive of nano-v1
            shown = backbone if backbone == given.name else f"{backbone} (= {given.name})"
            raise RegistryError(f"the record was made with the built-in backbone {made.name}, not {shown}: "
                                f"pass --backbone {made.name} or leave --backbone out")
    if codec_weights is None and not (entropy == "static" and rec.codec_fp.hex() == STATIC_CODEC_FINGERPRINT):
        codec_weights = str(resolve_codec_weights(rec.codec_fp, rec.backbone_fp, entropy).path)
    return {"backbone": backbone, "vae": vae, "entropy": entropy, "codec_weights": codec_weights}


def backbone_with_vae(fp: bytes, vae: str) -> str:
    """The built-in that, with this VAE in place of its own, has the record's fingerprint (loads each)."""
    from . import load_backbone

    for b in backbones():
        if load_backbone(b.name, vae).fingerprint() == fp:
            return b.name
    raise RegistryError(f"no built-in backbone with the VAE in '{vae}' has the record's fingerprint {fp.hex()} "
                        f"(known: {known_backbones_text()}); pass --backbone DIR with the backbone it was encoded with")
