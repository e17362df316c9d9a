"""The dyn command: help works and start-up stays light."""

import subprocess
import sys

from click.testing import CliRunner

from cli.main import main


def test_help_lists_usage():
    result = CliRunner().invoke(main, ["--help"], prog_name="dyn")
    assert result.exit_code == 0
    assert "Usage: dyn" in result.output
    assert "Study training dynamics" in result.output


def test_help_does_not_import_torch_or_matplotlib():
    code = (
        "import sys; from click.testing import CliRunner; from cli.main import main; "
        "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0; "
        "heavy = ('torch', 'matplotlib', 'seaborn', 'pandas', 'pyarrow'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
