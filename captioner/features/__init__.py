"""Image features, once per image: what they depend on (`keys`), where extraction reads images (`sources`), the one
extraction pipeline (`extraction`), and the stores that keep them (`stores`: the memory-mapped `cache`, held
`resident` in memory, or `streamed` LitData shards with their training loader, `stream_loader`)."""
