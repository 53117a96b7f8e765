"Process-wide state the tests expect, as in a plain `python -m pytest` run."
import signal

def pytest_configure(config):
    "pytest-xdist's workers ignore SIGINT; the Ctrl-C tests need Python's default handler, as in a terminal."
    signal.signal(signal.SIGINT, signal.default_int_handler)
