"""Internals of the served pool: one module per concern. Not a public API."""
