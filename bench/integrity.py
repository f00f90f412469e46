"""What integrity checks cost: SHA-256 and the NaN/Inf scan on quark-72m-sized weights (random init, fp32).

Prints the time to load `model.safetensors` with Quark's checks (hash verified + finite scan), without the hash
(`QUARK_NO_VERIFY=1`, finite scan only) and with plain `safetensors.torch.load_file` (the peer: no checks), plus
the save-side cost, each the best of `--repeats` runs from the page cache.

    python bench/integrity.py [--preset quark-72m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    from quark.config import QuarkConfig
    from quark.model import Quark
    from quark.weights import (
        first_nonfinite,
        load_model,
        read_safetensors,
        save_model,
        save_safetensors,
        state_dict_for_save,
        tensors_sha256,
    )

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quark-72m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = QuarkConfig.from_name(args.preset)
    model = Quark(cfg).init_weights(0)
    sd = state_dict_for_save(model)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    print(f"{args.preset}: {cfg.n_params():,} parameters, {nbytes / 1e6:.0f} MB of fp32 tensors "
          f"(torch threads {args.threads})")
    with tempfile.TemporaryDirectory() as tmp:
        ours, plain = Path(tmp) / "ours.safetensors", Path(tmp) / "plain.safetensors"
        t_save_ours = best(lambda: save_safetensors(sd, ours, {"format": "pt"}), args.repeats)
        t_save_plain = best(lambda: save_file(sd, str(plain), {"format": "pt"}), args.repeats)
        loaded = read_safetensors(ours)
        t_hash = best(lambda: tensors_sha256(loaded), args.repeats)
        t_finite = best(lambda: first_nonfinite(loaded), args.repeats)
        t_verified = best(lambda: read_safetensors(ours), args.repeats)
        t_unverified = best(lambda: read_safetensors(ours, verify=False), args.repeats)
        t_peer = best(lambda: load_file(str(plain)), args.repeats)
        folder = save_model(model, Path(tmp) / "model")

        def peer_model_load():  # what a reader without checks does: read the file into the model's parameters
            with torch.device("meta"):
                m = Quark(cfg)
            m.to_empty(device="cpu").load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)

        t_model_ours = best(lambda: load_model(folder), args.repeats)
        os.environ["QUARK_NO_VERIFY"] = "1"
        t_model_nov = best(lambda: load_model(folder), args.repeats)
        del os.environ["QUARK_NO_VERIFY"]
        t_model_peer = best(peer_model_load, args.repeats)
    print(f"sha256 of the tensors:          {t_hash:.3f} s ({nbytes / t_hash / 1e9:.2f} GB/s)")
    print(f"NaN/Inf scan:                   {t_finite:.3f} s")
    print(f"load, ours (hash + scan):       {t_verified:.3f} s")
    print(f"load, QUARK_NO_VERIFY (scan):   {t_unverified:.3f} s")
    print(f"load, peer safetensors.load_file (no checks): {t_peer:.3f} s")
    print(f"quark.weights.load_model (folder -> model): {t_model_ours:.3f} s verified, {t_model_nov:.3f} s with "
          f"QUARK_NO_VERIFY=1; peer (meta model + load_file + load_state_dict): {t_model_peer:.3f} s")
    print(f"save, ours (scan + hash, atomic): {t_save_ours:.3f} s; peer save_file: {t_save_plain:.3f} s")


if __name__ == "__main__":
    main()
