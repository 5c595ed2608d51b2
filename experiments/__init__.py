"""Command-line experiments reproducing the paper's tables and figures."""
