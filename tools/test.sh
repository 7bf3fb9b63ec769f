#!/usr/bin/env bash
# The project's whole test: notebooks clean and library in sync, README fresh, notebooks executed, pytest suite.
# Run from anywhere: `tools/test.sh` (after `pip install -e ".[dev]"`).
set -uo pipefail
cd "$(dirname "$0")/.."
status=0

echo "== 1. nbdev_clean, nbdev_export and tools/readme.py change nothing; Colab cells present"
snapshot() { git status --porcelain --untracked-files=all; git diff; }
before=$(snapshot)
nbdev_clean >/dev/null && nbdev_export && python tools/readme.py || status=1
after=$(snapshot)
if [ "$before" != "$after" ]; then
  echo "FAILED: the notebooks were not clean, or stl_nb/ or README.md was out of sync with nbs/:"
  diff <(echo "$before") <(echo "$after") | sed -n 's/^> /  /p' | head -30
  status=1
else
  echo "ok: notebooks clean, library and README in sync"
fi
python tools/colab.py --check || status=1   # every notebook opens with its Colab badge and set-up cell

echo "== 2. nbdev_test (cells flagged slow, cuda or notest are skipped)"
log=$(mktemp)
# nbdev_test runs one notebook per core; one torch thread each keeps them from fighting over the cores
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} nbdev_test --do_print --timing ${NBDEV_TEST_ARGS:-} 2>&1 | tee "$log"
nb_rc=${PIPESTATUS[0]}
n_all=$(grep -o 'Starting ' "$log" | wc -l)
n_failed=$(sed -n '/Failed On The Following Notebooks/,$p' "$log" | grep -cE '^\s+\S+\.ipynb' || true)
[ "$nb_rc" -ne 0 ] && [ "$n_failed" -eq 0 ] && n_failed=1
echo "notebooks: $((n_all - n_failed)) passed, $n_failed failed"
[ "$nb_rc" -eq 0 ] || status=1
rm -f "$log"

echo "== 3. pytest"
if ls tests/test_*.py >/dev/null 2>&1; then
  python -m pytest tests ${PYTEST_ARGS:-} || status=1
else
  echo "no pytest suite yet"
fi
exit $status
