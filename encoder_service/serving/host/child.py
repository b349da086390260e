"""Child processes of a serving process (the model process, preprocessing workers): started with
`python -m MODULE --config JSON` plus shared-memory file descriptors, spoken to over their stdin/stdout
(`framing`). A child's stdout is its reply pipe only: stray prints go to stderr.

Children outlive a group signal: each runs in a session of its own (a signal to the server's process group,
from Ctrl-C, `kill -- -PGID` or systemd's `KillMode=control-group`, does not reach it) and ignores SIGINT and
SIGTERM besides. The server drains on such a signal while its children finish the calls in flight; a child
exits when its parent's end of the pipe closes (the parent exited, or closed it on purpose)."""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys


def spawn(module: str, config: dict, fds: dict[str, tuple[int, int]] | None = None) -> subprocess.Popen:
    """Start `module` as a child; `fds`: name -> (fd, size) of the shared memory it maps (`--NAME-fd`,
    `--NAME-size`)."""
    args = [sys.executable, "-m", module, "--config", json.dumps(config)]
    for name, (fd, size) in (fds or {}).items():
        args += [f"--{name}-fd", str(fd), f"--{name}-size", str(size)]
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                            pass_fds=tuple(fd for fd, _ in (fds or {}).values()), start_new_session=True)


def started(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Whether the child's first message is readable within `timeout_s`."""
    ready, _, _ = select.select([proc.stdout.fileno()], [], [], timeout_s)
    return bool(ready)


def child_args(fd_names: tuple[str, ...], argv: list[str] | None = None) -> argparse.Namespace:
    """The child's side of `spawn`: `config` (parsed JSON) and `<name>_fd` / `<name>_size` (None when not given)."""
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True, type=json.loads)
    for name in fd_names:
        p.add_argument(f"--{name}-fd", type=int, default=None)
        p.add_argument(f"--{name}-size", type=int, default=0)
    return p.parse_args(argv)


def child_pipes() -> tuple[int, int]:
    """(input fd, reply fd) of a child; anything printed to stdout afterwards goes to stderr instead. From
    here on the child ignores SIGINT and SIGTERM: only its pipe closing ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reply = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return sys.stdin.fileno(), reply
