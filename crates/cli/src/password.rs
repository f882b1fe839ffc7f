//! Where the CLI's passwords come from (issue 17): the `--password-file` / `--new-password-file`
//! option, the `…_FILE` variable, the variable itself (`pagesnap_store::keys::password_from`),
//! else a prompt when standard input is a terminal, else [`StoreError::NoPassword`] (exit 2).
//!
//! Every command on an encrypted store asks for the current password through [`password`];
//! `init --encrypt`, `key add` and `key passwd` for a new one.

use pagesnap_store::keys::{self, Password, PasswordRole};
use pagesnap_store::StoreError;
use std::ffi::OsString;
use std::io::{self, IsTerminal};
use std::path::{Path, PathBuf};

/// The `role` password, from the first of: `file` (the command's option), the role's `…_FILE`
/// variable, the role's variable, a prompt on the terminal (a new password is asked twice).
pub fn password(role: PasswordRole, file: Option<&Path>) -> Result<Password, StoreError> {
    resolve(
        role,
        file,
        |name| std::env::var_os(name),
        io::stdin().is_terminal(),
        &mut Tty,
    )
}

/// Asks for a password without echoing it.
trait Ask {
    fn ask(&mut self, prompt: &str) -> io::Result<String>;
}

/// The controlling terminal (`rpassword` reads `/dev/tty` with echo off, prompts on it too).
struct Tty;

impl Ask for Tty {
    fn ask(&mut self, prompt: &str) -> io::Result<String> {
        rpassword::prompt_password(prompt)
    }
}

fn resolve(
    role: PasswordRole,
    file: Option<&Path>,
    env: impl Fn(&str) -> Option<OsString>,
    terminal: bool,
    tty: &mut dyn Ask,
) -> Result<Password, StoreError> {
    if let Some(password) = keys::password_from(role, file, env)? {
        return Ok(password);
    }
    if !terminal {
        return Err(StoreError::NoPassword { role });
    }
    let read = |tty: &mut dyn Ask, prompt: &str| {
        tty.ask(prompt)
            .map(Password::from)
            .map_err(|source| StoreError::Io {
                path: PathBuf::from("/dev/tty"),
                step: "read a password from the terminal",
                source,
            })
    };
    match role {
        PasswordRole::Current => read(tty, "password for the store: "),
        PasswordRole::New => {
            let first = read(tty, "new password: ")?;
            if first.is_empty() {
                return Err(StoreError::InvalidKeyInput(
                    "an empty password protects nothing; nothing was changed".into(),
                ));
            }
            let again = read(tty, "the new password again: ")?;
            if first.as_bytes() != again.as_bytes() {
                return Err(StoreError::InvalidKeyInput(
                    "the two new passwords typed differ; nothing was changed".into(),
                ));
            }
            Ok(first)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers prompts from a list, and records them.
    struct Typed(Vec<&'static str>, Vec<String>);

    impl Ask for Typed {
        fn ask(&mut self, prompt: &str) -> io::Result<String> {
            self.1.push(prompt.to_string());
            if self.0.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "no more input",
                ));
            }
            Ok(self.0.remove(0).to_string())
        }
    }

    fn no_env(_: &str) -> Option<OsString> {
        None
    }

    #[test]
    fn the_variable_wins_over_the_prompt() {
        let mut tty = Typed(vec!["typed"], Vec::new());
        let env = |n: &str| (n == "PAGESNAP_PASSWORD").then(|| OsString::from("from env"));
        let p = resolve(PasswordRole::Current, None, env, true, &mut tty).expect("password");
        assert_eq!(p.as_bytes(), b"from env");
        assert!(tty.1.is_empty(), "nothing asked");
    }

    #[test]
    fn a_terminal_is_asked_once_or_twice() {
        let mut tty = Typed(vec!["secret"], Vec::new());
        let p = resolve(PasswordRole::Current, None, no_env, true, &mut tty).expect("password");
        assert_eq!(p.as_bytes(), b"secret");
        assert_eq!(tty.1, vec!["password for the store: "]);

        let mut tty = Typed(vec!["new one", "new one"], Vec::new());
        let p = resolve(PasswordRole::New, None, no_env, true, &mut tty).expect("password");
        assert_eq!(p.as_bytes(), b"new one");
        assert_eq!(tty.1.len(), 2);

        let mut tty = Typed(vec!["new one", "new on"], Vec::new());
        let e = resolve(PasswordRole::New, None, no_env, true, &mut tty).expect_err("differ");
        assert!(e.to_string().contains("differ"), "{e}");
        assert!(!e.to_string().contains("new on"), "{e}");

        let mut tty = Typed(vec![""], Vec::new());
        let e = resolve(PasswordRole::New, None, no_env, true, &mut tty).expect_err("empty");
        assert!(matches!(e, StoreError::InvalidKeyInput(_)), "{e}");

        let mut tty = Typed(vec![], Vec::new());
        let e = resolve(PasswordRole::Current, None, no_env, true, &mut tty).expect_err("eof");
        assert!(matches!(e, StoreError::Io { .. }), "{e}");
    }

    #[test]
    fn no_password_and_no_terminal_is_a_typed_error() {
        for role in [PasswordRole::Current, PasswordRole::New] {
            let mut tty = Typed(vec!["never asked"], Vec::new());
            let e = resolve(role, None, no_env, false, &mut tty).expect_err("none");
            assert!(
                matches!(e, StoreError::NoPassword { role: r } if r == role),
                "{e}"
            );
            assert!(e.to_string().contains(role.env()), "{e}");
            assert!(tty.1.is_empty());
        }
    }

    #[test]
    fn the_file_option_wins_over_everything() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("new");
        std::fs::write(&file, "from file\n").expect("write");
        let env = |n: &str| (n == "PAGESNAP_NEW_PASSWORD").then(|| OsString::from("env"));
        let mut tty = Typed(vec![], Vec::new());
        let p = resolve(PasswordRole::New, Some(&file), env, true, &mut tty).expect("file");
        assert_eq!(p.as_bytes(), b"from file");
    }
}
