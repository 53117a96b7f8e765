"Process-wide state the tests expect, as in a plain `python -m pytest` run; the `slow` marker's default; the longest first."
import signal
import pytest

def pytest_configure(config):
    "pytest-xdist's workers ignore SIGINT; the Ctrl-C tests need Python's default handler, as in a terminal."
    signal.signal(signal.SIGINT, signal.default_int_handler)

# the modules that take longest (CPU seconds, measured): first, so that on pytest-xdist's workers (tools/test.sh runs
# them in this order, --no-loadscope-reorder) none of them starts last while the other worker has nothing left to do
LONGEST_FIRST = ("test_demo.py", "test_standin_hub.py", "test_notebooks.py", "test_distributed_eval.py", "test_cli.py", "test_mini.py")

def pytest_collection_modifyitems(config, items):
    "The longest modules first; tests marked `slow` (minutes, gigabytes) run only when a `-m` expression names them: `pytest -m slow`."
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))      # stable: each module's own order is kept
    if "slow" in (config.option.markexpr or ""): return
    skip = pytest.mark.skip(reason="slow: run it with `pytest -m slow`")
    for item in items:
        if item.get_closest_marker("slow"): item.add_marker(skip)
