#!/usr/bin/env python3
"""Top costs of a `py-spy record -f raw` profile: functions by own samples and by samples
under them, as shares of all samples of the relay's threads (py-spy leaves idle ones out).

    python bench/profile_top.py PROFILE.txt [--top 15] [--reactor]
"""

from __future__ import annotations

import argparse
from collections import Counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--reactor", action="store_true", help="only the reactor thread's samples")
    args = parser.parse_args()
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    total = 0
    with open(args.profile) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            if args.reactor and "mainLoop" not in stack:
                continue
            total += n
            frames = [frame.split(" (")[0] + " " + frame.split("/")[-1].split(":")[0].rstrip(")")
                      for frame in stack.split(";")]
            own[frames[-1]] += n
            for frame in set(frames):
                under[frame] += n
    print(f"{total} samples")
    print("by own samples:")
    for frame, n in own.most_common(args.top):
        print(f"  {n / total:6.1%}  {frame}")
    print("by samples under the function:")
    for frame, n in under.most_common(args.top):
        print(f"  {n / total:6.1%}  {frame}")


if __name__ == "__main__":
    main()
