"""Times one whole child process for the side-by-side benchmarks (nanogpt_cpu, finetune_cpu).

The child runs under a small timer process of its own, so getrusage's peak RSS of the timer's
children is that one run's, not the largest of every run the benchmark made.
"""

import json
import subprocess
import sys

# launch (unix seconds, to set against a time the child records), wall seconds, peak RSS, exit
# code and the tails of what the child printed
TIMER = """
import resource, subprocess, sys, time, json
launch, start = time.time(), time.perf_counter()
code = subprocess.run(sys.argv[2:], cwd=sys.argv[1], stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"launch": launch, "wall": wall, "rss": rss, "rc": code.returncode,
                  "out": code.stdout[-4000:], "err": code.stderr[-3000:]}))
"""


def run(cwd: str, cmd: list[str], env: dict | None = None) -> dict:
  """`cmd` run in `cwd` (with `env`, default this process's), timed as one whole process."""
  out = subprocess.run([sys.executable, "-c", TIMER, cwd, *cmd], capture_output=True, text=True,
                       env=env)
  return json.loads(out.stdout.strip().splitlines()[-1])
