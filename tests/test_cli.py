"""The dyn command: help works, start-up stays light, bad input gets one line and exit 2."""

import subprocess
import sys

from click.testing import CliRunner

from cli.main import dyn

HELP_IMPORTS = """
import sys
sys.argv = ["dyn", "--help"]
from cli.main import main
try:
    main()
except SystemExit as e:
    assert e.code in (0, None), e.code
heavy = ("torch", "matplotlib", "seaborn", "pandas", "pyarrow")
print(sorted(m for m in heavy if m in sys.modules))
"""


def test_help_lists_usage_and_commands():
    result = CliRunner().invoke(dyn, ["--help"], prog_name="dyn")
    assert result.exit_code == 0
    assert "Usage: dyn" in result.output
    assert "record" in result.output


def test_help_does_not_import_torch_or_plotting():
    out = subprocess.run([sys.executable, "-c", HELP_IMPORTS], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_usage_error_is_one_line_with_exit_code_2():
    out = subprocess.run([sys.executable, "-m", "cli", "record", "--steps", "many"], capture_output=True, text=True)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr and "--steps" in out.stderr
