//! Every on-disk decoder on arbitrary bytes: records, index nodes, superblock slots, manifests,
//! page frames (decoded and decompressed).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = pagesnap_store::fuzzing::decode_record(data);
    let _ = pagesnap_store::fuzzing::decode_node(data);
    let _ = pagesnap_store::fuzzing::decode_superblock(data);
    let _ = pagesnap_store::fuzzing::decode_manifest(data);
    let _ = pagesnap_store::fuzzing::decode_chunk(data);
    let _ = pagesnap_store::fuzzing::decode_commit(data);
    let _ = pagesnap_store::fuzzing::decode_frame(data);
});
