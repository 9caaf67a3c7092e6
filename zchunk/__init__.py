"""zchunk: chunked, resumable ZFS replication over flaky links."""
__version__ = "0.1.0"
