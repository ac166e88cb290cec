"""The tomolive service and command line: watching, scheduling, reloading, metrics (wiring only)."""
