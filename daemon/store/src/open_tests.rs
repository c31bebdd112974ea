//! Opening a damaged or cluttered cache directory: the store always opens (unless another
//! daemon holds it), moves a damaged database aside, and finds its records again from the
//! blobs' descriptors with their pages intact.

use super::open::{classify, utc_stamp, MetaFailure};
use super::*;
use crate::format::FORMAT_VERSION;
use std::path::Path;

fn fp() -> Fingerprint {
    Fingerprint {
        format_version: FORMAT_VERSION,
        model_sha256: "model".into(),
        kv_dtype: "f16".into(),
        page_size: 4,
        layers: 1,
        kv_heads: 1,
        head_dim: 2,
        tokenizer_digest: "tokenizer".into(),
        template_digest: "template".into(),
    }
}

/// A record as written: its namespace, tokens and page bytes.
type Written = (Namespace, Vec<u32>, Vec<u8>);

/// A cache directory holding three records (the first pinned, under registered prefix 7).
struct Seeded {
    _dir: tempfile::TempDir,
    cfg: StoreConfig,
    records: Vec<Written>,
}

/// Distinct bytes for each page of `tokens`.
fn page_bytes_of(tokens: &[u32]) -> Vec<u8> {
    let len = tokens.len().div_ceil(4) * fp().page_bytes();
    (0..len)
        .map(|i| (tokens[0] as usize * 31 + i * 7) as u8)
        .collect()
}

fn seed() -> Seeded {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        dir: dir.path().join("cache"),
        budget: 1 << 30,
    };
    let records: Vec<Written> = [
        (Namespace::Tenant(1), (0..10).collect::<Vec<u32>>()),
        (Namespace::Tenant(2), (100..108).collect()),
        (Namespace::Published(3), (200..213).collect()),
    ]
    .into_iter()
    .map(|(ns, tokens)| {
        let bytes = page_bytes_of(&tokens);
        (ns, tokens, bytes)
    })
    .collect();
    let (mut store, _) = open(&cfg);
    for (i, (ns, tokens, bytes)) in records.iter().enumerate() {
        store.write(*ns, tokens.clone(), 0, bytes.clone(), i == 0);
    }
    store.put_prefix(7, 1, records[0].0, records[0].1.clone());
    store.flush();
    assert_eq!(store.stats().records, 3);
    Seeded {
        _dir: dir,
        cfg,
        records,
    }
}

fn open(cfg: &StoreConfig) -> (Store, Vec<PrefixRecord>) {
    Store::open(cfg, fp()).expect("the store opens")
}

/// Asserts each of `records` matches in full and reads back its bytes.
fn assert_intact(store: &mut Store, records: &[Written]) {
    for (ns, tokens, bytes) in records {
        let m = store.longest_match(*ns, tokens, 0);
        assert_eq!(m.tokens, tokens.len(), "{ns:?} {tokens:?}");
        let mut got = Vec::new();
        for loc in &m.pages {
            let mut page = vec![0u8; store.page_bytes()];
            store.read_page(loc.record, loc.page, &mut page).unwrap();
            got.extend(page);
        }
        assert_eq!(&got, bytes, "{ns:?} {tokens:?}");
    }
}

/// The entries of `dir` whose names start with `prefix`.
fn entries(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// What a damaged start must show.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Aside {
    /// The database is moved aside: sled reported the damage, or its file is gone.
    Moved,
    /// It may or may not be: sled treats some damage as a torn write and drops the log's tail.
    Either,
}

/// Seeds a directory, applies `damage` to it, opens it and checks that every record is found
/// with its bytes, and whether the database was moved aside. Returns the store and the seed.
fn check_recovers(damage: impl FnOnce(&Path), aside: Aside) -> (Store, Vec<PrefixRecord>, Seeded) {
    let seeded = seed();
    damage(&seeded.cfg.dir);
    let (mut store, prefixes) = open(&seeded.cfg);
    let moved = entries(&seeded.cfg.dir, "meta.damaged-");
    if aside == Aside::Moved {
        assert_eq!(moved.len(), 1, "{moved:?}");
        assert!(moved[0].is_dir() || moved[0].is_file());
        assert!(prefixes.is_empty(), "registrations live in sled only");
        assert_eq!(store.stats().adopted, 3);
    }
    assert_intact(&mut store, &seeded.records);
    assert_eq!(store.stats().records, 3);
    (store, prefixes, seeded)
}

/// Applies `edit` to the bytes of `dir/meta/<file>`.
fn edit_meta_file(dir: &Path, file: &str, edit: impl FnOnce(&mut Vec<u8>)) {
    let path = dir.join("meta").join(file);
    let mut bytes = std::fs::read(&path).unwrap();
    edit(&mut bytes);
    std::fs::write(&path, bytes).unwrap();
}

fn flip(bytes: &mut [u8], at: usize) {
    let at = at.min(bytes.len() - 8);
    for b in &mut bytes[at..at + 8] {
        *b ^= 0x5a;
    }
}

