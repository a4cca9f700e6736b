//! Logging in to a balancer that runs with `--users`: `login` is the first
//! message on every connection the client opens.

use super::{Config, Error};
use crate::net::Stream;
use crate::proto::{self, Login, Password, Reply};
use std::fmt;
use std::io::{self, BufRead, IsTerminal};

/// The environment variable a password may come from (for scripts).
pub const PASSWORD_VAR: &str = "FTP_PASSWORD";

/// A user name and password. `Debug` never prints the password.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// The password from `FTP_PASSWORD`; else, when standard input is not
    /// a terminal (`echo "$PW" | client --user alice ...`), its first
    /// line; else asked for without echo on the terminal.
    pub fn for_user(user: String) -> io::Result<Credentials> {
        let password = match std::env::var(PASSWORD_VAR) {
            Ok(p) => p,
            Err(_) if !io::stdin().is_terminal() => first_line(&mut io::stdin().lock())?,
            Err(_) => rpassword::prompt_password(format!("password for {user}: "))?,
        };
        Ok(Credentials { user, password })
    }
}

/// The first line of `input`, without its line end. The rest stays
/// unread (commands, at the interactive prompt).
fn first_line(input: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    if input.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "standard input is empty, and it is not a terminal to ask on: \
             give the password as its first line",
        ));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Connects to the balancer and, with credentials, logs in.
pub fn open(config: &Config) -> Result<Stream, Error> {
    let addr = config.balancer;
    let stream = crate::net::connect(&addr, config.connect_timeout, config.reply_timeout)
        .map_err(|e| Error::Connect(addr, e))?;
    if let Some(credentials) = &config.login {
        login(&stream, credentials).map_err(|e| {
            Error::Io(io::Error::other(format!(
                "the balancer at {addr} refused the login as {}: {e}",
                credentials.user
            )))
        })?;
    }
    Ok(stream)
}

/// Sends `login` and waits for `welcome`. Nothing else is in flight, so
/// the reader reads no further than the one reply.
pub(crate) fn login(stream: &Stream, credentials: &Credentials) -> Result<(), String> {
    let mut conn = proto::Connection::new(stream.clone(), proto::DEFAULT_MAX_FRAME);
    let request = Login {
        id: 0,
        user: credentials.user.clone(),
        password: Password(credentials.password.clone()),
    };
    match conn.call(&request) {
        Ok(Reply::Welcome { .. }) => Ok(()),
        Ok(Reply::Error(e)) => Err(format!("{}: {}", e.code, e.message)),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_the_first_line_of_its_input() {
        let mut input = io::Cursor::new("pass word\r\nftp 3\n");
        assert_eq!(first_line(&mut input).unwrap(), "pass word");
        let mut rest = String::new();
        input.read_line(&mut rest).unwrap();
        assert_eq!(rest, "ftp 3\n");
        let empty = first_line(&mut io::Cursor::new("")).unwrap_err();
        assert_eq!(empty.kind(), io::ErrorKind::UnexpectedEof);
    }
}
