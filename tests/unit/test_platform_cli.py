"""`lull down` stops its own platform's processes and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from controller.assembly.local_platform import _stop_cluster

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_down_stops_processes_that_name_the_temp_dir_in_their_command_line_or_environment():
    temp_dir = tempfile.mkdtemp(prefix="lull-ray-")
    # A raylet names the temp dir on its command line; Ray's agents and workers rename
    # themselves but keep `up`'s environment (PROMETHEUS_MULTIPROC_DIR under the temp dir).
    by_cmdline = subprocess.Popen([*SLEEPER, f"--temp-dir={temp_dir}"])
    by_environ = subprocess.Popen(SLEEPER, env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": f"{temp_dir}/metrics"})
    other = subprocess.Popen(SLEEPER, env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": "/tmp/lull-ray-other/metrics"})
    try:
        _stop_cluster(temp_dir, grace_s=5.0)
        assert by_cmdline.wait(timeout=5) is not None and by_environ.wait(timeout=5) is not None
        assert other.poll() is None  # another platform's process (or anyone's) is left alone
    finally:
        for process in (by_cmdline, by_environ, other):
            process.kill()
            process.wait()
