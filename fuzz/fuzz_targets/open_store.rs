//! A valid store with the input applied as byte patches (file, offset, xor), then opened, listed,
//! verified and read: errors are fine, panics and unbounded allocations are not.
#![no_main]

use pagesnap_store::fuzzing::{exercise, sample_store_files};
use std::sync::OnceLock;

fn valid() -> &'static Vec<(String, Vec<u8>)> {
    static FILES: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    FILES.get_or_init(sample_store_files)
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut files = valid().clone();
    for patch in data.chunks_exact(4) {
        let f = usize::from(patch[0]) % files.len();
        let bytes = &mut files[f].1;
        if bytes.is_empty() {
            continue;
        }
        let at = usize::from(u16::from_le_bytes([patch[1], patch[2]])) * 7 % bytes.len();
        bytes[at] ^= patch[3];
    }
    exercise(&files);
});
