"""The `chronos-queue` command line."""
