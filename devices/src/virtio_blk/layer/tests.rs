use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use super::*;
use crate::virtio_blk::disk::{BaseImage, OverlaySpec};

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mb-layer-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A base of 8.5 blocks (the last one short) whose bytes are never zero.
fn base(dir: &Path) -> (Arc<BaseImage>, Vec<u8>) {
    let len = 8 * 4096 + 2048;
    let data: Vec<u8> = (0..len)
        .map(|i| 1 + u8::try_from(i % 251).unwrap())
        .collect();
    let path = dir.join("base.img");
    std::fs::write(&path, &data).unwrap();
    (BaseImage::open(&path).unwrap(), data)
}

fn read_all(disk: &CowDisk) -> Vec<u8> {
    let mut all = vec![0; usize::try_from(disk.capacity()).unwrap()];
    disk.read(0, &mut all).unwrap();
    all
}

/// A template disk with blocks 1 (partly), 2 (zeros), 3 and the short last block 8 written,
/// saved as a layer file; returns the layer's facts, the file and what the template read.
fn snapshot(dir: &Path, spec: &OverlaySpec) -> (LayerFacts, PathBuf, Vec<u8>) {
    let (base, _) = base(dir);
    let mut template = CowDisk::new(base, spec).unwrap();
    template.write(4096 + 100, &[0xaa; 300]).unwrap();
    template.write(2 * 4096, &[0; 4096]).unwrap();
    template.write(3 * 4096, &[0x33; 4096]).unwrap();
    template.write(8 * 4096, &[0x88; 1024]).unwrap();
    let path = dir.join("layer.bin");
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    let facts = write_layer(&template, &out).unwrap();
    (facts, path, read_all(&template))
}

#[test]
fn clones_read_the_snapshot_write_privately_and_fall_through_to_the_base() {
    for (tag, spec) in [("mem", false), ("file", true)] {
        let dir = tempdir(tag);
        let spec_for = |name: &str| {
            if spec {
                OverlaySpec::File(dir.join(name))
            } else {
                OverlaySpec::Memory
            }
        };
        let (facts, path, template) = snapshot(&dir, &spec_for("template-ov"));
        assert_eq!(facts.runs, vec![(1, 3), (8, 1)]);
        assert_eq!(facts.blocks, 4);
        assert_eq!(facts.bytes, 8 * 4096 + 2048);
        let on_disk = std::fs::read(&path).unwrap();
        let layer = SnapshotLayer::open(File::open(&path).unwrap(), &facts).unwrap();
        assert_eq!(layer.blocks(), 4);
        let (base, base_bytes) = base(&dir);
        let mut a = CowDisk::layered(base.clone(), layer.clone(), &spec_for("a-ov")).unwrap();
        let b = CowDisk::layered(base.clone(), layer.clone(), &spec_for("b-ov")).unwrap();
        // Every clone reads what the template had: written blocks from the layer (the zero
        // block as zeros, not the base's bytes), the others from the base.
        assert_eq!(read_all(&a), template);
        assert_eq!(read_all(&b), template);
        assert_eq!(&template[2 * 4096..3 * 4096], &[0; 4096][..]);
        assert_eq!(&template[..4096], &base_bytes[..4096]);
        assert!(!a.from_base(2) && a.from_base(0) && a.from_base(4));
        // A clone's write (partial, over a layer block) is private and keeps the layer's rest.
        a.write(3 * 4096 + 512, &[0x5a; 512]).unwrap();
        a.write(5 * 4096, &[0x55; 4096]).unwrap();
        let mut want = template.clone();
        want[3 * 4096 + 512..3 * 4096 + 1024].fill(0x5a);
        want[5 * 4096..6 * 4096].fill(0x55);
        assert_eq!(read_all(&a), want);
        assert_eq!(read_all(&b), template, "clone B sees none of A's writes");
        assert_eq!(a.overlay_blocks(), 2);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            on_disk,
            "the layer file is never written"
        );
        // A snapshot of a clone holds the layer's blocks and its own.
        let out = dir.join("again.bin");
        let out = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(out)
            .unwrap();
        let again = write_layer(&a, &out).unwrap();
        assert_eq!(again.runs, vec![(1, 3), (5, 1), (8, 1)]);
        let c = CowDisk::layered(
            base,
            SnapshotLayer::open(out, &again).unwrap(),
            &OverlaySpec::Memory,
        )
        .unwrap();
        assert_eq!(read_all(&c), want);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn refuses_a_truncated_corrupted_or_misdescribed_layer() {
    let dir = tempdir("bad");
    let (facts, path, _) = snapshot(&dir, &OverlaySpec::Memory);
    let open = |f: &LayerFacts| SnapshotLayer::open(File::open(&path).unwrap(), f);
    assert!(open(&facts).is_ok());
    for (runs, blocks) in [
        (vec![(1, 3), (8, 2)], 5), // past the end
        (vec![(8, 1), (1, 3)], 4), // out of order
        (vec![(1, 3), (3, 1)], 4), // overlapping
        (vec![(1, 0), (8, 1)], 1), // empty
        (vec![(1, 3), (8, 1)], 5), // wrong count
    ] {
        let bad = LayerFacts {
            runs,
            blocks,
            ..facts.clone()
        };
        assert!(matches!(open(&bad), Err(LayerError::Runs(_))), "{bad:?}");
    }
    let moved = LayerFacts {
        runs: vec![(1, 3), (7, 1)],
        ..facts.clone()
    };
    assert!(matches!(open(&moved), Err(LayerError::Checksum)));
    // One flipped byte inside a held block.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[3 * 4096 + 7] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(open(&facts), Err(LayerError::Checksum)));
    bytes[3 * 4096 + 7] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert!(open(&facts).is_ok());
    // Truncated.
    std::fs::write(&path, &bytes[..4 * 4096]).unwrap();
    let e = open(&facts).expect_err("truncated");
    assert!(matches!(e, LayerError::Size { found: 16384, .. }), "{e}");
    // A layer over a base of another size.
    let (base, _) = base(&dir);
    let small = LayerFacts {
        bytes: 4 * 4096,
        runs: vec![(1, 1)],
        blocks: 1,
        crc32: {
            let mut h = crc32fast::Hasher::new();
            crc_block(&mut h, 1, &bytes[4096..8192]);
            h.finalize()
        },
    };
    let layer = open(&small).unwrap();
    assert!(matches!(
        CowDisk::layered(base, layer, &OverlaySpec::Memory),
        Err(crate::virtio_blk::disk::DiskError::LayerSize { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}
