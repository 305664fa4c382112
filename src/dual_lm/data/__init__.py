"""Data: the corpus readers, prepare-data (tokenise into shards) and the packed loader."""
