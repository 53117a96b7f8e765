"Process-wide state the tests expect, as in a plain `python -m pytest` run; the `slow` marker's default."
import signal
import pytest

def pytest_configure(config):
    "pytest-xdist's workers ignore SIGINT; the Ctrl-C tests need Python's default handler, as in a terminal."
    signal.signal(signal.SIGINT, signal.default_int_handler)

def pytest_collection_modifyitems(config, items):
    "Tests marked `slow` (minutes, gigabytes) run only when a `-m` expression names them: `pytest -m slow`."
    if "slow" in (config.option.markexpr or ""): return
    skip = pytest.mark.skip(reason="slow: run it with `pytest -m slow`")
    for item in items:
        if item.get_closest_marker("slow"): item.add_marker(skip)
