"""Benchmarks behind `smolcluster bench ...`; each prints a table or, with --json, one JSON object."""
