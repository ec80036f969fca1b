"""CI runs exactly what the README tells a new user to run."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_ci_installs_and_tests_as_the_readme_says():
    setup_and_run, test = readme_commands()[:2]
    install = setup_and_run.split(" && ")[0]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert any(line.startswith(install) for line in ci), f"CI does not run '{install}'"
    assert test in ci, f"CI does not run '{test}'"
