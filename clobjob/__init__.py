"""clobjob: backfill Polymarket CLOB order fills into ClickHouse."""

__version__ = "0.1.0"
