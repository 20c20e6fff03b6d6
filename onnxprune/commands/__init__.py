"""Thin Click commands: parse options, call the library, print."""
