//! A throwaway PostgreSQL cluster: the store engine's test peer (one per
//! test binary, see `store.rs`), and a durable one for the benchmarks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use super::peers::{free_port_pair, require_binary, temp_dir};

/// A throwaway PostgreSQL cluster with scram-sha-256 auth: only passwords
/// log in. Stopped (immediate mode) and deleted on drop.
pub struct Postgres {
    pub port: u16,
    /// The `postgres` superuser's password.
    pub password: String,
    dir: PathBuf,
    pg_ctl: PathBuf,
    /// fsync on (benchmarks); tests run without it.
    durable: bool,
}

/// PostgreSQL refuses to run as root: run its tools as `postgres` then.
fn as_pg_user(bin: &Path) -> std::process::Command {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if root {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        std::process::Command::new(bin)
    }
}

fn run(mut cmd: std::process::Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Postgres {
    pub async fn start() -> Self {
        Self::start_blocking()
    }

    /// [`Postgres::start`] for callers outside a runtime (every step is a
    /// blocking command anyway).
    pub fn start_blocking() -> Self {
        Self::start_blocking_with(false)
    }

    /// A cluster that fsyncs its commits (`synchronous_commit = on`, the
    /// default), as production runs: for benchmarks.
    #[allow(dead_code)]
    pub fn start_durable() -> Self {
        Self::start_blocking_with(true)
    }

    fn start_blocking_with(durable: bool) -> Self {
        let initdb = require_binary("initdb");
        let pg_ctl = require_binary("pg_ctl");
        let dir = temp_dir("keygate-pg");
        let password = format!("pg-{}", uuid::Uuid::new_v4().simple());
        std::fs::write(dir.join("pwfile"), &password).unwrap();
        std::fs::create_dir_all(dir.join("sock")).unwrap();
        // runuser's `postgres` must own the cluster's folder.
        let _ = std::process::Command::new("chown")
            .args(["-R", "postgres"])
            .arg(&dir)
            .output();
        let mut init = as_pg_user(&initdb);
        init.arg("-D")
            .arg(dir.join("data"))
            .args(["-U", "postgres", "--auth=scram-sha-256", "--no-sync"])
            .arg(format!("--pwfile={}", dir.join("pwfile").display()));
        run(init, "initdb");
        let mut pg = Self {
            port: 0,
            password,
            dir,
            pg_ctl,
            durable,
        };
        // A free port can be taken between choosing it and PostgreSQL
        // binding it (other tests start peers, and open connections, at the
        // same time): choose again then, as `Bao::start` does.
        for _ in 0..4 {
            pg.port = free_port_pair();
            // The log is appended to: each try reads only its own.
            let _ = std::fs::remove_file(pg.dir.join("pg.log"));
            match pg.try_resume() {
                Ok(()) => return pg,
                Err(_) if pg.log().contains("Address already in use") => {
                    eprintln!("postgres: port {} was taken; choosing again", pg.port);
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("postgres could not bind a free port in four tries");
    }

    /// PostgreSQL's server log (empty if none yet).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pg.log")).unwrap_or_default()
    }

    /// Starts the (stopped) cluster again, on its port.
    pub fn resume(&self) {
        if let Err(e) = self.try_resume() {
            panic!("{e}");
        }
    }

    /// `pg_ctl start`; the error carries pg_ctl's output and the server log.
    fn try_resume(&self) -> Result<(), String> {
        let mut start = as_pg_user(&self.pg_ctl);
        start
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("pg.log"))
            .arg("-o")
            .arg(format!(
                // Every test broker of a binary shares the cluster, each with
                // a pool of 16 and its replica lock's connection: far more
                // than the default 100 clients.
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=500{}",
                self.port,
                self.dir.join("sock").display(),
                if self.durable { "" } else { " -c fsync=off" }
            ))
            .args(["-w", "start"]);
        let out = start.output().map_err(|e| format!("pg_ctl start: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "pg_ctl start failed: {}{}\nits server log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        ))
    }

    /// Stops the cluster at once (`immediate`: as a crash or a lost
    /// network would look to a client).
    pub fn halt(&self) {
        let mut stop = as_pg_user(&self.pg_ctl);
        stop.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"]);
        run(stop, "pg_ctl stop");
    }

    /// A cluster kept in a `static` is never dropped: this stops and
    /// deletes it once the current process has exited, whatever way.
    // The watchdog must outlive this process, so nobody here waits for it.
    #[allow(clippy::zombie_processes)]
    pub fn stop_when_process_exits(&self) {
        let stop = format!(
            "while [ -d /proc/{pid} ]; do sleep 1; done; {pg_ctl} -D {data} -m immediate -w stop; rm -rf {dir}",
            pid = std::process::id(),
            pg_ctl = self.pg_ctl.display(),
            data = self.dir.join("data").display(),
            dir = self.dir.display(),
        );
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let mut cmd = if root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--", "sh", "-c", &stop]);
            c
        } else {
            let mut c = std::process::Command::new("sh");
            c.args(["-c", &stop]);
            c
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning the cluster's watchdog");
    }

    /// A fresh database owned by `postgres`; its URL without the password.
    pub fn create_database(&self, name: &str) -> String {
        let psql = require_binary("psql");
        let out = std::process::Command::new(psql)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", "postgres", "-w", "-v", "ON_ERROR_STOP=1", "-c"])
            .arg(format!("CREATE DATABASE \"{name}\""))
            .env("PGPASSWORD", &self.password)
            .output()
            .expect("running psql");
        assert!(
            out.status.success(),
            "CREATE DATABASE {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Whether `user`/`password` can log in and run a query (via `psql`).
    pub async fn can_login(&self, user: &str, password: &str) -> bool {
        let psql = require_binary("psql");
        Command::new(psql)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", user])
            .args(["-d", "postgres", "-w", "-tAc", "select 1"])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut stop = as_pg_user(&self.pg_ctl);
        stop.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = stop.output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
