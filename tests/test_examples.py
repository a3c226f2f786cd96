"""The scripts in examples/ run as a user would run them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_parity_example_converts_and_matches():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "parity.py")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "max relative difference" in result.stdout
