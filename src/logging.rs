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
fn format(record: &Record<'_>) -> String {
    use std::fmt::Write as _;
    let message = record.args().to_string();
    let mut line = String::with_capacity(message.len() + 64);
    let _ = write!(
        line,
        "[{} {:<5} {}] ",
        crate::text::rfc3339(SystemTime::now()),
        record.level(),
        record.target()
    );
    for c in message.chars() {
        if c.is_control() {
            line.extend(c.escape_default());
        } else {
            line.push(c);
        }
    }
    line.push('\n');
    line
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
