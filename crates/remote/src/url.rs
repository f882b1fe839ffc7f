//! `s3://BUCKET/PREFIX`: where a store on object storage is, and how it is reached.

use crate::ObjectStorage;
use object_store::aws::AmazonS3Builder;
use object_store::{BackoffConfig, RetryConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A store location that is not a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreUrl {
    /// The bucket.
    pub bucket: String,
    /// The key prefix of the store's objects inside the bucket ("" for the bucket's root).
    pub prefix: String,
}

/// A store URL that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// Not of the form `s3://BUCKET/PREFIX`.
    #[error("{url}: not a store URL ({why}); use s3://BUCKET/PREFIX")]
    Malformed { url: String, why: &'static str },
    /// The S3 client could not be configured.
    #[error("{url}: cannot configure the S3 client ({error}); set AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ALLOW_HTTP=true for a plain-HTTP endpoint)")]
    Config {
        url: String,
        error: object_store::Error,
    },
    /// The store's head could not be read, or the cache directory made (the message names
    /// what and what to do).
    #[error("{error}")]
    Open { url: String, error: std::io::Error },
}

impl StoreUrl {
    /// `Some` if `s` names a store on object storage (`s3://…`), `None` if it is a path.
    pub fn parse(s: &str) -> Option<Result<StoreUrl, UrlError>> {
        let rest = s.strip_prefix("s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bad = |why| Some(Err(UrlError::Malformed { url: s.into(), why }));
        if bucket.is_empty() {
            return bad("no bucket");
        }
        if !bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        {
            return bad("a bucket name is lower-case letters, digits, '-' and '.'");
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
            return bad("the prefix has an empty, '.' or '..' part");
        }
        // Keys are compared as the bucket lists them; characters that object stores escape
        // ('%', '#', spaces, …) would make the listing differ from the prefix.
        if !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        {
            return bad("a prefix is letters, digits, '-', '_', '.' and '/'");
        }
        Some(Ok(StoreUrl {
            bucket: bucket.into(),
            prefix: prefix.into(),
        }))
    }

    /// The URL, as the user would write it.
    pub fn display(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    /// This store's directory in the cache root: blocks, the lock of writers on this machine.
    pub fn cache_dir(&self, root: &Path) -> PathBuf {
        let h = blake3::hash(self.display().as_bytes());
        root.join(&h.to_hex()[..16])
    }

    /// Opens the store's objects with the S3 client configured from the environment
    /// (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_ALLOW_HTTP`, …), the cache in [`StoreUrl::cache_dir`] of `cache_root`.
    pub fn storage(&self, cache_root: Option<&Path>) -> Result<ObjectStorage, UrlError> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&self.bucket)
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 5,
                retry_timeout: Duration::from_secs(60),
            });
        if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            builder = builder.with_region("us-east-1");
        }
        let s3 = builder.build().map_err(|error| UrlError::Config {
            url: self.display(),
            error,
        })?;
        ObjectStorage::open(
            Arc::new(s3),
            &self.prefix,
            &self.display(),
            cache_root.map(|r| self.cache_dir(r)),
        )
        .map_err(|error| UrlError::Open {
            url: self.display(),
            error,
        })
    }
}

/// Where caches of stores on object storage go: `PAGESNAP_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/pagesnap`, else `~/.cache/pagesnap`; `None` if none can be named.
pub fn default_cache_root() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("PAGESNAP_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("pagesnap"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("pagesnap"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_say_why_not() {
        assert!(StoreUrl::parse("/var/store").is_none());
        assert!(StoreUrl::parse("store").is_none());
        let u = StoreUrl::parse("s3://bk/a/b/").expect("url").expect("ok");
        assert_eq!((u.bucket.as_str(), u.prefix.as_str()), ("bk", "a/b"));
        assert_eq!(u.display(), "s3://bk/a/b");
        let root = StoreUrl::parse("s3://bk").expect("url").expect("ok");
        assert_eq!(root.prefix, "");
        for bad in [
            "s3://",
            "s3:///x",
            "s3://Bk/x",
            "s3://bk/a/../b",
            "s3://bk/a//b",
            "s3://bk/a#b",
            "s3://bk/50%",
            "s3://bk/a b",
        ] {
            let e = StoreUrl::parse(bad).expect("a url").expect_err(bad);
            assert!(e.to_string().contains("s3://BUCKET/PREFIX"), "{e}");
        }
    }
}
