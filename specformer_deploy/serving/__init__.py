"""Serving: runtime, request parsing, image decoding, certificates, packaging.

Importable without torch: only the PGD probe loads it, lazily."""
