//! The logger the binaries install: every record at `info` and above is
//! appended to a log file with a timestamp, and also printed on stderr at
//! the level `RUST_LOG` asks for (default `info`).

use log::{LevelFilter, Log, Metadata, Record};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

struct Tee {
    /// The file's filter (always `info`) and the file, opened to append.
    /// No lock: each line is one `write` on a file opened with `O_APPEND`,
    /// which the kernel keeps whole against other writers (a lock here was
    /// contended by every connection thread, one line per document).
    file: Option<(env_logger::Logger, File)>,
    /// `RUST_LOG`'s filter for stderr.
    stderr: env_logger::Logger,
}

impl Log for Tee {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.stderr.enabled(metadata)
            || self.file.as_ref().is_some_and(|(f, _)| f.enabled(metadata))
    }

    /// Formats the line once and writes it whole to each place that wants
    /// it (one write each, so lines of different threads never mix).
    fn log(&self, record: &Record<'_>) {
        let to_file = self.file.as_ref().filter(|(f, _)| f.matches(record));
        let to_stderr = self.stderr.matches(record);
        if to_file.is_none() && !to_stderr {
            return;
        }
        let line = format(record);
        if let Some((_, file)) = to_file {
            let _ = (&*file).write_all(line.as_bytes());
        }
        if to_stderr {
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {
        if let Some((_, file)) = &self.file {
            let _ = (&*file).flush();
        }
        let _ = std::io::stderr().flush();
    }
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
            Some((
                env_logger::Builder::new().parse_filters("info").build(),
                handle,
            ))
        }
        None => None,
    };
    let stderr =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let max = file
        .as_ref()
        .map_or(LevelFilter::Off, |(f, _)| f.filter())
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
