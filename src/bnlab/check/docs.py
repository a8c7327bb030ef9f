"""The rules' section of docs/check.md, generated from ``bnlab.check.rules`` so that the two cannot part.

After editing a rule, rewrite the section (tests/test_check.py fails until then)::

    python -m bnlab.check.docs docs/check.md

Only the text between the BEGIN and END markers is replaced; the rest of the page is written by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bnlab.check.rules import RULES

__all__ = ["BEGIN", "END", "rules_markdown", "with_rules_section"]

BEGIN = "<!-- BEGIN rules: generated from src/bnlab/check/rules.py by `python -m bnlab.check.docs docs/check.md` -->"
END = "<!-- END rules -->"


def rules_markdown() -> str:
    """Every rule in Markdown: a table, then a section per rule, in the order the report lists them."""
    lines = ["| code | severity | scope | in one line |", "|---|---|---|---|"]
    lines += [f"| `{r.code}` | {r.severity} | {r.scope} | {r.summary} |" for r in RULES.values()]
    for rule in RULES.values():
        lines += [
            "",
            f"### `{rule.code}`: {rule.title}",
            "",
            f"*{rule.severity.capitalize()}, about the {rule.scope}.* {rule.explanation}",
            "",
            f"*Detection.* {rule.detection}",
            "",
            f"*Fix.* {rule.fix}",
        ]
    return "\n".join(lines)


def with_rules_section(text: str) -> str:
    """``text`` (docs/check.md) with what lies between the BEGIN and END markers replaced by ``rules_markdown``."""
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not (begin and end):
        raise ValueError(f"no {BEGIN!r} ... {END!r} markers to write the rules between")
    return f"{head}{BEGIN}\n{rules_markdown()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    """Rewrite the rules' section of the Markdown file named in ``argv``."""
    if len(argv) != 1:
        print("usage: python -m bnlab.check.docs docs/check.md", file=sys.stderr)
        return 2
    path = Path(argv[0])
    path.write_text(with_rules_section(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
