#!/usr/bin/env bash
# Run the whole test suite: notebook tests (nbdev-test) and pytest, then print "N passed, N failed".
# Usage: bash tools/test.sh            (from the repository root, with the dev install active)
# Tests marked `slow` (real-size models, several processes; minutes) are left out: `python -m pytest -m slow` runs them.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MPLBACKEND=Agg
# one BLAS/OpenMP thread per process: notebooks and tests run in parallel and oversubscribed threads crawl
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
# the active virtualenv, else ./.venv, else whatever python is on PATH
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then export PATH="$PWD/.venv/bin:$PATH"; fi
py=$(command -v python || command -v python3)
bin=$(dirname "$py")
nb_log=$(mktemp); py_log=$(mktemp)
trap 'rm -f "$nb_log" "$py_log"' EXIT
start=$(date +%s)

# The notebooks (nbdev-test, 2 processes) and pytest (2 processes) run at the same time: run one after the other, each
# ended with one core idle while its last, longest job ran. The notebooks' output is shown once they are done.
# nbdev-test lists the failing notebooks; --do-print says "Starting <notebook>" for each one it runs.
PYTHONUNBUFFERED=1 "$bin/nbdev-test" --n-workers 2 --timing --do-print > "$nb_log" 2>&1 &
nb_pid=$!

# pytest, on 2 processes (pytest-xdist): each test module (each class) runs whole on one of them, so its fixtures are
# built once; TEST_WORKERS=0 runs everything in this process
workers=${TEST_WORKERS:-2}
xdist=(); [ "$workers" -gt 0 ] && xdist=(-n "$workers" --dist loadscope --no-loadscope-reorder)   # in the order tests/conftest.py gives: longest first
"$py" -m pytest tests -q -o addopts="" -p no:cacheprovider -m "not slow" --durations=15 "${xdist[@]}" 2>&1 | tee "$py_log"
py_rc=${PIPESTATUS[0]}
summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|errors|skipped|deselected)' "$py_log" | tail -1)
count() { echo "$summary" | grep -Eo "[0-9]+ ($1)" | awk '{s += $1} END {print s + 0}'; }
py_passed=$(count passed)
py_failed=$(count 'failed|error|errors')
[ "$py_rc" -ne 0 ] && [ "$py_rc" -ne 5 ] && [ "$py_failed" -eq 0 ] && py_failed=1
echo "pytest done after $(( $(date +%s) - start )) s"

wait "$nb_pid"
nb_rc=$?
echo "== notebooks (nbdev-test), done after $(( $(date +%s) - start )) s"
cat "$nb_log"
nb_total=$(grep -Eo 'Starting [^ ]+\.ipynb' "$nb_log" | sort -u | wc -l)
nb_failed=$(awk '/Failed On The Following Notebooks/{f=1;next} f && /\.ipynb/{n++} END{print n+0}' "$nb_log")
[ "$nb_rc" -ne 0 ] && [ "$nb_failed" -eq 0 ] && nb_failed=1
nb_passed=$((nb_total - nb_failed))
echo "notebooks: $nb_passed passed, $nb_failed failed (of $nb_total)"
echo "pytest: $py_passed passed, $py_failed failed"

passed=$((nb_passed + py_passed)); failed=$((nb_failed + py_failed))
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
