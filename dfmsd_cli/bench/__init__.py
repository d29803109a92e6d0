"""User-facing measurements (``dfmsd bench``): precompute overhead, store size and read
throughput (``bench.store``, wrapping ``dfmsd_cli.store.measure``), distill step cost and peak
memory with the store, without it and with the teachers in the loop (``bench.distill``)."""

from dfmsd_cli.bench.distill import bench_distill
from dfmsd_cli.bench.store import bench_store_cmd

__all__ = ["bench_distill", "bench_store_cmd"]
