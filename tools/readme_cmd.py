#!/usr/bin/env python
"""Print one of the README's two set-up commands: `run` (install + main job) or `test` (dev install + tests).

The commands are the shell blocks of README.md that follow a line `<!-- run-command -->` / `<!-- test-command -->`,
so CI runs exactly what a newcomer copies.
"""
import re, sys
from pathlib import Path

def command(kind, readme=Path(__file__).resolve().parent.parent/'README.md'):
    m = re.search(rf'<!-- {kind}-command -->\s*```(?:bash|sh)?\n(.*?)\n```', readme.read_text(), re.S)
    if not m: sys.exit(f"README.md has no block marked <!-- {kind}-command -->")
    return m.group(1).strip()

if __name__ == '__main__': print(command(sys.argv[1] if len(sys.argv) > 1 else 'test'))
