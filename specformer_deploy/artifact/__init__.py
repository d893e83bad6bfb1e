"""The exported artefact: ONNX export, its metadata and digests, the audit, plots."""
