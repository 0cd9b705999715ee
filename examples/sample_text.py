"""Write text sampled from a model (data-free evaluation or calibration text for a quick check).

    python examples/sample_text.py default --samples 4 --seq-len 512 --seed 1 -o eval.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from liftedge.io import atomic_write_bytes
from liftedge.model import load_model
from liftedge.text import generate_calibration_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args()
    loaded = load_model(args.model)
    tokens = generate_calibration_tokens(loaded, args.samples, args.seq_len, args.seed)
    text = "\n".join(loaded.tokenizer.decode(row, skip_special_tokens=True) for row in tokens.tolist())
    atomic_write_bytes(args.output, text.encode("utf-8"))
    print(f"wrote {args.output}: {args.samples} x {args.seq_len} sampled tokens")


if __name__ == "__main__":
    main()
