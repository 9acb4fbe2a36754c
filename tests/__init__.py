"""What the test modules share. Helpers are in tests/helpers.py; fixtures are in conftest.py."""
