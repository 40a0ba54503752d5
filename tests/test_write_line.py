"""`catseg.console.write_line`: processes sharing stderr (the ranks of a launch) write whole
lines that never run together. (`print` writes the newline separately: the same two writers
using it broke 30080 of 40000 lines here.)"""
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINES = 20000

WRITER = f"""
import os, sys, time
from catseg.console import write_line
tag, go = sys.argv[1:]
open(go + "-ready" + tag, "w").close()
while not os.path.exists(go):  # start together
    time.sleep(0.001)
for i in range({LINES}):
    write_line(f"rank {{tag}}: line {{i}}")
"""


def _write_together(tmp_path: Path, attempt: int) -> list:
    """The lines two write_line processes left in the stderr file they share."""
    go, shared = tmp_path / f"go{attempt}", tmp_path / f"stderr{attempt}.txt"
    with open(shared, "w") as stderr:
        writers = [subprocess.Popen([sys.executable, "-c", WRITER, tag, str(go)], cwd=REPO, stderr=stderr)
                   for tag in "01"]
        deadline = time.time() + 120
        while not all(Path(f"{go}-ready{tag}").exists() for tag in "01") and time.time() < deadline:
            time.sleep(0.01)
        go.touch()
        assert [w.wait(timeout=120) for w in writers] == [0, 0]
    return shared.read_text().splitlines()


def test_lines_of_two_processes_stay_whole(tmp_path):
    for attempt in range(3):  # until the writers really overlapped (a busy machine may serialise them)
        lines = _write_together(tmp_path, attempt)
        assert [line for line in lines if not re.fullmatch(r"rank [01]: line \d+", line)] == []
        assert sorted(lines) == sorted(f"rank {tag}: line {i}" for tag in "01" for i in range(LINES))
        switches = sum(a[5] != b[5] for a, b in zip(lines, lines[1:]))
        if switches > 10:
            return
    raise AssertionError(f"the two writers never overlapped in 3 attempts ({switches} switches)")
