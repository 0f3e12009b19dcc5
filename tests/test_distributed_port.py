"""A world of one picks a free port; if another process takes it before the bind, it picks again."""
import subprocess
import sys

SCRIPT = """
import os, socket
for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
    os.environ.pop(k, None)
busy = socket.socket(); busy.bind(("127.0.0.1", 0)); busy.listen(); port = busy.getsockname()[1]
import train.distributed as d
picks = []
real = d._free_port
d._free_port = lambda: picks.append(1) or (port if len(picks) == 1 else real())
d.init_distributed()
assert len(picks) == 2 and os.environ["MASTER_PORT"] != str(port), (picks, os.environ["MASTER_PORT"])
print("ok")
"""


def test_a_taken_port_is_picked_again(repo_root):
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=repo_root, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo_root), "DS_ACCELERATOR": "cpu",
                              "HOME": "/tmp"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
