"""Write a CSV of synthetic TED-Ed-like transcripts (video_id,title,transcript) for GPU runs.

Lengths vary like the reference workload (roughly 700-1,400 prompt tokens with the dummy
tokenizer); the text is English sentences about nature, drawn with a fixed seed."""

from __future__ import annotations

import argparse
import csv
import random

SENTENCES = [
    "Octopuses have three hearts and blue blood.",
    "Some birds migrate thousands of kilometres every year, guided by the stars.",
    "Trees talk to each other through fungi in the soil.",
    "Bees dance to tell their sisters where the flowers are.",
    "The blue whale is the largest animal that has ever lived.",
    "Plants turn sunlight into sugar in their leaves.",
    "A tiny seed can grow into a giant redwood over hundreds of years.",
    "Leaves change colour in autumn when the green chlorophyll breaks down.",
    "Coral reefs are built by tiny animals over thousands of years.",
    "Desert frogs can sleep underground for years, waiting for rain.",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=64)
    ap.add_argument("--min-sentences", type=int, default=30)
    ap.add_argument("--max-sentences", type=int, default=60)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with open(args.output, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["video_id", "title", "transcript"])
        for i in range(args.videos):
            n = rng.randrange(args.min_sentences, args.max_sentences)
            w.writerow([f"vid{i:05d}", f"Nature video {i}", " ".join(rng.choice(SENTENCES) for _ in range(n))])


if __name__ == "__main__":
    main()
