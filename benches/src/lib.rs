//! Benchmarks live in `benches/`, and `src/bin/courier-census.rs` is the
//! node with an allocation census; this library is empty.
