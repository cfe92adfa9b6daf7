"""Print a quickstart command from README.md: the first line of the ```bash block after
`<!-- quickstart:NAME -->`, so CI runs exactly what the README tells users to run."""
import sys
from pathlib import Path


def command(name: str, readme: Path = Path(__file__).resolve().parent.parent / "README.md") -> str:
    lines = readme.read_text().splitlines()
    marker = f"<!-- quickstart:{name} -->"
    if marker not in lines:
        raise SystemExit(f"{readme}: marker {marker} not found")
    i = lines.index(marker) + 1
    while i < len(lines) and not lines[i].startswith("```"):
        i += 1
    if i + 1 >= len(lines):
        raise SystemExit(f"{readme}: no code block after {marker}")
    return lines[i + 1].strip()


if __name__ == "__main__":
    print(command(sys.argv[1]))
