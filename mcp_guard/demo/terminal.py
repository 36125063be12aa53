"""Type into a command as a person at a terminal would: the walkthrough's reviewer, and the tests'.

`mcp-guard approve` reads the reviewer's passphrase from a terminal only. This runs it on a
pseudo-terminal and types each answer when a passphrase prompt appears. It is no side door: it
needs the passphrase like anyone else, and the walkthrough's reviewers exist only in the
walkthrough's own configuration, with passphrases published in its source.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PROMPT = b"assphrase"
ROWS, COLUMNS = 50, 160


@dataclass(frozen=True, slots=True)
class Typed:
    returncode: int
    output: str


def run_in_terminal(
    argv: Sequence[str], answers: Sequence[str], env: Mapping[str, str], timeout: float = 60.0
) -> Typed:
    """Run `argv` with a pseudo-terminal as its standard streams, in a session of its own (so it has
    no controlling terminal to reach past it), answering passphrase prompts in order."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    process = subprocess.Popen(
        list(argv), stdin=slave, stdout=slave, stderr=slave, env=dict(env), start_new_session=True
    )
    os.close(slave)
    output, answered, pending = bytearray(), 0, list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the command closed the terminal (it ended)
                    break
                if not chunk:
                    break
                output += chunk
                if pending and output.count(PROMPT) > answered and output.rstrip().endswith(b":"):
                    os.write(master, pending.pop(0).encode() + b"\n")
                    answered += 1
            elif process.poll() is not None:
                break
        else:
            process.kill()
        returncode = process.wait(timeout=10)
    finally:
        os.close(master)
    return Typed(returncode, output.decode(errors="replace").replace("\r\n", "\n"))
