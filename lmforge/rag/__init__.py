"""Retrieval-augmented answers: `lmforge rag index / query / ask`.

The one idea: an index is a folder whose SQLite file holds every chunk (text, document id, title,
character offsets into the document, content hashes and, with an encoder, its vector); the BM25
index and the dense matrix are derived from those rows in a fixed order, so re-indexing a changed
folder (only the changed documents are chunked and embedded again) gives the same index as
building it afresh. A query ranks chunks by BM25 and by cosine similarity, fuses the two
rankings by reciprocal rank fusion, and `ask` numbers the chunks in the prompt so each `[n]` in
the answer maps back to a document and its offsets.
"""