#[test]
fn an_undamaged_directory_reopens_with_its_records_and_prefixes() {
    let seeded = seed();
    let (mut store, prefixes) = open(&seeded.cfg);
    assert_intact(&mut store, &seeded.records);
    assert_eq!(prefixes.len(), 1);
    assert_eq!(store.stats().adopted, 0);
    assert!(entries(&seeded.cfg.dir, "meta.damaged-").is_empty());
}

// Regression: a damaged sled config made `agentd serve` exit 1 ("Read corrupted data") until
// someone deleted the directory.
#[test]
fn a_corrupt_sled_config_moves_the_database_aside_and_rebuilds_it_from_the_blobs() {
    for at in [0, 8, 30, 1000] {
        let (store, _, _) = check_recovers(
            |dir| edit_meta_file(dir, "conf", |b| flip(b, at)),
            Aside::Moved,
        );
        // Pinned only while a registration covers the record: those were in the lost database.
        assert!(store.metas.values().all(|h| !h.meta.pinned));
    }
}

#[test]
fn corrupt_bytes_in_the_sled_log_never_stop_the_store_nor_lose_a_record() {
    for at in [0, 16, 100, 1000, 2000, usize::MAX] {
        check_recovers(
            |dir| edit_meta_file(dir, "db", |b| flip(b, at)),
            Aside::Either,
        );
    }
}

// Regression: a database file truncated to 0 bytes made `agentd serve` exit 1.
#[test]
fn an_empty_database_file_is_moved_aside_and_rebuilt() {
    check_recovers(|dir| edit_meta_file(dir, "db", |b| b.clear()), Aside::Moved);
}

#[test]
fn a_deleted_database_file_is_moved_aside_and_rebuilt() {
    check_recovers(
        |dir| std::fs::remove_file(dir.join("meta/db")).unwrap(),
        Aside::Moved,
    );
}

#[test]
fn a_file_where_the_database_directory_should_be_is_moved_aside() {
    check_recovers(
        |dir| {
            std::fs::remove_dir_all(dir.join("meta")).unwrap();
            std::fs::write(dir.join("meta"), b"not sled").unwrap();
        },
        Aside::Moved,
    );
}

#[test]
fn two_damaged_starts_in_one_second_keep_both_databases() {
    let seeded = seed();
    for _ in 0..2 {
        std::fs::remove_file(seeded.cfg.dir.join("meta/db")).unwrap();
        let (mut store, _) = open(&seeded.cfg);
        assert_intact(&mut store, &seeded.records);
    }
    assert_eq!(entries(&seeded.cfg.dir, "meta.damaged-").len(), 2);
}

// Regression: a directory inside blobs/ (lost+found on a mounted file system) made `agentd
// serve` exit 1 ("Is a directory"), and stray files there were deleted.
#[test]
fn entries_the_store_did_not_write_are_left_alone() {
    let stray = [
        "blobs/lost+found/",
        "blobs/notes.txt",
        "blobs/xyz.kv",
        "blobs/00000000000000FF.kv",
        "blobs/0000000000000001.kv.bak",
        "blobs/00000000000000ff.kv/",
        "lost+found/",
        "README",
    ];
    let (_, prefixes, seeded) = check_recovers(
        |dir| {
            for s in stray {
                let path = dir.join(s);
                if s.ends_with('/') {
                    std::fs::create_dir(&path).unwrap();
                } else {
                    std::fs::write(&path, b"not agentd's").unwrap();
                }
            }
        },
        Aside::Either,
    );
    assert_eq!(prefixes.len(), 1);
    assert!(entries(&seeded.cfg.dir, "meta.damaged-").is_empty());
    for s in stray {
        assert!(seeded.cfg.dir.join(s).exists(), "{s} was removed");
    }
}

#[test]
fn a_record_whose_metadata_in_sled_is_garbage_is_restored_from_its_blob() {
    let (store, _, _) = check_recovers(
        |dir| {
            let db = sled::open(dir.join("meta")).unwrap();
            let records = db.open_tree("records").unwrap();
            let (key, _) = records.first().unwrap().unwrap();
            records.insert(key, b"{garbage".to_vec()).unwrap();
            db.flush().unwrap();
        },
        Aside::Either,
    );
    assert_eq!(store.stats().adopted, 1);
}

#[test]
fn a_blob_whose_descriptor_is_damaged_is_removed_when_sled_lost_its_record() {
    let seeded = seed();
    let dir = &seeded.cfg.dir;
    std::fs::remove_file(dir.join("meta/db")).unwrap();
    let blob = entries(&dir.join("blobs"), "")[0].clone();
    let mut bytes = std::fs::read(&blob).unwrap();
    let end = bytes.len();
    flip(&mut bytes, end - 20);
    std::fs::write(&blob, bytes).unwrap();
    let (mut store, _) = open(&seeded.cfg);
    assert!(!blob.exists());
    let stats = store.stats();
    assert_eq!((stats.records, stats.adopted, stats.dropped), (2, 2, 1));
    // The first blob written holds the first record.
    assert_intact(&mut store, &seeded.records[1..]);
}

