"""Tokenization throughput of `quark prepare` vs a plain single-process `tokenizers` encode loop, same text, same run.

    python bench/prepare.py --tokenizer /path/to/tokenizer [--mb 12]

Ours: the batched path `quark prepare` uses (`quark.data.prepare` batches documents and calls
`encode_texts`, i.e. `encode_batch_fast`, which spreads them over all cores with Rust threads). Peer: `for t in texts:
tokenizers.Tokenizer.encode(t)` in one Python process, the loop a simple data script would write. The text is
real: Python standard-library files and the Debian handbook (EN + IT). Also reported: end-to-end `quark prepare`
(reading, eval dedup, tokenizing, writing shards) on the same files, for context. Prints MB/s and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def corpus(mb: float) -> list[str]:
    """The handbook in English and Italian (~2.3 MB), then standard-library files until `mb` MB."""
    from quark.data import offline

    texts = list(offline.handbook_documents("en")) + list(offline.handbook_documents("it")) \
        if not offline.unavailable("handbook") else []
    n = sum(len(t.encode()) for t in texts)
    for p in offline.stdlib_files():
        if n >= mb * 1e6:
            break
        t = offline.code_text(p)
        if t:
            texts.append(t)
            n += len(t.encode())
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--mb", type=float, default=12.0, help="MB of text (default 12)")
    ap.add_argument("--repeat", type=int, default=2, help="timed repeats, best kept (default 2)")
    args = ap.parse_args()

    from tokenizers import Tokenizer as HFTokenizer

    from quark.data.prepare import BATCH_CHARS, BATCH_DOCS, batches, encode_texts
    from quark.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    peer = HFTokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json" if Path(args.tokenizer).is_dir()
                                     else args.tokenizer))
    texts = corpus(args.mb)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"text: {mb:.1f} MB in {len(texts):,} documents; {os.cpu_count()} cores; tokenizer {args.tokenizer}")

    def ours():
        n = 0
        for batch in batches(texts, BATCH_DOCS, lambda: BATCH_CHARS):
            n += sum(map(len, encode_texts(tok, batch)))
        return n

    def loop():
        return sum(len(peer.encode(t, add_special_tokens=False).ids) for t in texts)

    import resource

    best = {}
    for name, fn in (("peer", loop), ("ours", ours)) * args.repeat:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        n = fn()
        dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        if name not in best or dt < best[name][0]:
            best[name] = (dt, n, (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / dt)
    assert best["ours"][1] == best["peer"][1], "both paths must produce the same tokens"
    ours_mbs, peer_mbs = mb / best["ours"][0], mb / best["peer"][0]
    print(f"peer  single-process tokenizers encode loop: {peer_mbs:7.2f} MB/s ({best['peer'][1]:,} tokens, "
          f"{best['peer'][2]:.2f} cores busy)")
    print(f"ours  quark prepare batched encode:          {ours_mbs:7.2f} MB/s ({best['ours'][2]:.2f} cores busy)")
    print(f"ratio ours / peer: {ours_mbs / peer_mbs:.2f}x (target >= 1.8x on 2 idle cores); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    from quark.data.mixture import mixture_from_dict
    from quark.data.prepare import prepare

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "src"
        src.mkdir()
        for i, t in enumerate(texts):
            (src / f"{i:06d}.txt").write_text(t, encoding="utf-8")
        mix = mixture_from_dict({"sources": [{"name": "bench", "type": "files", "paths": [str(src)],
                                              "license": "PSF-2.0 / GPL-2+"}]})
        total = best["ours"][1] + len(texts)
        t0 = time.perf_counter()
        m = prepare(mix, tok, Path(d) / "out", tokens=total, progress=False)
        dt = time.perf_counter() - t0
        print(f"end to end: quark prepare on the same files (read, eval dedup, tokenize, write shards): "
              f"{m['splits']['train']['bytes'] / 1e6 / dt:.2f} MB/s ({dt:.1f}s)")


if __name__ == "__main__":
    main()
