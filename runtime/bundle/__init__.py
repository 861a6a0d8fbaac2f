"""What an export wrote: the manifest (read, typed and checked) and the files' recorded sha256."""
