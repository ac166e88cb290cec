"""The science of tomolive: pure, synchronous functions on arrays (no threads, no global state)."""
