//! Image names: which image a snapshot is of.
//!
//! A store holds snapshots of many images. Each snapshot belongs to an image *name*; the parent of
//! a new snapshot is the newest snapshot of the same name (so alternating images costs only what
//! changed in each), while dedup stays store-wide.
//!
//! The name travels in the snapshot's origin ([`pagesnap_store::SnapshotMeta::origin`]), the
//! free-form string in which the writer describes where the content came from, as a first line
//! `name <NAME>`; an image file's identity (`image v1 …`) follows on the next line. A snapshot
//! whose origin has no such line — every snapshot written before names, and a default-named
//! snapshot of an image file, whose origin stays exactly as before — is named by its origin:
//! the canonical path of an `image v1` identity (through [`implicit_name`]: a path that is no valid
//! name — over [`MAX_NAME`] bytes, or with a control character — names `path-<16 hex digits of its
//! BLAKE3 hash>`, as `snapshot` and `serve` name such an image by default), else [`DEFAULT_NAME`]. So the snapshots an older
//! pagesnap took of `/vm/a.img` carry on as the name `/vm/a.img`, which is the name a new
//! `pagesnap snapshot /vm/a.img` gives by default: their history continues. No format change: an
//! older binary lists, restores, verifies and deletes these snapshots as before (it only does not
//! know the names, so it diffs against the store's newest snapshot and does not skip an unchanged
//! image whose origin carries a name line).

use crate::image::{ImageError, Origin};
use pagesnap_store::{SnapshotId, SnapshotInfo};
use std::path::Path;

/// The name of snapshots whose origin says nothing of their image (a block device snapshotted
/// before names, a path too long to record before names, a snapshot of the engine's address
/// space).
pub const DEFAULT_NAME: &str = "default";
/// The longest image name, in bytes.
pub const MAX_NAME: usize = 512;

const NAME_LINE: &str = "name ";

/// Whether `name` may name an image: 1 to [`MAX_NAME`] bytes, no control characters (the name is
/// one line of the origin), not all digits (an argument of digits is a snapshot id).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an image name cannot be empty".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "the image name '{}…' is {} bytes long; at most {MAX_NAME} are allowed",
            name.chars().take(40).collect::<String>(),
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!(
            "the image name {name:?} holds a control character (a newline?); use printable characters"
        ));
    }
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "the image name '{name}' is all digits, which reads as a snapshot id; choose another"
        ));
    }
    Ok(())
}

/// Whether a new snapshot may take `label`: no `:` (an argument `NAME:X` is a name and a label, so
/// a label holding `:` could shadow another image's snapshot) and not `latest` (`NAME:latest` is
/// the newest snapshot of a name, so a label `latest` could never be reached as `NAME:LABEL`).
/// Labels written before this rule still resolve (see the CLI's snapshot arguments).
pub fn check_label(label: &str) -> Result<(), String> {
    if label.contains(':') {
        return Err(format!(
            "the label '{label}' holds ':', which separates an image name from a label in NAME:LABEL; use another character (e.g. '-')"
        ));
    }
    if label == "latest" {
        return Err(
            "the label 'latest' is reserved (NAME:latest is the newest snapshot of a name); choose another".into(),
        );
    }
    Ok(())
}

/// The image identity part of an origin (after its name line, if any).
pub(crate) fn identity(origin: &str) -> &str {
    match origin.strip_prefix(NAME_LINE) {
        Some(rest) => rest.split_once('\n').map_or("", |(_, id)| id),
        None => origin,
    }
}

/// The origin a snapshot named `name` records, given its image identity (if any): the identity
/// alone when it names the image by that very name (its canonical path), else a name line first.
pub(crate) fn origin_with_name(name: &str, identity: Option<String>) -> String {
    match identity {
        Some(id) if Origin::parse(&id).is_some_and(|o| o.path == name) => id,
        Some(id) => format!("{NAME_LINE}{name}\n{id}"),
        None => format!("{NAME_LINE}{name}"),
    }
}

/// The image name of a snapshot with this origin (see the module documentation).
pub fn name_of_origin(origin: Option<&str>) -> String {
    let Some(o) = origin else {
        return DEFAULT_NAME.to_string();
    };
    if let Some(rest) = o.strip_prefix(NAME_LINE) {
        let name = rest.split_once('\n').map_or(rest, |(n, _)| n);
        if check_name(name).is_ok() {
            return name.to_string();
        }
    }
    Origin::parse(o).map_or_else(
        || DEFAULT_NAME.to_string(),
        |id| implicit_name(id.path.as_bytes()),
    )
}

