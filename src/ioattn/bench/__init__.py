"""Benchmarks and self-checks behind `ioattn bench` and `ioattn check`: a registry of cases,
the peers, a runner, one FLOP formula and the reports."""
