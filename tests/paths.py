"""Where things are, for tests that start subprocesses or read files: tests/ (families.py, ...) and the repo root."""
import os

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
