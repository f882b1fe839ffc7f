//! What the crash and corruption campaigns share: a campaign runs on a plaintext or, in its own
//! test thread, an encrypted store.

use pagesnap_store::fault::FaultyStorage;
use pagesnap_store::{Mode, Store, StoreOptions};
use std::sync::Arc;

thread_local! {
    /// This test thread's campaign runs on an encrypted store (each test has its own thread).
    pub static ENCRYPTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn password() -> pagesnap_store::keys::Password {
    pagesnap_store::keys::Password::from("campaign")
}

/// A new store on `io`: encrypted when this thread's campaign is.
pub fn init_store(
    io: Arc<FaultyStorage>,
    opts: StoreOptions,
) -> Result<Store, pagesnap_store::StoreError> {
    if ENCRYPTED.with(|e| e.get()) {
        Store::init_encrypted_with(
            io,
            opts,
            &password(),
            pagesnap_store::keys::KdfParams::FOR_TESTS,
            "campaign",
        )
    } else {
        Store::init_with(io, opts)
    }
}

/// Opens the store on `io` (with its password when encrypted).
pub fn open_store(
    io: Arc<FaultyStorage>,
    mode: Mode,
    opts: StoreOptions,
) -> Result<(Store, pagesnap_store::OpenReport), pagesnap_store::StoreError> {
    let pw = ENCRYPTED.with(|e| e.get()).then(password);
    Store::open_with_key(io, mode, opts, pw.as_ref())
}
