"""Where images live: a directory, Ceph RGW over S3, or RADOS (later)."""
