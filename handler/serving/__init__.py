"""Everything TorchServe-specific: the handler, request parsing, the model archive and the launcher."""
