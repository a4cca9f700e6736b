//! The logger the binaries install: every record at `info` and above is
//! appended to a log file with a timestamp, and also printed on stderr at
//! the level `RUST_LOG` asks for (default `info`).

use log::{LevelFilter, Log, Metadata, Record};
use std::fs::OpenOptions;
use std::path::Path;

struct Tee {
    file: Option<env_logger::Logger>,
    stderr: env_logger::Logger,
}

impl Log for Tee {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.stderr.enabled(metadata) || self.file.as_ref().is_some_and(|f| f.enabled(metadata))
    }

    fn log(&self, record: &Record<'_>) {
        if let Some(file) = &self.file {
            if file.matches(record) {
                file.log(record);
            }
        }
        if self.stderr.matches(record) {
            self.stderr.log(record);
        }
    }

    fn flush(&self) {
        if let Some(file) = &self.file {
            file.flush();
        }
        self.stderr.flush();
    }
}

/// One line per record, `[time LEVEL target] message`, with the control
/// characters of the message escaped: peers choose titles and other text
/// that end up in messages, and a newline in one must not forge a line.
fn format(buf: &mut env_logger::fmt::Formatter, record: &Record<'_>) -> std::io::Result<()> {
    use std::io::Write;
    let message = record.args().to_string();
    let mut safe = String::with_capacity(message.len());
    for c in message.chars() {
        if c.is_control() {
            safe.extend(c.escape_default());
        } else {
            safe.push(c);
        }
    }
    let time = buf.timestamp_millis();
    writeln!(
        buf,
        "[{time} {:<5} {}] {safe}",
        record.level(),
        record.target()
    )
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
            Some(
                env_logger::Builder::new()
                    .parse_filters("info")
                    .format(format)
                    .target(env_logger::Target::Pipe(Box::new(handle)))
                    .build(),
            )
        }
        None => None,
    };
    let stderr =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
            .format(format)
            .build();
    let max = file
        .as_ref()
        .map_or(LevelFilter::Off, |f| f.filter())
        .max(stderr.filter());
    log::set_boxed_logger(Box::new(Tee { file, stderr }))
        .map_err(|e| crate::Error::Config(format!("logger already installed: {e}")))?;
    log::set_max_level(max);
    Ok(())
}
