"""Validation: metrics, the check runner and reports."""
