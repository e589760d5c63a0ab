//! The server under test as a process: one the generator started (which it
//! can kill with SIGKILL and start again, for `--chaos-kill`), or one it
//! only knows by pid (to sample its memory).

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;

pub struct ServerProcess {
    /// Program and arguments, when this generator starts it.
    command: Option<Vec<String>>,
    /// Where it listens (ready once a connection is accepted).
    addr: String,
    child: Mutex<Option<Child>>,
    pid: Mutex<u32>,
}

impl ServerProcess {
    /// Starts `command` (program then arguments) and waits until it
    /// accepts connections on `addr`.
    pub fn start(command: Vec<String>, addr: &str) -> anyhow::Result<ServerProcess> {
        anyhow::ensure!(!command.is_empty(), "an empty server command");
        let s = ServerProcess {
            command: Some(command),
            addr: addr.to_string(),
            child: Mutex::new(None),
            pid: Mutex::new(0),
        };
        s.spawn()?;
        Ok(s)
    }

    /// A server started by someone else: only its memory can be sampled.
    pub fn existing(pid: u32, addr: &str) -> ServerProcess {
        ServerProcess {
            command: None,
            addr: addr.to_string(),
            child: Mutex::new(None),
            pid: Mutex::new(pid),
        }
    }

    pub fn can_restart(&self) -> bool {
        self.command.is_some()
    }

    pub fn pid(&self) -> u32 {
        *self.pid.lock().expect("pid")
    }

    fn spawn(&self) -> anyhow::Result<()> {
        let command = self.command.as_ref().expect("started servers only");
        let child = Command::new(&command[0])
            .args(&command[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", command[0]))?;
        *self.pid.lock().expect("pid") = child.id();
        *self.child.lock().expect("child") = Some(child);
        self.wait_ready(Duration::from_secs(60))
    }

    fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if TcpStream::connect(&self.addr).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.lock().expect("child").as_mut() {
                if let Some(status) = child.try_wait()? {
                    anyhow::bail!("the server exited while starting: {status}");
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the server did not listen on {} within {limit:?}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (no chance to flush anything), then start it again.
    pub fn kill_and_restart(&self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// SIGKILL, and reap it.
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().expect("child").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Resident memory, in bytes (Linux).
    pub fn rss_bytes(&self) -> Option<u64> {
        rss_bytes(self.pid())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Resident memory of process `pid`, in bytes, from `/proc/PID/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_has_a_resident_size() {
        let rss = super::rss_bytes(std::process::id()).unwrap();
        assert!(rss > 100_000, "{rss}");
    }
}
