//! The interactive prompt: `ftp` and `calc` batches typed one after
//! another, a count asked for when not given.

use super::documents::{folder, list_documents};
use super::{calc, ftp, Config, Error};
use std::io::{self, BufRead, Write};

const HELP: &str = "commands:
  FTP [N]    send N documents picked at random from the documents folder
  CALC [N]   send N compute requests with random operations
  help       show this help
  exit       quit (end of input, Ctrl-D, quits too)
commands are case-insensitive; without N you are asked for it, and there an
empty line goes back, and exit or another command is taken as typed";

/// The words the prompt takes as commands.
const COMMANDS: [&str; 6] = ["ftp", "calc", "help", "?", "exit", "quit"];

/// What the user answered when asked for a count.
#[derive(Debug, PartialEq)]
enum CountAnswer {
    Count(u64),
    /// An empty line: back to the prompt.
    Cancel,
    /// A command instead of a count (`exit`, `ftp 3`...): to be run as if
    /// typed at the prompt.
    Command(String),
    EndOfInput,
}

/// Asks for a count until one is typed, or something else that answers:
/// an empty line, another command, the end of input. `given` is what was
/// typed after the command, if anything.
fn ask_count(
    input: &mut impl BufRead,
    out: &mut impl Write,
    question: &str,
    mut given: Option<String>,
) -> io::Result<CountAnswer> {
    loop {
        let answer = match given.take() {
            Some(answer) => answer,
            None => match prompt(input, out, question)? {
                Some(answer) => answer,
                None => return Ok(CountAnswer::EndOfInput),
            },
        };
        if answer.is_empty() {
            return Ok(CountAnswer::Cancel);
        }
        let first = answer.split_whitespace().next().unwrap_or("");
        if COMMANDS.contains(&first.to_ascii_lowercase().as_str()) {
            return Ok(CountAnswer::Command(answer));
        }
        match crate::cli::parse_count(&answer) {
            Ok(n) => return Ok(CountAnswer::Count(n)),
            Err(e) => writeln!(
                out,
                "{e} (an empty line goes back to the prompt; exit quits)"
            )?,
        }
    }
}

/// The interactive prompt. Returns whether every batch sent was stored.
pub fn interactive(
    config: &Config,
    input: &mut impl BufRead,
    out: &mut impl Write,
) -> Result<bool, Error> {
    show_documents(config, out)?;
    writeln!(out, "{HELP}")?;
    let mut all_ok = true;
    // A command typed where a count was asked for runs next.
    let mut typed: Option<String> = None;
    loop {
        let line = match typed.take() {
            Some(line) => line,
            None => match prompt(input, out, "command> ")? {
                Some(line) => line,
                None => break,
            },
        };
        let line = line.to_ascii_lowercase();
        let mut words = line.split_whitespace();
        let command = words.next().unwrap_or("");
        let given = words.next().map(str::to_string);
        if words.next().is_some() {
            writeln!(out, "too many words in `{line}`\n{HELP}")?;
            continue;
        }
        match command {
            "" => {}
            "exit" | "quit" => break,
            "help" | "?" => writeln!(out, "{HELP}")?,
            "ftp" | "calc" => {
                let question = if command == "ftp" {
                    "how many documents? "
                } else {
                    "how many requests? "
                };
                let n = match ask_count(input, out, question, given)? {
                    CountAnswer::Count(n) => n,
                    CountAnswer::Cancel => continue,
                    CountAnswer::Command(line) => {
                        typed = Some(line);
                        continue;
                    }
                    CountAnswer::EndOfInput => break,
                };
                all_ok &= run_batch(config, command, n, out)?;
            }
            other => writeln!(out, "unknown command `{other}`\n{HELP}")?,
        }
    }
    writeln!(out, "bye")?;
    Ok(all_ok)
}

/// Lists the documents folder.
fn show_documents(config: &Config, out: &mut impl Write) -> Result<(), Error> {
    let files = list_documents(&config.documents)?;
    writeln!(out, "documents available in {}", folder(&config.documents))?;
    for f in &files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        writeln!(out, "  {name}")?;
    }
    Ok(())
}

