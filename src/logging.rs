//! The logger the binaries install: every record at `info` and above is
//! appended to a log file with a timestamp, and also printed on stderr at
//! the level `RUST_LOG` asks for (default `info`).

use log::{LevelFilter, Log, Metadata, Record};
use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;
use std::time::SystemTime;

/// The log file, opened to append. No lock: each line (or each held set
/// of lines, `hold`) is one `write` on a file opened with `O_APPEND`,
/// which the kernel keeps whole against other writers (a lock here was
/// contended by every connection thread, one line per document).
static FILE: OnceLock<File> = OnceLock::new();

struct Tee {
    /// The file's filter (always `info`), when there is a file (`FILE`).
    file: Option<env_logger::Logger>,
    /// `RUST_LOG`'s filter for stderr.
    stderr: env_logger::Logger,
}

impl Log for Tee {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.stderr.enabled(metadata) || self.file.as_ref().is_some_and(|f| f.enabled(metadata))
    }

    /// Formats the line once and writes it whole to each place that wants
    /// it (one write each, so lines of different threads never mix).
    fn log(&self, record: &Record<'_>) {
        let to_file = self
            .file
            .as_ref()
            .filter(|f| f.matches(record))
            .and(FILE.get());
        let to_stderr = self.stderr.matches(record);
        if to_file.is_none() && !to_stderr {
            return;
        }
        let line = format(record);
        if let Some(file) = to_file {
            if !held(&line) {
                let _ = (&*file).write_all(line.as_bytes());
            }
        }
        if to_stderr {
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {
        if let Some(file) = FILE.get() {
            let _ = (&*file).flush();
        }
        let _ = std::io::stderr().flush();
    }
}

thread_local! {
    /// Lines for the file this thread holds back (`hold`), if it does.
    static HELD: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Keeps `line` for the end of this thread's `hold`; false when the
/// thread holds nothing back.
fn held(line: &str) -> bool {
    HELD.with(|held| match held.borrow_mut().as_mut() {
        Some(lines) => {
            lines.push_str(line);
            true
        }
        None => false,
    })
}

/// Runs `f` with the lines this thread logs to the file held back, then
/// writes them in one `write` (whole lines, in order; other threads' lines
/// may come before or after them, never inside). For a thread that logs
/// several lines per wake-up (a link reading many answers): one write
/// instead of one per line. Whatever `f` sends after logging must wait for
/// the end of the hold, or it may be seen before its line.
pub fn hold<T>(f: impl FnOnce() -> T) -> T {
    struct Release;
    impl Drop for Release {
        fn drop(&mut self) {
            let lines = HELD.with(|held| held.borrow_mut().take());
            if let (Some(lines), Some(file)) = (lines, FILE.get()) {
                if !lines.is_empty() {
                    let _ = (&*file).write_all(lines.as_bytes());
                }
            }
        }
    }
    let nested = HELD.with(|held| {
        let mut held = held.borrow_mut();
        let nested = held.is_some();
        held.get_or_insert_with(String::new);
        nested
    });
    if nested {
        return f();
    }
    let _release = Release;
    f()
}

/// One line per record, `[time LEVEL target] message`, with the control
/// characters of the message escaped: peers choose titles and other text
/// that end up in messages, and a newline in one must not forge a line.
/// The message is formatted straight into the line (a line is written for
/// every document, so allocations here count).
fn format(record: &Record<'_>) -> String {
    use std::fmt::Write as _;
    let mut line = String::with_capacity(160);
    line.push('[');
    crate::text::write_rfc3339(&mut line, SystemTime::now());
    let _ = write!(line, " {:<5} {}] ", record.level(), record.target());
    let _ = Escaped(&mut line).write_fmt(*record.args());
    line.push('\n');
    line
}

/// Appends text with its control characters escaped (`\n`, `\u{1b}`).
struct Escaped<'a>(&'a mut String);

impl std::fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if !s.chars().any(char::is_control) {
            self.0.push_str(s);
            return Ok(());
        }
        for c in s.chars() {
            if c.is_control() {
                self.0.extend(c.escape_default());
            } else {
                self.0.push(c);
            }
        }
        Ok(())
    }
}

/// Installs the logger. With `log_file`, records are appended to it.
pub fn init(log_file: Option<&Path>) -> Result<(), crate::Error> {
    let file = match log_file {
        Some(path) => {
            let handle = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| crate::Error::Log {
                    path: path.to_path_buf(),
                    source,
                })?;
            FILE.set(handle)
                .map_err(|_| crate::Error::Config("logger already installed".into()))?;
            Some(env_logger::Builder::new().parse_filters("info").build())
        }
        None => None,
    };
    let stderr =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let max = file
        .as_ref()
        .map_or(LevelFilter::Off, |f| f.filter())
        .max(stderr.filter());
    log::set_boxed_logger(Box::new(Tee { file, stderr }))
        .map_err(|e| crate::Error::Config(format!("logger already installed: {e}")))?;
    log::set_max_level(max);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_has_time_level_target_and_the_message_with_controls_escaped() {
        let title = "evil\n[2026-01-01T00:00:00.000Z INFO  forged] \u{1b}[31m\u{85}";
        let line = format(
            &Record::builder()
                .level(log::Level::Info)
                .target("lbft::balancer")
                .args(format_args!("stored \"{title}\" ({} bytes)", 12))
                .build(),
        );
        let (time, rest) = line
            .strip_prefix('[')
            .and_then(|l| l.split_once(' '))
            .expect("a line starts with [time");
        assert_eq!(time.len(), "2026-11-25T21:37:33.123Z".len(), "{line}");
        assert!(time.ends_with('Z') && time.as_bytes()[10] == b'T', "{line}");
        assert_eq!(
            rest,
            "INFO  lbft::balancer] stored \"evil\\n[2026-01-01T00:00:00.000Z INFO  forged] \
             \\u{1b}[31m\\u{85}\" (12 bytes)\n"
        );
        assert_eq!(line.matches('\n').count(), 1);
    }
}
