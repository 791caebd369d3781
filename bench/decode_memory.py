"""Peak memory of decoding huge images: featx's pixel budget against decoding them all at once.

Writes eight 9400x9400 PNGs (86 KB each on disk, 265 MB each decoded; just under the
decompression-bomb guard) and decodes them with featx's prefetcher and 4 threads, once with the
budget (config.DECODE_PIXEL_BUDGET) and once with an unbounded one, each in a fresh process.

    python bench/decode_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, time
from featx.images import decoder, decoding
if sys.argv[1] == "unbounded":
    decoder._PIXEL_BUDGET = decoder._PixelBudget(10**15)
files = sys.argv[2:]
t0 = time.perf_counter()
list(decoding.prefetch([files], lambda p: decoder.load_image(p, 224), workers=4))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_mib": round(peak), "seconds": round(time.perf_counter() - t0, 1)}))
"""


def main() -> None:
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(8):
            files.append(str(Path(tmp) / f"huge{i}.png"))
            Image.new("RGB", (9400, 9400), (30 * i, 20, 20)).save(files[-1])
        rows = {}
        for mode in ("unbounded", "budget"):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, mode, *files], capture_output=True, text=True
            )
            rows[mode] = json.loads(out.stdout)
    print("decoding eight 9400x9400 PNGs with 4 threads")
    for mode, r in rows.items():
        print(f"  {mode:<10} peak {r['peak_mib']:>6} MiB  {r['seconds']:>5.1f} s")
    ratio = rows["budget"]["peak_mib"] / rows["unbounded"]["peak_mib"]
    print(f"  budget / unbounded peak memory: {ratio:.2f}")


if __name__ == "__main__":
    main()
