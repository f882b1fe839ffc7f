//! `pagesnap key list|add|remove|passwd`, and the Argon2id parameters new key slots get.

use crate::cli::KeyCommand;
use crate::commands::{Ctx, OK};
use anyhow::{bail, Context, Result};
use pagesnap_store::keys::{KdfParams, PasswordRole};
use pagesnap_store::Mode;
use serde_json::json;

/// The variable that makes new key slots cheap (tests): `fast`. Insecure — a password of such a
/// slot is guessed thousands of times faster — so pagesnap says so on stderr every time.
pub const TEST_KDF_ENV: &str = "PAGESNAP_TEST_KDF";

/// Argon2id parameters for a new key slot: tuned to about half a second on this machine, or the
/// tests' parameters if `PAGESNAP_TEST_KDF=fast`.
pub fn kdf() -> Result<KdfParams> {
    if std::env::var_os(TEST_KDF_ENV).is_some_and(|v| v == "fast") {
        eprintln!(
            "pagesnap: warning: {TEST_KDF_ENV}=fast: the new key slot uses Argon2id with 64 KiB \
             and 1 pass, for tests only — its password is easy to guess offline"
        );
        return Ok(KdfParams::FOR_TESTS);
    }
    Ok(KdfParams::tune(std::time::Duration::from_millis(500))
        .context("tuning Argon2id")?
        .params)
}

/// `user@host`, the default label of a key slot.
pub fn default_label() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "user".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let label: String = format!("{user}@{host}")
        .chars()
        .filter(|c| !c.is_control())
        .take(255)
        .collect();
    label
}

pub fn key(ctx: &Ctx, cmd: KeyCommand) -> Result<i32> {
    if ctx.encryption()?.is_none() {
        bail!(
            "{} is not encrypted: it has no passwords (an encrypted store is created with \
             `pagesnap init --encrypt`)",
            ctx.at()?.display()
        );
    }
    match cmd {
        KeyCommand::List { json } => {
            let store = ctx.open(Mode::Read)?;
            let slots = store.key_slots()?;
            let mine = store.unlocked_slot();
            if json {
                let v: Vec<_> = slots
                    .iter()
                    .map(|s| {
                        json!({
                            "id": s.id,
                            "label": s.label,
                            "created_unix_ms": s.created_unix_ms,
                            "argon2id": {"m_kib": s.kdf.m_kib, "t": s.kdf.t, "p": s.kdf.p},
                            "current": Some(s.id) == mine,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!("  ID  ADDED (UTC)           ARGON2ID                 LABEL");
                for s in &slots {
                    println!(
                        "{} {:>3}  {:<20}  {:<23}  {}",
                        if Some(s.id) == mine { "*" } else { " " },
                        s.id,
                        crate::commands::utc(s.created_unix_ms),
                        s.kdf.to_string(),
                        s.label
                    );
                }
                println!("(* the slot the password given opens)");
            }
            Ok(OK)
        }
        KeyCommand::Add {
            label,
            new_password_file,
        } => {
            let mut store = ctx.open(Mode::Write)?;
            let new = crate::password::password(PasswordRole::New, new_password_file.as_deref())?;
            let kdf = kdf()?;
            let label = label.unwrap_or_else(default_label);
            let id = store.add_key(&new, kdf, &label)?;
            println!("added key slot {id} ({label}, {kdf})");
            Ok(OK)
        }
        KeyCommand::Remove { id } => {
            let mut store = ctx.open(Mode::Write)?;
            store.remove_key(id)?;
            println!("removed key slot {id}");
            Ok(OK)
        }
        KeyCommand::Passwd { new_password_file } => {
            let mut store = ctx.open(Mode::Write)?;
            let old = store.unlocked_slot().unwrap_or(0);
            let new = crate::password::password(PasswordRole::New, new_password_file.as_deref())?;
            let kdf = kdf()?;
            let id = store.change_password(&new, kdf)?;
            println!("changed the password: key slot {old} replaced by slot {id} ({kdf})");
            Ok(OK)
        }
    }
}