/// The implicit name of an image at this canonical path: the path itself when it is a valid name
/// ([`check_name`]), else `path-` and the first 16 hex digits of the BLAKE3 hash of the path's
/// bytes (a path over [`MAX_NAME`] bytes, one with a control character, or one that is not
/// UTF-8), so every image has a valid default name and snapshots without `--name` always work.
pub fn implicit_name(path: &[u8]) -> String {
    match std::str::from_utf8(path) {
        Ok(p) if check_name(p).is_ok() => p.to_string(),
        _ => format!("path-{}", &blake3::hash(path).to_hex()[..16]),
    }
}

/// The image name of a snapshot.
pub fn name_of(info: &SnapshotInfo) -> String {
    name_of_origin(info.origin.as_deref())
}

/// The newest snapshot of `name` among `snaps` (the store's list, in id order).
pub fn latest_of(snaps: &[SnapshotInfo], name: &str) -> Option<SnapshotId> {
    snaps
        .iter()
        .rev()
        .find(|s| name_of(s) == name)
        .map(|s| s.id)
}

/// The default name of the image at `path`: its canonical path; for a block device, its stable
/// name under `/dev/disk/by-id` when it has one (the first in byte order), else its canonical path
/// — each through [`implicit_name`], so a path that is no valid name gives `path-<hash>`.
pub fn default_name(path: &Path) -> Result<String, ImageError> {
    use std::os::unix::fs::FileTypeExt;
    let canonical =
        std::fs::canonicalize(path).map_err(crate::image::io_err(path, "resolve image path"))?;
    let is_block = std::fs::metadata(&canonical)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    if is_block {
        if let Ok(dir) = std::fs::read_dir("/dev/disk/by-id") {
            let mut links: Vec<_> = dir
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| std::fs::canonicalize(p).is_ok_and(|c| c == canonical))
                .filter_map(|p| p.to_str().map(str::to_string))
                .collect();
            links.sort();
            if let Some(first) = links.into_iter().next() {
                return Ok(implicit_name(first.as_bytes()));
            }
        }
    }
    use std::os::unix::ffi::OsStrExt;
    Ok(implicit_name(canonical.as_os_str().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str =
        "image v1 dev=1 ino=2 size=3 mtime=4s.5ns ctime=6s.7ns settled=1 path=/vm/a b.img";

    #[test]
    fn names_come_from_the_name_line_or_the_identity() {
        assert_eq!(name_of_origin(None), DEFAULT_NAME);
        assert_eq!(name_of_origin(Some("something else")), DEFAULT_NAME);
        assert_eq!(name_of_origin(Some(V1)), "/vm/a b.img");
        let named = origin_with_name("web", Some(V1.to_string()));
        assert_eq!(named, format!("name web\n{V1}"));
        assert_eq!(name_of_origin(Some(&named)), "web");
        assert_eq!(identity(&named), V1);
        // The default name (the canonical path) leaves the origin as it was before names.
        assert_eq!(origin_with_name("/vm/a b.img", Some(V1.to_string())), V1);
        assert_eq!(name_of_origin(Some("name disk-1")), "disk-1");
        assert_eq!(identity("name disk-1"), "");
        assert!(Origin::parse(&named).is_some());
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(check_name("").is_err());
        assert!(check_name("12").is_err());
        assert!(check_name("a\nb").is_err());
        assert!(check_name(&"x".repeat(MAX_NAME + 1)).is_err());
        assert!(check_name("vm-1:disk").is_ok());
    }

    #[test]
    fn an_invalid_path_gets_a_valid_implicit_name() {
        let long = format!("/{}", "d/".repeat(300));
        let newline = "/vm/a\nb.img";
        for path in [long.as_str(), newline] {
            let id = V1.replace("/vm/a b.img", path);
            let name = name_of_origin(Some(&id));
            assert!(check_name(&name).is_ok(), "{name:?}");
            assert_eq!(name, implicit_name(path.as_bytes()));
            assert!(name.starts_with("path-") && name.len() == 21, "{name}");
            // The origin a default-named snapshot records names it the same.
            let origin = origin_with_name(&name, Some(id));
            assert_eq!(name_of_origin(Some(&origin)), name);
        }
        assert_eq!(implicit_name(b"/vm/a.img"), "/vm/a.img");
        assert!(implicit_name(b"/vm/\xff.img").starts_with("path-"));
    }
}
