"""Offline analysis of Tern traces: an ARIMA baseline for the next-horizon working set."""
