"""Reading py-spy's raw profiles (``py-spy record --format raw``): the most-sampled frames."""

from __future__ import annotations

from collections import Counter


def top_frames(path: str, n: int = 25, skip_outer: int = 0, indent: str = "") -> list[str]:
    """Lines for the ``n`` most-sampled innermost frames (self, with their thread) and the ``n``
    most-sampled frames anywhere on the stack (inclusive, after the ``skip_outer`` most common,
    which are the process's entry), each as a share of all samples."""
    total, own, incl = 0, Counter[str](), Counter[str]()
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack:
                continue
            k = int(count)
            total += k
            frames = stack.split(";")
            own[frames[0][:32] + " | " + frames[-1]] += k
            for frame in set(frames[1:]):
                incl[frame] += k
    out = [f"{indent}{total} samples"]
    out += [f"{indent}{k / max(total, 1):6.1%} self {fr[:160]}" for fr, k in own.most_common(n)]
    ranked = incl.most_common(n + skip_outer)[skip_outer:]
    out += [f"{indent}{k / max(total, 1):6.1%} incl {fr[:160]}" for fr, k in ranked]
    return out
