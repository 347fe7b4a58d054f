"""Data stage: read raw documents (readers), tokenize them into shards (prepare), and serve
packed, resumable training batches from those shards (loader)."""
