"""Executes the reuse schedule's plan at phase boundaries: saved-tensor capture, offload streaming
and reload, layer replay, and the participants that carry them out."""
