"""Benchmarks for peft-c2a (scripts) and their shared support code."""
