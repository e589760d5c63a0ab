//! `courier-loadtest`: Courier's load generator.
//!
//! This is the crate's skeleton: scenarios, latency recording, correctness
//! checking and peer comparisons arrive with the load-generator issue. Until
//! then the binary says so instead of pretending to measure anything.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // Keep the dependency edges the real tool will have.
    let _ = courier_protocol::PROTOCOL_VERSION;
    let _ = std::any::type_name::<courier_client::Client>();
    let _ = tokio::runtime::Builder::new_current_thread;
    eprintln!(
        "courier-loadtest: no scenarios yet; the load generator is not implemented in this version"
    );
    std::process::exit(2)
}
