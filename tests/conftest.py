"""Fixtures shared by several test files."""

import signal

import pytest


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt during the test, as in a terminal. A job started in the
    background of a non-interactive shell (``cmd &``, nohup) inherits SIGINT ignored, and Python (and
    so the tool) rightly leaves it ignored: a test that sends itself SIGINT must not depend on how
    pytest was started."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
