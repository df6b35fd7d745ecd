//! A PostgreSQL 15 server this run owns, so a scenario can stop and start
//! it (the soak's database restarts). Runs as the `postgres` user when the
//! driver runs as root (Postgres refuses root).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{ensure, Context};

use crate::fixture::free_port;

/// Where Debian puts PostgreSQL 15 (override with `PG_BIN`).
fn pg_bin() -> String {
    std::env::var("PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// `program args…`, as `postgres` when we are root.
fn as_pg(program: &str, args: &[&str]) -> Command {
    let mut c = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        Command::new(program)
    };
    c.args(args).stdout(Stdio::null()).stdin(Stdio::null());
    c
}

/// A throwaway server in a temporary directory, removed when dropped.
pub struct LocalPg {
    dir: PathBuf,
    pub port: u16,
}

impl LocalPg {
    /// initdb and start on a free loopback port.
    pub fn start() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("tollgate-soak-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        if is_root() {
            let ok = Command::new("chown").arg("postgres").arg(&dir).status()?;
            ensure!(ok.success(), "chown postgres {}", dir.display());
        }
        let port = free_port()?.port();
        let pg = Self { dir, port };
        let ok = as_pg(
            &format!("{}/initdb", pg_bin()),
            &[
                "-D",
                &pg.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        )
        .status()
        .context("running initdb (PostgreSQL 15; set PG_BIN)")?;
        ensure!(ok.success(), "initdb failed");
        pg.up()?;
        Ok(pg)
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// The admin URL (database `postgres`).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    pub fn up(&self) -> anyhow::Result<()> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log").display().to_string();
        let ok = as_pg(
            &format!("{}/pg_ctl", pg_bin()),
            &["-D", &self.data(), "-l", &log, "-w", "-o", &opts, "start"],
        )
        .status()?;
        ensure!(ok.success(), "pg_ctl start failed (see {log})");
        Ok(())
    }

    /// Stops the server the way a restart or failover does: every session
    /// is terminated (`-m fast`).
    pub fn down(&self) -> anyhow::Result<()> {
        let ok = as_pg(
            &format!("{}/pg_ctl", pg_bin()),
            &["-D", &self.data(), "-m", "fast", "-w", "stop"],
        )
        .status()?;
        ensure!(ok.success(), "pg_ctl stop failed");
        Ok(())
    }
}

impl Drop for LocalPg {
    fn drop(&mut self) {
        let _ = as_pg(
            &format!("{}/pg_ctl", pg_bin()),
            &["-D", &self.data(), "-m", "immediate", "stop"],
        )
        .stderr(Stdio::null())
        .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
