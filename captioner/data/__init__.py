"""Data: source -> records -> splits -> vocabulary -> features -> loaders."""
