"""README and the docs stay true: the tour, the guide and the bilevel sample run, and CI runs
exactly README's test command."""
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


def test_bilevel_trainer_sample_runs_and_finds_the_corrupted_groups():
    """docs/bilevel.md's BilevelTrainer sample runs as written; it learns what it promises."""
    doc = (ROOT / "docs" / "bilevel.md").read_text()
    section = doc[doc.index("## Writing the two losses yourself"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "docs/bilevel.md, BilevelTrainer sample", "exec"), namespace)
    W = namespace["trainer"].weights
    assert W.shape == (6, 2)
    assert (W[[1, 4]] < 0.5 / 6).all(), W  # the two corrupted groups lose their weight
