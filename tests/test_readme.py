"""README stays true: the tour runs, and CI runs exactly README's test command."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_tour_runs():
    code = re.findall(r"```python\n(.*?)```", README, re.S)
    assert code, "README has no python tour"
    exec(compile(code[0], "README.md", "exec"), {})


def test_ci_runs_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    assert len(commands) >= 2
    main_job, tests = commands[0], commands[1]
    assert main_job.endswith("python -m applications.mri.train")
    assert tests.endswith("python -m pytest")
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()
