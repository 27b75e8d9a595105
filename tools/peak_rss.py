"""Run a command and print its peak resident set size (the kernel's ru_maxrss of that process).

    python tools/peak_rss.py [--env NAME=VALUE ...] -- dllm-trt generate --engines DIR --prompt "..." --json
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for the command's environment")
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args()
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    env = dict(os.environ) | dict(e.split("=", 1) for e in a.env)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    print(f"peak RSS {usage.ru_maxrss / 1024:.0f} MiB (exit {code}): {' '.join(command)}")
    sys.exit(code)


if __name__ == "__main__":
    main()