// Regression guard: a rebuilt database's id generator starts at 0 again, so new records
// would have overwritten the adopted blobs.
#[test]
fn records_written_after_a_rebuild_keep_the_adopted_ones_intact() {
    let seeded = seed();
    std::fs::remove_file(seeded.cfg.dir.join("meta/db")).unwrap();
    let tokens: Vec<u32> = (300..309).collect();
    let extra = (Namespace::Tenant(4), tokens.clone(), page_bytes_of(&tokens));
    {
        let (mut store, _) = open(&seeded.cfg);
        store.write(extra.0, extra.1.clone(), 0, extra.2.clone(), false);
        store.flush();
        assert_intact(&mut store, &seeded.records);
    }
    let (mut store, _) = open(&seeded.cfg);
    assert_eq!(store.stats().adopted, 0, "the rebuilt database kept them");
    assert_intact(&mut store, &seeded.records);
    assert_intact(&mut store, &[extra]);
}

#[test]
fn an_unfinished_blob_is_removed() {
    let (_, _, seeded) = check_recovers(
        |dir| std::fs::write(dir.join("blobs/00000000000000aa.tmp"), b"half").unwrap(),
        Aside::Either,
    );
    assert!(!seeded.cfg.dir.join("blobs/00000000000000aa.tmp").exists());
}

#[test]
fn a_second_store_on_the_same_directory_is_refused_as_locked() {
    let seeded = seed();
    let (_first, _) = open(&seeded.cfg);
    let err = Store::open(&seeded.cfg, fp()).err().expect("refused");
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    assert!(
        err.to_string().contains("in use by another agentd"),
        "{err}"
    );
    assert!(entries(&seeded.cfg.dir, "meta.damaged-").is_empty());
}

#[test]
fn sled_errors_are_sorted_into_lock_refusal_and_damage() {
    let io = |kind, msg: &str| sled::Error::Io(std::io::Error::new(kind, msg.to_owned()));
    let lock = io(
        std::io::ErrorKind::Other,
        "could not acquire lock on \"/x/meta/db\": Os { code: 11 }",
    );
    assert!(matches!(classify(lock), MetaFailure::Locked(_)));
    let denied = io(std::io::ErrorKind::PermissionDenied, "denied");
    assert!(matches!(classify(denied), MetaFailure::Refused(_)));
    let eof = io(
        std::io::ErrorKind::UnexpectedEof,
        "failed to fill whole buffer",
    );
    assert!(matches!(classify(eof), MetaFailure::Damaged(_)));
    let corrupt = sled::Error::Corruption { at: None, bt: () };
    assert!(matches!(classify(corrupt), MetaFailure::Damaged(_)));
}

#[test]
fn damaged_entries_are_named_with_a_compact_utc_time() {
    assert_eq!(utc_stamp(0), "19700101T000000Z");
    assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
    assert_eq!(utc_stamp(1_764_680_701), "20251202T130501Z");
}

#[test]
fn a_file_where_the_blob_directory_should_be_is_moved_aside() {
    let seeded = seed();
    let blobs = seeded.cfg.dir.join("blobs");
    std::fs::remove_dir_all(&blobs).unwrap();
    std::fs::write(&blobs, b"not a directory").unwrap();
    let (store, _) = open(&seeded.cfg);
    assert!(blobs.is_dir());
    assert_eq!(entries(&seeded.cfg.dir, "blobs.damaged-").len(), 1);
    // Their blobs gone, the records are dropped and their tokens will be recomputed.
    assert_eq!((store.stats().records, store.stats().dropped), (0, 3));
}

// Pages of one KV dtype must never be read as another: a daemon started with `--kv-dtype q8_0`
// over a directory written with f16 pages drops every record (and the other way round).
#[test]
fn records_of_another_kv_dtype_are_dropped_never_served() {
    let seeded = seed();
    let q8 = Fingerprint {
        kv_dtype: "q8_0".into(),
        ..fp()
    };
    assert_eq!(fp().mismatch(&q8), Some("kv_dtype"));
    let (store, prefixes) = Store::open(&seeded.cfg, q8.clone()).expect("opens");
    assert_eq!(store.stats().records, 0);
    assert!(
        prefixes.is_empty()
            || store
                .longest_match(seeded.records[0].0, &seeded.records[0].1, 0)
                .tokens
                == 0
    );
    for (ns, tokens, _) in &seeded.records {
        assert_eq!(store.longest_match(*ns, tokens, 0).tokens, 0, "{ns:?}");
    }
    // A q8_0 page is 34 bytes per 32 values, against 64 for f16.
    let wide = Fingerprint {
        head_dim: 64,
        ..fp()
    };
    let wide_q8 = Fingerprint {
        kv_dtype: "q8_0".into(),
        ..wide.clone()
    };
    assert_eq!(wide.page_bytes(), 2 * 4 * 64 * 2);
    assert_eq!(wide_q8.page_bytes(), 2 * 4 * 2 * 34);
}
