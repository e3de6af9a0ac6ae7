"""DuckDB storage: numbered migrations, one writer thread, read cursors, admin operations."""
