"""Text <-> ids: byte-level BPE, WordPiece, UTF-8-safe streaming decode, Jinja chat templates."""
