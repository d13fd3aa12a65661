"""Reading py-spy's raw profiles: shares of samples, innermost frames and whole stacks."""

from __future__ import annotations

from pathlib import Path

from recserve.bench.pyspy import top_frames


def test_top_frames_counts_self_and_inclusive_shares(tmp_path: Path) -> None:
    raw = tmp_path / "p.raw"
    raw.write_text(
        "thread (1): Main;main (a.py:1);work (a.py:5);decode (b.py:9) 5\n"
        "thread (1): Main;main (a.py:1);work (a.py:5);send (c.py:2) 3\n"
        "thread (1): Main;main (a.py:1);idle (a.py:9) 1\n"
        "thread (2): Poll;poll (d.py:7) 1\n"
        "\n"
    )
    lines = top_frames(str(raw), n=2, skip_outer=1, indent="> ")
    assert lines[0] == "> 10 samples"
    assert lines[1] == ">  50.0% self thread (1): Main | decode (b.py:9)"
    assert lines[2] == ">  30.0% self thread (1): Main | send (c.py:2)"
    # inclusive: main is on 9 of 10 stacks (the entry, skipped), work on 8, decode on 5
    assert lines[3] == ">  80.0% incl work (a.py:5)"
    assert lines[4] == ">  50.0% incl decode (b.py:9)"
    assert len(lines) == 5
