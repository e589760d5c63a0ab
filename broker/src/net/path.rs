//! Which network path a node runs: the `io` setting, the probe that tells
//! whether the kernel allows io_uring, and the fallback to epoll.

use std::io;

use serde::Deserialize;

/// `io` setting: which network path to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// io_uring if the kernel allows it, otherwise epoll.
    #[default]
    Auto,
    Uring,
    Epoll,
}

/// The path a node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoPath {
    Uring,
    Epoll,
}

impl IoPath {
    pub fn name(self) -> &'static str {
        match self {
            IoPath::Uring => "uring",
            IoPath::Epoll => "epoll",
        }
    }
}

/// Picks the path for `mode`: `auto` probes io_uring and falls back to
/// epoll (with the reason), `uring` fails with the reason if the probe does.
pub fn choose(mode: IoMode) -> anyhow::Result<(IoPath, Option<String>)> {
    match mode {
        IoMode::Epoll => Ok((IoPath::Epoll, None)),
        IoMode::Auto => match probe_uring() {
            Ok(()) => Ok((IoPath::Uring, None)),
            Err(why) => Ok((IoPath::Epoll, Some(why))),
        },
        IoMode::Uring => match probe_uring() {
            Ok(()) => Ok((IoPath::Uring, None)),
            Err(why) => anyhow::bail!(
                "io = \"uring\" but io_uring is unavailable: {why}; \
                 use io = \"auto\" or \"epoll\" (--io, COURIER_IO)"
            ),
        },
    }
}

/// Asks the kernel for a small ring and closes it. A kernel without
/// io_uring answers ENOSYS; a seccomp profile that blocks it (recent
/// container runtimes' defaults do) or `kernel.io_uring_disabled` answers
/// EPERM.
pub fn probe_uring() -> Result<(), String> {
    // SAFETY: io_uring_setup only writes the params struct we own; the fd
    // it returns is closed here and never used.
    let fd = unsafe {
        let mut params = [0u8; 120]; // struct io_uring_params
        libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr())
    };
    if fd >= 0 {
        // SAFETY: a descriptor we own.
        unsafe { libc::close(fd as i32) };
        return Ok(());
    }
    let err = io::Error::last_os_error();
    Err(match err.raw_os_error() {
        Some(libc::ENOSYS) => "this kernel has no io_uring (ENOSYS)".to_owned(),
        Some(libc::EPERM) => match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
            Ok(v) if v.trim() != "0" => {
                format!("disabled by sysctl kernel.io_uring_disabled = {}", v.trim())
            }
            _ => "blocked by a seccomp profile or policy (EPERM); \
                  containers need a profile that allows io_uring_setup"
                .to_owned(),
        },
        _ => format!("io_uring_setup failed: {err}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoll_needs_no_probe() {
        assert_eq!(choose(IoMode::Epoll).unwrap(), (IoPath::Epoll, None));
    }

    #[test]
    fn auto_and_forced_uring_agree_with_the_probe() {
        match probe_uring() {
            Ok(()) => {
                assert_eq!(choose(IoMode::Auto).unwrap(), (IoPath::Uring, None));
                assert_eq!(choose(IoMode::Uring).unwrap(), (IoPath::Uring, None));
            }
            Err(why) => {
                assert_eq!(choose(IoMode::Auto).unwrap(), (IoPath::Epoll, Some(why)));
                let e = choose(IoMode::Uring).unwrap_err().to_string();
                assert!(e.contains("io_uring is unavailable"), "{e}");
            }
        }
    }
}
