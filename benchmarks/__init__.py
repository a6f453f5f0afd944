"""Side-by-side measurements against the tools users would pick instead."""

import os

# OpenMP workers that finish early wait passively (sleep) instead of spinning. On a shared machine
# spinning workers take the cores that the working thread of another parallel region needs, and a
# side that runs many small parallel ops (ours: a few ops per expert) then loses most of its time
# to spinning: a MoE row once read 0.08x at load ~6 on 2 cores and 6x idle. On an idle machine
# passive waiting measured the same as the default for both sides (benchmarks/bench_moe.py). Set
# here, before any benchmark imports torch, so every benchmark and the processes it starts
# inherit it; an OMP_WAIT_POLICY already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
