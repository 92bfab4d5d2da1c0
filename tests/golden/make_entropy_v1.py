"""Generator of the golden records of the shipped entropy weights (tests/golden/entropy_v1/),
run ONCE, at the commit that shipped taesd-v1-hyperprior-v3.

###############################################################################################
#  NEVER RE-RUN THIS SCRIPT TO MAKE A FAILING TEST PASS.                                      #
#                                                                                             #
#  The records are archives: taesd-v1 with each shipped entropy model (hyperprior,            #
#  checkerboard, channel-checkerboard). tests/test_golden.py checks that today's code         #
#  entropy-decodes every one of them to exactly the symbols the record's hash names. If a     #
#  change breaks them, it broke every archive written with those weights: fix the change.     #
#  New shipped weights add records in a NEW folder (entropy_v2/ with its own script).         #
###############################################################################################

What it writes: records/<weights>_<w>x<h>.fdc for two synthetic images (jobs/samples.py: an even
size and an odd one, so z's padding is covered) at t = 40, and index.json (name, weights, entropy
model, string count, file, sha256 of the record).

Run from the repository root:  python tests/golden/make_entropy_v1.py
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "entropy_v1"
WEIGHTS = ("taesd-v1-hyperprior", "taesd-v1-hyperprior-v2", "taesd-v1-hyperprior-v3")


def main() -> None:
    sys.path.insert(0, str(REPO))
    from codec import bitstream, load_codec
    from jobs.samples import sample_image

    if (OUT / "index.json").exists():
        raise SystemExit(f"{OUT} exists: these fixtures are never regenerated (see the banner)")
    (OUT / "records").mkdir(parents=True)
    records = []
    for w in WEIGHTS:
        codec = load_codec("taesd-v1", codec_weights=w)  # "taesd" when it was run (taesd-v1 was the newest)
        for seed, (h, wd) in ((1, (128, 192)), (2, (72, 104))):
            data = codec.encode([sample_image(seed, h, wd)], t=40)[0].data
            rec = bitstream.parse(data)
            name = f"{w}_{wd}x{h}"
            (OUT / "records" / f"{name}.fdc").write_bytes(data)
            records.append({"name": name, "weights": w, "entropy": codec.entropy.name, "strings": len(rec.strings),
                            "file": f"records/{name}.fdc", "sha256": hashlib.sha256(data).hexdigest()})
    (OUT / "index.json").write_text(json.dumps({"made_by": "tests/golden/make_entropy_v1.py", "records": records},
                                               indent=1) + "\n")
    print(f"wrote {len(records)} records to {OUT}")


if __name__ == "__main__":
    main()
