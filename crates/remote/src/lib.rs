//! pagesnap stores on S3-compatible object storage.
//!
//! `pagesnap --store s3://BUCKET/PREFIX …` keeps a store in a bucket instead of a directory. The
//! store itself (`pagesnap-store`) is unchanged: it does its file operations through the
//! [`pagesnap_store::Storage`] seam, and [`ObjectStorage`] carries them out on an object store
//! (the `object_store` crate; its `aws` backend for S3 and its kin, its in-memory one in tests):
//!
//! - segment files become immutable *pieces* of up to 16 MiB, uploaded several at once while the
//!   snapshot goes on;
//! - the superblock and key file live inside one *head* object, with the map from segment bytes
//!   to pieces;
//! - every sync replaces the head by one conditional put: the commit point. A crash or kill at
//!   any moment leaves the old head or the new one, and of two writers, the later to commit gets
//!   an error and changes nothing;
//! - pieces no head names (an interrupted upload's) are garbage that `gc` deletes;
//! - small reads (commit records, page maps) go through a local block cache, so `list`, `diff`
//!   and incremental snapshots do not download pages twice; large reads (restore) are parallel
//!   ranged GETs.
//!
//! [`StoreUrl`] parses `s3://BUCKET/PREFIX` and opens it ([`StoreUrl::storage`]); tests open
//! [`ObjectStorage`] on object_store's in-memory backend directly.
//! `docs/format.md` ("Stores on object storage") has the layout and the argument.

#![forbid(unsafe_code)]

mod head;
mod objects;
mod url;

pub use objects::{ObjectStorage, TrafficReport, BLOCK, MAX_IN_FLIGHT, PIECE};
pub use url::{default_cache_root, StoreUrl, UrlError};
