"""Replace a generated section of README.md: `python tools/readme_section.py NAME FILE`.

The section sits between `<!-- NAME:start -->` and `<!-- NAME:end -->`; FILE
is markdown, or a JSON file whose "sections" entry maps NAME to the markdown
(benchmarks/scale.py: "scale"), else whose "table" entry is the markdown. Figures in
the README are written by the runs that measured them, never by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def replace_section(readme: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in readme or end not in readme:
        raise SystemExit(f"README.md has no {start} ... {end} section")
    before, rest = readme.split(start, 1)
    _, after = rest.split(end, 1)
    return f"{before}{start}\n{body.strip()}\n{end}{after}"


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit("usage: python tools/readme_section.py NAME FILE")
    name, source = sys.argv[1], Path(sys.argv[2])
    text = source.read_text()
    body = text
    if source.suffix == ".json":
        record = json.loads(text)
        body = record.get("sections", {}).get(name) or record["table"]
    readme = Path(__file__).resolve().parent.parent / "README.md"
    readme.write_text(replace_section(readme.read_text(), name, body))
    print(f"README.md: section {name} updated from {source}")


if __name__ == "__main__":
    main()
