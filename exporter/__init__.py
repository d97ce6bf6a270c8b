"""Exporters: architecture modules (one file each) and backends (one file each)."""
