"""Scoring: per-case metrics, Ignite metric handlers, label-map and table files, reports, paired statistics, plots."""
