"""The benchmark's phases, one module per family (`python scripts/benchmark.py` runs them): `harness` (a phase in a
process of its own, its memory peak, timed training), `data` (generated captions and features), `extraction`,
`training`, `decoding`, `serving` (the API, the server and the exported runtime), `scale` (the records pass and bulk
captioning), `original` (the original approach) and `report` (the tables)."""
