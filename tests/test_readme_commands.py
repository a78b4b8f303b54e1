"""The README's install and CLI commands are the ones CI's smokes run (scripts/*_smoke.sh).

The smokes prove the commands work; this keeps the README and the smokes from drifting apart.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Values the production smoke sets differently: loopback address and pool sizes.
SMOKE_CHOOSES = {"-b", "-w"}


def readme_commands(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n{section}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", body, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def runs(smoke_line: str, command: str) -> bool:
    """Whether a smoke line runs the command: its words in order, bar the values the smoke chooses."""
    wanted, words = command.replace('"', "").split(), iter(smoke_line.replace('"', "").split())
    skip = False
    for word in wanted:
        if skip:
            skip = False
            continue
        skip = word in SMOKE_CHOOSES
        if not any(have == word or have.endswith("/" + word) for have in words):
            return False
    return True


def smoke_lines(script: str) -> list[str]:
    return (ROOT / "scripts" / script).read_text().replace("\\\n", " ").splitlines()


def test_the_csv_commands_are_run_as_written_by_the_run_smoke():
    commands = readme_commands("## CSV import and export of users")
    assert len(commands) == 3
    lines = [line.split("  #")[0].strip() for line in smoke_lines("run_smoke.sh")]
    assert [command for command in commands if command not in lines] == []


def test_the_production_commands_are_run_by_the_prod_smoke():
    commands = [c for c in readme_commands("## Production") if not c.startswith("export ")]
    assert len(commands) == 8
    lines = smoke_lines("prod_smoke.sh")
    assert [command for command in commands if not any(runs(line, command) for line in lines)] == []


def test_the_benchmark_command_is_the_one_the_run_smoke_and_a_test_run():
    assert readme_commands("## Benchmark")[0] == "python3 bench/run.py --quick"
    assert any('"$PYTHON" bench/run.py --help' in line for line in smoke_lines("run_smoke.sh"))
