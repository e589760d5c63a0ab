//! Room for many connections: the open-file limit, and loopback source
//! addresses (each local address has its own ephemeral ports, about 28,000
//! with Linux's default range, so 100,000 connections to one server port
//! need at least four).

use std::net::{IpAddr, Ipv4Addr};

/// File descriptors the generator needs beyond one per connection.
const SPARE_FDS: u64 = 64;

/// Connections per loopback source address when they are spread
/// automatically (below the default ephemeral range of 28,232 ports).
pub const CONNECTIONS_PER_SOURCE: u64 = 20_000;

/// The open-file limit: (soft, hard).
pub fn nofile() -> std::io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

/// Raises the soft open-file limit to the hard one (allowed without
/// privileges); returns the new (soft, hard).
pub fn raise_nofile() -> std::io::Result<(u64, u64)> {
    let (soft, hard) = nofile()?;
    if soft < hard {
        let r = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    nofile()
}

/// Makes sure this process may open `connections` sockets, raising its
/// limit if it can, and says exactly which limit stops it if not.
pub fn ensure_room(connections: u64) -> anyhow::Result<()> {
    let (soft, hard) = raise_nofile()?;
    let need = connections + SPARE_FDS;
    anyhow::ensure!(
        need <= soft,
        "{connections} connections need about {need} open files, but this process may open \
         {soft} (RLIMIT_NOFILE soft {soft}, hard {hard}); raising the hard limit needs root \
         or CAP_SYS_RESOURCE (`ulimit -Hn`, LimitNOFILE= in a systemd unit, `--ulimit nofile=` \
         in Docker), or run fewer connections per generator process"
    );
    Ok(())
}

/// The source addresses for `connections` to `server`: none (the kernel
/// chooses) when one address has ports enough or the server is not on
/// IPv4 loopback; otherwise 127.0.0.1, 127.0.0.2, ... as many as needed
/// (every 127/8 address is local on Linux, no set-up needed).
pub fn auto_sources(server: &str, connections: u64) -> Vec<IpAddr> {
    let loopback = server
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip().is_loopback() && a.is_ipv4())
        .unwrap_or(false);
    if !loopback || connections <= CONNECTIONS_PER_SOURCE {
        return Vec::new();
    }
    let n = connections.div_ceil(CONNECTIONS_PER_SOURCE).min(250) as u8;
    (1..=n)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_spread_only_when_one_address_is_not_enough() {
        assert!(auto_sources("127.0.0.1:7700", 20_000).is_empty());
        assert!(auto_sources("10.0.0.1:7700", 100_000).is_empty());
        let s = auto_sources("127.0.0.1:7700", 100_000);
        assert_eq!(s.len(), 5);
        assert_eq!(s[4], IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5)));
    }

    #[test]
    fn a_limit_too_low_is_named() {
        let err = ensure_room(u64::MAX / 2).unwrap_err().to_string();
        assert!(err.contains("RLIMIT_NOFILE"), "{err}");
        ensure_room(10).unwrap();
    }
}
