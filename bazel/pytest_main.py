"""Entry point of the top-level py_test targets: runs pytest on the given file.

A py_test executes its main file as a script, and a pytest module only defines
test functions, so run directly it would pass without testing anything.
"""

import sys

import pytest

if __name__ == "__main__":
    # Runfiles are read-only: no .pytest_cache.
    sys.exit(pytest.main(["-p", "no:cacheprovider", *sys.argv[1:]]))
