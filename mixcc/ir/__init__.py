"""Front end: grammar, parser, typed IR, verifier, shape inference and passes."""