/// Runs one `ftp` or `calc` batch of `n`; whether all of it went well.
/// Its error is said and the prompt goes on, unless the user interrupted
/// or the output is gone.
fn run_batch(config: &Config, command: &str, n: u64, out: &mut impl Write) -> Result<bool, Error> {
    let result = if command == "ftp" {
        ftp(config, n, out)
    } else {
        calc(config, n, out)
    };
    match result {
        Ok(ok) => Ok(ok),
        Err(Error::Interrupted) => Err(Error::Interrupted),
        Err(Error::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => Err(Error::Io(e)),
        Err(e) => {
            writeln!(out, "error: {e}")?;
            Ok(false)
        }
    }
}

/// Prints a prompt and reads one trimmed line; `None` at end of input.
fn prompt(
    input: &mut impl BufRead,
    out: &mut impl Write,
    text: &str,
) -> io::Result<Option<String>> {
    write!(out, "{text}")?;
    out.flush()?;
    let mut line = String::new();
    if input.read_line(&mut line)? == 0 {
        writeln!(out)?;
        return Ok(None);
    }
    Ok(Some(line.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_handles_unknown_commands_and_eof() {
        let (ok, text) = run_prompt(b"HeLp\nfoo\nftp\nzero\n0\n\nftp 0\n");
        assert!(ok);
        assert!(text.contains("documents available in "), "{text}");
        assert!(text.contains("a.json"));
        assert!(text.contains("unknown command `foo`"));
        // An invalid count asks again; an empty line goes back.
        assert!(text.contains("`zero` is not a count"), "{text}");
        assert!(text.contains("a count must be at least 1"), "{text}");
        assert_eq!(text.matches("how many documents? ").count(), 4, "{text}");
        assert!(text.trim_end().ends_with("bye"));
    }

    /// What the prompt printed for `input`, with a documents folder.
    fn prompt_output(input: &[u8]) -> String {
        run_prompt(input).1
    }

    /// Runs the prompt on `input` with a documents folder of one
    /// document: whether all went well, and what it printed.
    fn run_prompt(input: &[u8]) -> (bool, String) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.json"),
            r#"{"titolo":"t","contenuto":"c"}"#,
        )
        .unwrap();
        let config = Config {
            documents: dir.path().to_path_buf(),
            ..Config::default()
        };
        let mut out = Vec::new();
        let ok = interactive(&config, &mut &input[..], &mut out).unwrap();
        (ok, String::from_utf8(out).unwrap())
    }

    #[test]
    fn a_question_for_a_count_always_lets_the_user_out() {
        // `exit` quits.
        let text = prompt_output(b"FTP abc\nexit\nftp 1\n");
        assert_eq!(text.matches("how many documents? ").count(), 1, "{text}");
        assert!(text.trim_end().ends_with("bye"), "{text}");
        assert!(!text.contains("sending"), "{text}");
        // The end of input (Ctrl-D) quits.
        let text = prompt_output(b"FTP abc\n");
        assert!(text.trim_end().ends_with("bye"), "{text}");
        // Another command is taken as typed: `ftp 0` says why not and
        // asks for its own count; `help` answers and goes back.
        let text = prompt_output(b"FTP abc\nftp 0\nquit\n");
        assert!(text.contains("a count must be at least 1"), "{text}");
        assert_eq!(text.matches("how many documents? ").count(), 2, "{text}");
        let text = prompt_output(b"calc x\nHELP\nexit\n");
        assert_eq!(text.matches("how many requests? ").count(), 1, "{text}");
        assert_eq!(text.matches("commands:").count(), 2, "{text}");
    }

    #[test]
    fn count_answers() {
        let ask = |typed: &str| {
            let mut out = Vec::new();
            ask_count(&mut typed.as_bytes(), &mut out, "n? ", None).unwrap()
        };
        assert_eq!(ask("3\n"), CountAnswer::Count(3));
        assert_eq!(ask("\n"), CountAnswer::Cancel);
        assert_eq!(ask(""), CountAnswer::EndOfInput);
        assert_eq!(ask("x\nExit\n"), CountAnswer::Command("Exit".into()));
        assert_eq!(ask("CALC 2\n"), CountAnswer::Command("CALC 2".into()));
        assert_eq!(ask("0\n\n"), CountAnswer::Cancel);
    }
}
