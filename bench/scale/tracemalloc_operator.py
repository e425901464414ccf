"""Run `visionft-operator` under tracemalloc, for `run_scale.py --operator-wrapper` (memory diagnosis only:
it slows the operator down). Every $VISIONFT_TRACEMALLOC_EVERY seconds (default 30) a background thread
writes the 30 biggest allocation sites still alive to $VISIONFT_TRACEMALLOC_OUT (default
/tmp/visionft-tracemalloc.txt), overwriting the previous report."""

from __future__ import annotations

import os
import sys
import threading
import time
import tracemalloc


def _dump(*_: object) -> None:
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
        ]
    )
    lines = [
        f"traced now {tracemalloc.get_traced_memory()[0] / 2**20:.1f} MiB, peak "
        f"{tracemalloc.get_traced_memory()[1] / 2**20:.1f} MiB"
    ]
    for stat in snapshot.statistics("traceback")[:30]:
        lines.append(f"\n{stat.size / 2**20:.1f} MiB in {stat.count} blocks")
        lines += [f"    {frame}" for frame in stat.traceback.format(limit=6)]
    with open(os.environ.get("VISIONFT_TRACEMALLOC_OUT", "/tmp/visionft-tracemalloc.txt"), "w") as out:
        out.write("\n".join(lines) + "\n")


def main() -> int:
    tracemalloc.start(6)
    every = float(os.environ.get("VISIONFT_TRACEMALLOC_EVERY", "30"))

    def loop() -> None:
        for _ in range(100_000):
            time.sleep(every)
            _dump()

    threading.Thread(target=loop, daemon=True, name="tracemalloc-dump").start()
    from visionft_operator.main import main as operator_main

    return operator_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
