"""README and the guide stay true: the tour and the guide run, and CI runs exactly README's test command."""
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


def test_guide_runs_as_one_script(capsys):
    """docs/guide.md says its snippets run in order as one script: they do."""
    guide = (ROOT / "docs" / "guide.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", guide, re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/guide.md, snippet {i + 1}", "exec"), namespace)
    assert "checks passed" in capsys.readouterr().out
