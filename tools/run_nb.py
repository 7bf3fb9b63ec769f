#!/usr/bin/env python
"""Execute notebooks in place (like `jupyter nbconvert --execute --inplace`) so their outputs are stored.

Cells flagged with one of the skip flags (default: `notest` and `cuda`: hub downloads and GPU-only cells, which cannot run
on a CPU machine without network) are left as they are, stored outputs included, so a GPU result recorded elsewhere survives.
`#| slow` cells do run: that is how their outputs get stored for readers and for the docs.

    python tools/run_nb.py nbs/03_models.ipynb [more.ipynb ...] [--run TEXT] [--skip notest cuda slow]

`--run TEXT` runs the skipped cells whose source contains TEXT anyway (a new `#| slow` section among stored ones).
"""
import re, sys, nbformat
from pathlib import Path
from nbclient import NotebookClient

def run(path, skip=('notest', 'cuda'), timeout=1800, also=None):
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    pat = re.compile(r'^#\|\s*(' + '|'.join(map(re.escape, skip)) + r')\b', re.M) if skip else None
    class _Client(NotebookClient):
        async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
            if pat and cell.cell_type == 'code' and pat.search(cell.source) and not (also and also in cell.source): return cell
            return await super().async_execute_cell(cell, cell_index, execution_count, store_history)
    _Client(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(path.parent)}}).execute()
    nbformat.write(nb, path)

if __name__ == '__main__':
    args = sys.argv[1:]
    skip, also = ('notest', 'cuda'), None
    if '--run' in args:
        i = args.index('--run'); also = args[i + 1]; args = args[:i] + args[i + 2:]
    if '--skip' in args:
        i = args.index('--skip'); skip = tuple(args[i+1:]); args = args[:i]
    for p in args:
        print(f"executing {p}", flush=True)
        run(p, skip, also=also)
