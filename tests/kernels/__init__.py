"""Kernel tests (a package so module names do not collide with tests/ at the top level)."""
