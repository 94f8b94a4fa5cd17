//! Every external process a test runs has a time limit: a tool that hangs fails its test with
//! a clear message instead of hanging the suite.

use std::io::Read;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The limit for ordinary tools (qemu-img, ip, nft, the CLI): generous for a loaded machine.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// `Command::output` and `Command::status` with a time limit. On expiry the process is
/// killed and the test panics, naming the command and what it printed so far.
pub trait RunWithin {
    fn output_within(&mut self, limit: Duration) -> std::io::Result<Output>;
    fn status_within(&mut self, limit: Duration) -> std::io::Result<ExitStatus>;
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Reads a pipe to its end on a thread of its own (so a full pipe never blocks the child).
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

fn wait_within(
    cmd: &Command,
    child: &mut std::process::Child,
    limit: Duration,
) -> std::io::Result<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{}` did not finish within {limit:?}", describe(cmd));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl RunWithin for Command {
    fn output_within(&mut self, limit: Duration) -> std::io::Result<Output> {
        let mut child = self
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
        let status = wait_within(self, &mut child, limit)?;
        Ok(Output {
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        })
    }

    fn status_within(&mut self, limit: Duration) -> std::io::Result<ExitStatus> {
        let mut child = self.spawn()?;
        wait_within(self, &mut child, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_status_of_a_quick_command() {
        let out = Command::new("sh")
            .args(["-c", "echo out; echo err >&2; exit 3"])
            .output_within(TOOL_TIMEOUT)
            .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        let st = Command::new("true").status_within(TOOL_TIMEOUT).unwrap();
        assert!(st.success());
    }

    #[test]
    #[should_panic(expected = "did not finish within")]
    fn a_hanging_command_fails_the_test() {
        let _ = Command::new("sleep")
            .arg("30")
            .output_within(Duration::from_millis(200));
    }
}
