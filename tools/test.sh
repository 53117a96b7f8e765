#!/usr/bin/env bash
# Run the whole test suite: notebook tests (nbdev-test) and pytest, then print "N passed, N failed".
# Usage: bash tools/test.sh            (from the repository root, with the dev install active)
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MPLBACKEND=Agg
# one BLAS/OpenMP thread per process: nbdev-test runs notebooks in parallel and oversubscribed threads crawl
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
# the active virtualenv, else ./.venv, else whatever python is on PATH
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then export PATH="$PWD/.venv/bin:$PATH"; fi
py=$(command -v python || command -v python3)
bin=$(dirname "$py")
log=$(mktemp)

# notebooks: nbdev-test lists the failing ones; count every notebook it runs
nb_total=$("$py" - <<'PY'
from nbdev.test import _keep_file
from nbdev.doclinks import nbglob
print(sum(1 for f in nbglob("nbs", as_path=True) if _keep_file(f, ".notest")))
PY
)
"$bin/nbdev-test" --n-workers 2 --timing 2> >(tee "$log" >&2)
nb_rc=$?
nb_failed=$(awk '/Failed On The Following Notebooks/{f=1;next} f && /\.ipynb/{n++} END{print n+0}' "$log")
[ "$nb_rc" -ne 0 ] && [ "$nb_failed" -eq 0 ] && nb_failed=1
nb_passed=$((nb_total - nb_failed))
echo "notebooks: $nb_passed passed, $nb_failed failed (of $nb_total)"

# pytest, on 2 processes (pytest-xdist): each test module runs whole on one of them, so its module fixtures are
# built once; TEST_WORKERS=0 runs everything in this process
workers=${TEST_WORKERS:-2}
xdist=(); [ "$workers" -gt 0 ] && xdist=(-n "$workers" --dist loadscope)
"$py" -m pytest tests -q -o addopts="" -p no:cacheprovider --durations=15 "${xdist[@]}" 2>&1 | tee "$log"
py_rc=${PIPESTATUS[0]}
summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|errors|skipped|deselected)' "$log" | tail -1)
count() { echo "$summary" | grep -Eo "[0-9]+ ($1)" | awk '{s += $1} END {print s + 0}'; }
py_passed=$(count passed)
py_failed=$(count 'failed|error|errors')
[ "$py_rc" -ne 0 ] && [ "$py_rc" -ne 5 ] && [ "$py_failed" -eq 0 ] && py_failed=1
rm -f "$log"

passed=$((nb_passed + py_passed)); failed=$((nb_failed + py_failed))
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
