//! An object store that dies at its n-th request: that request is carried out but its answer is
//! lost (the process died waiting for it), and no later request reaches the bucket.

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct Killable {
    inner: Arc<dyn ObjectStore>,
    /// Requests left before the kill; u64::MAX: never.
    left: AtomicU64,
}

impl std::fmt::Display for Killable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Killable({})", self.inner)
    }
}

fn dead() -> object_store::Error {
    object_store::Error::Generic {
        store: "killable",
        source: "the process was killed".into(),
    }
}

impl Killable {
    pub fn new(inner: Arc<dyn ObjectStore>, left: u64) -> Killable {
        Killable {
            inner,
            left: AtomicU64::new(left),
        }
    }

    /// Dies at the n-th request from now.
    pub fn arm(&self, n: u64) {
        self.left.store(n, Ordering::SeqCst);
    }

    pub fn killed(&self) -> bool {
        self.left.load(Ordering::SeqCst) == 0
    }

    /// `Some(true)`: carry out and answer; `Some(false)`: carry out, then die; `None`: dead.
    fn admit(&self) -> Option<bool> {
        let mut cur = self.left.load(Ordering::SeqCst);
        loop {
            if cur == 0 {
                return None;
            }
            if cur == u64::MAX {
                return Some(true);
            }
            match self
                .left
                .compare_exchange(cur, cur - 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return Some(cur > 1),
                Err(now) => cur = now,
            }
        }
    }
}

#[async_trait]
impl ObjectStore for Killable {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let answer = self.admit().ok_or_else(dead)?;
        let r = self.inner.put_opts(location, payload, opts).await;
        if answer {
            r
        } else {
            Err(dead())
        }
    }

    async fn put_multipart_opts(
        &self,
        _location: &Path,
        _opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        Err(dead())
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let answer = self.admit().ok_or_else(dead)?;
        let r = self.inner.get_opts(location, options).await;
        if answer {
            r
        } else {
            Err(dead())
        }
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        match self.admit() {
            Some(true) => self.inner.delete_stream(locations),
            _ => futures::stream::once(async { Err(dead()) }).boxed(),
        }
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        match self.admit() {
            Some(true) => self.inner.list(prefix),
            _ => futures::stream::once(async { Err(dead()) }).boxed(),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let answer = self.admit().ok_or_else(dead)?;
        let r = self.inner.list_with_delimiter(prefix).await;
        if answer {
            r
        } else {
            Err(dead())
        }
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        let answer = self.admit().ok_or_else(dead)?;
        let r = self.inner.copy_opts(from, to, options).await;
        if answer {
            r
        } else {
            Err(dead())
        }
    }
}
