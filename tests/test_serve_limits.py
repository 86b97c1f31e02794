"""``postvault serve`` lifts its open-file limit (docs/scaling.md: a node
holds 1,000 idle IMAP connections; the usual soft limit is 1,024)."""

from __future__ import annotations

import resource
import subprocess
import sys


def test_soft_open_file_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, soft)
    code = (
        "import resource\n"
        "from postvault.serve import raise_open_file_limit\n"
        "new = raise_open_file_limit()\n"
        "print(new, resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )

    def lower() -> None:  # in the child only: start it with a low soft limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    out = subprocess.run([sys.executable, "-c", code], preexec_fn=lower, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    expected = hard if hard != resource.RLIM_INFINITY else max(low, 1 << 20)
    assert [int(x) for x in out] == [expected, expected]
    assert expected > low
