//! What the virtio-blk tests share: a base image of known bytes in a directory of its own, which
//! goes away with the fixture.
use std::path::PathBuf;
use std::sync::Arc;

use mirrorball_devices::virtio_blk::disk::BaseImage;

/// A base image file and the bytes written to it.
pub struct BaseFixture {
    pub dir: PathBuf,
    pub base_path: PathBuf,
    pub base: Arc<BaseImage>,
    pub original: Vec<u8>,
}

impl BaseFixture {
    /// A fresh `PREFIX-TAG-PID` directory under the temporary directory with a `base.img` of
    /// `len` bytes, byte `i` being `byte(i)`, opened as a base image.
    pub fn with_base(prefix: &str, tag: &str, len: usize, byte: fn(usize) -> u8) -> Self {
        let dir = std::env::temp_dir().join(format!("{prefix}-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let base_path = dir.join("base.img");
        let original: Vec<u8> = (0..len).map(byte).collect();
        std::fs::write(&base_path, &original).unwrap();
        let base = BaseImage::open(&base_path).unwrap();
        Self {
            dir,
            base_path,
            base,
            original,
        }
    }
}

impl Drop for BaseFixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
