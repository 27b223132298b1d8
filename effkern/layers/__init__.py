"""nn.Module-level building blocks on the ragged (packed) token layout."""
