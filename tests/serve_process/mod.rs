//! Shared by the integration tests: `actwatch serve`, the real binary, as a child process.

// Each test file that includes this module uses a part of it.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use actwatch_testkit::server::Client;

/// `actwatch serve`, the real binary, on a free loopback port.
pub struct ServeProcess {
    pub child: std::process::Child,
    pub addr: String,
}

impl ServeProcess {
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[], None).await
    }

    /// Starts the binary with more arguments, under an address-space limit (`ulimit -v`, in
    /// bytes) when one is given.
    pub async fn start_with(dir: &Path, args: &[&str], address_space: Option<u64>) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut command = match address_space {
            None => std::process::Command::new(env!("CARGO_BIN_EXE_actwatch")),
            Some(bytes) => {
                // exec: the child's pid is the server's
                let mut sh = std::process::Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -v {} && exec \"$0\" \"$@\"", bytes >> 10))
                    .arg(env!("CARGO_BIN_EXE_actwatch"));
                sh
            }
        };
        let child = command
            .args(["serve", "--data-dir"])
            .arg(dir)
            .args(["--listen", &addr, "--metrics-listen", "off"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                return Self { child, addr };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        panic!("actwatch serve did not listen on {addr}");
    }

    pub async fn client(&self) -> Client {
        actwatch_proto::v1::activation_monitor_client::ActivationMonitorClient::connect(format!(
            "http://{}",
            self.addr
        ))
        .await
        .unwrap()
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20)
    }

    pub fn sigterm(&self) {
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Waits for the process to exit and returns whether it exited cleanly.
    pub async fn exit_ok(mut self) -> bool {
        for _ in 0..1200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("actwatch serve did not exit within 60 s of SIGTERM");
    }
}

impl Drop for ServeProcess {
    /// A failing test never leaves a server running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
