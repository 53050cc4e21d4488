"""Writing traces in the exact format of `tern trace export --format csv`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

HEADER = "kind,ts_ns,end_ns,target,op,offset,len,latency_ns,pid,tid,ip,flags,comm,lost"
MIB = 1 << 20
SEC = 1_000_000_000


def block(ts, op, offset, length, target="/dev/loop9", pid=42, comm="fio", flags="sync"):
    """A block-request row as export.rs writes it (comm quoted when it needs it)."""
    if "," in comm:
        comm = '"' + comm.replace('"', '""') + '"'
    return f"block,{ts},,{target},{op},{offset},{length},1000,{pid},,,{flags},{comm},"


def fault(ts, op, address, pid=7, tid=8, ip=4096, flags="write"):
    return f"fault,{ts},,,{op},{address},4096,,{pid},{tid},{ip},{flags},,"


def gap(start, end, lost=1):
    return f"gap,{start},{end},,,,,,,,,,,{lost}"


@pytest.fixture
def write_trace(tmp_path: Path):
    """Writes rows under the export header; returns the file's path."""

    def write(rows: list[str], name: str = "trace.csv") -> Path:
        path = tmp_path / name
        path.write_text("\n".join([HEADER, *rows]) + "\n")
        return path

    return write


@pytest.fixture
def tern() -> Path:
    """The tern binary these cross-checks run (TERN_BIN, else the workspace's
    debug build): a test that needs it fails without it, never skips."""
    candidates = [os.environ.get("TERN_BIN")]
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(os.environ["CARGO_TARGET_DIR"] + "/debug/tern")
    candidates += [str(REPO / "target/debug/tern"), shutil.which("tern")]
    found = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
    if found is None:
        pytest.fail("no tern binary: build it (cargo build -p tern) or set TERN_BIN")
    return found
