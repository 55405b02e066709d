"""Draw a run's loss curves (train and val against step) to a PNG.

  python tools/plot_metrics.py --workdir runs/demo [--out loss.png]   (same as `jaxlm plot`)
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm import plot  # noqa: E402

if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  print(plot.plot_run(args.workdir, args.out))
