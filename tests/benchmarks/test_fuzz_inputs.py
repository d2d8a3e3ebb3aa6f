"""A sample of the input fuzzer (benchmarks/fuzz_inputs.py) runs with every test run: every family, no
traceback, no garbage accepted in silence. The whole fuzzer (1,000+ cases) is in BENCHMARKS.md."""

import json
import subprocess
import sys
from pathlib import Path

from helpers import cli_env

REPO = Path(__file__).resolve().parents[2]


def test_a_sample_of_the_fuzzer_finds_no_traceback_and_no_silent_success(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/fuzz_inputs.py"), "--sample", "70", "--seed", "1",
                           "--workspace", str(tmp_path)], env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["cases"] == 70
    assert set(report["families"]) == {"config", "prompt", "image", "metadata", "latent cache", "checkpoint",
                                       "webdataset"}
    assert report["traceback"] == 0 and report["silent_success"] == 0, proc.stderr[-3000:]
    assert report["clean_error"] > 30  # most malformed inputs are refused with one line
