"""Benchmarks (`pytest benches`) and the report that turns their JSON into tables: see benches/README.md."""
