//! The decoders and the whole open/list/verify/read path on arbitrary and mutated bytes: errors,
//! never panics (the CI-sized version of the cargo-fuzz targets in `fuzz/`).

use pagesnap_store::fuzzing::{self, exercise, sample_store_files as valid_files};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn decoders_reject_arbitrary_bytes_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
        fuzzing::decode_record(&bytes);
        fuzzing::decode_node(&bytes);
        fuzzing::decode_superblock(&bytes);
        fuzzing::decode_manifest(&bytes);
        fuzzing::decode_chunk(&bytes);
        fuzzing::decode_commit(&bytes);
        fuzzing::decode_frame(&bytes);
    }

    #[test]
    fn a_store_of_mutated_files_opens_or_fails_cleanly(
        which in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
        truncate in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut files = valid_files();
        let i = which.index(files.len());
        let f = &mut files[i].1;
        for (at, x) in flips {
            if !f.is_empty() {
                let at = at.index(f.len());
                f[at] ^= x | 1;
            }
        }
        if let Some(t) = truncate {
            let len = f.len();
            f.truncate(t.index(len + 1));
        }
        exercise(&files);
    }

    #[test]
    fn a_store_of_arbitrary_files_fails_cleanly(sb in proptest::collection::vec(any::<u8>(), 0..9000), seg in proptest::collection::vec(any::<u8>(), 0..4000)) {
        let mut files = valid_files();
        for (name, bytes) in files.iter_mut() {
            if name == "superblock" { *bytes = sb.clone(); } else { *bytes = seg.clone(); }
        }
        exercise(&files);
    }
}
