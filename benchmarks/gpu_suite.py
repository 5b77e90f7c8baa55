"""Every benchmark in one call on one device (same as `python -m pfgmpp_fast bench`).

    python benchmarks/gpu_suite.py            # full sizes on the GPU
    python benchmarks/gpu_suite.py --smoke    # tiny sizes, CPU-friendly

Each suite (bench_kernels, bench_networks, bench_training, bench_sampling) also runs on
its own with --device/--smoke/--out.
"""

import argparse
import sys

from pfgmpp_fast.apps import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    sys.exit(bench.main(parser.parse_args()))
