"""Generator of the golden records of taesd-v2 with its shipped entropy weights
(tests/golden/entropy_v2/), run ONCE, at the commit that shipped taesd-v2.

###############################################################################################
#  NEVER RE-RUN THIS SCRIPT TO MAKE A FAILING TEST PASS.                                      #
#                                                                                             #
#  The records are archives: taesd-v2 (the pixel-tuned one-step denoiser on TAESD) with       #
#  taesd-v2-hyperprior-v3. tests/test_golden.py checks that today's code finds taesd-v2 and   #
#  those weights from the record alone and entropy-decodes it to exactly the symbols its hash #
#  names. If a change breaks them, it broke every archive written with them: fix the change.  #
#  New shipped weights add records in a NEW folder (entropy_v3/ with its own script).         #
###############################################################################################

What it writes: as make_entropy_v1.py (two synthetic images, an even and an odd size, t = 40),
plus each record's backbone name in index.json.

Run from the repository root:  python tests/golden/make_entropy_v2.py
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "entropy_v2"
MODELS = (("taesd-v2", "taesd-v2-hyperprior-v3"),)


def main() -> None:
    sys.path.insert(0, str(REPO))
    from codec import bitstream, load_codec
    from jobs.samples import sample_image

    if (OUT / "index.json").exists():
        raise SystemExit(f"{OUT} exists: these fixtures are never regenerated (see the banner)")
    (OUT / "records").mkdir(parents=True)
    records = []
    for backbone, w in MODELS:
        codec = load_codec(backbone, codec_weights=w)
        for seed, (h, wd) in ((1, (128, 192)), (2, (72, 104))):
            data = codec.encode([sample_image(seed, h, wd)], t=40)[0].data
            rec = bitstream.parse(data)
            name = f"{w}_{wd}x{h}"
            (OUT / "records" / f"{name}.fdc").write_bytes(data)
            records.append({"name": name, "backbone": backbone, "weights": w, "entropy": codec.entropy.name,
                            "strings": len(rec.strings), "file": f"records/{name}.fdc",
                            "sha256": hashlib.sha256(data).hexdigest()})
    (OUT / "index.json").write_text(json.dumps({"made_by": "tests/golden/make_entropy_v2.py", "records": records},
                                               indent=1) + "\n")
    print(f"wrote {len(records)} records to {OUT}")


if __name__ == "__main__":
    main()
