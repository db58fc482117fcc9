//! The audit trail against real SQLite files: chain verification, tampering through a separate
//! connection, fail-closed behaviour under a held lock and a full disk, retention, queries.

#[path = "support/needs.rs"]
mod needs;

use std::path::Path;
use std::time::{Duration, Instant};

use keyward::audit::{
    Audit, AuditError, Event, EventKind, Filter, SpendBy, SpendQuery, SpendRow, fingerprint,
    verify_dir,
};
use keyward::config::AuditSync;
use keyward::seal::{MasterKey, MasterKeyProvider, Purpose, Secret};

fn master(byte: u8) -> MasterKeyProvider {
    MasterKey::from_secret(Secret::from_slice(&[byte; 32])).into()
}

fn open(dir: &Path) -> Audit {
    Audit::open(dir, &master(7), AuditSync::Normal, None).expect("open audit")
}

fn request(i: usize) -> Event {
    Event {
        call_id: Some(format!("call-{i}")),
        tenant: Some(
            if i.is_multiple_of(2) {
                "acme"
            } else {
                "globex"
            }
            .into(),
        ),
        client_id: Some(format!("cli_{}", i % 3)),
        peer_uid: Some(1000),
        peer_pid: Some(4242),
        target: Some("openai".into()),
        model: Some("gpt-4o".into()),
        credential_id: Some(format!("cred_{}", i % 4)),
        credential_version: Some(1),
        ..Event::new(EventKind::RequestResolved)
    }
}

/// A trail with `n` committed request rows.
async fn trail(n: usize) -> (tempfile::TempDir, Audit) {
    let dir = tempfile::tempdir().unwrap();
    let audit = open(dir.path());
    for i in 1..=n {
        assert_eq!(audit.commit(request(i)).await.unwrap(), i as u64);
    }
    // Committed rows reach audit.db from the journal; tampering tests edit them there.
    audit.flush().await;
    (dir, audit)
}

fn raw(dir: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(dir.join("audit.db")).unwrap()
}

fn assert_bad(audit: &Audit, seq: u64) -> String {
    let report = audit.verify().unwrap();
    assert!(!report.ok(), "tampering went unnoticed: {report:?}");
    assert_eq!(report.first_bad_seq, Some(seq), "{report:?}");
    report.reason.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commits_get_contiguous_seqs_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let audit = open(dir.path());
    let mut tasks = Vec::new();
    for t in 0..64 {
        let audit = audit.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..50 {
                seqs.push(audit.commit(request(t * 100 + i)).await.unwrap());
            }
            seqs
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.extend(t.await.unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=3200).collect::<Vec<u64>>());
    let report = audit.verify().unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.rows_checked, 3200);
    assert_eq!(report.last_seq, 3200);

    // The chain continues across a restart.
    audit.shutdown().await;
    let audit = open(dir.path());
    assert_eq!(audit.commit(request(0)).await.unwrap(), 3201);
    assert!(audit.verify().unwrap().ok());
    assert!(verify_dir(dir.path(), &master(7)).unwrap().ok());
}

#[tokio::test]
async fn edited_field_is_detected_at_its_row() {
    let (dir, audit) = trail(20).await;
    raw(dir.path())
        .execute(
            "UPDATE audit_events SET model = 'gpt-cheap' WHERE seq = 7",
            [],
        )
        .unwrap();
    assert_bad(&audit, 7);
}

#[tokio::test]
async fn edited_time_is_detected() {
    let (dir, audit) = trail(20).await;
    raw(dir.path())
        .execute(
            "UPDATE audit_events SET time_ms = time_ms - 3600000 WHERE seq = 12",
            [],
        )
        .unwrap();
    assert_bad(&audit, 12);
}

#[tokio::test]
async fn deleted_row_is_detected_at_its_seq() {
    let (dir, audit) = trail(20).await;
    raw(dir.path())
        .execute("DELETE FROM audit_events WHERE seq = 5", [])
        .unwrap();
    let reason = assert_bad(&audit, 5);
    assert!(reason.contains("missing"), "{reason}");
}

#[tokio::test]
async fn inserted_rows_are_detected() {
    // In the middle: later rows renumbered to make room, a copy of row 10 put at 11.
    let (dir, audit) = trail(20).await;
    raw(dir.path())
        .execute_batch(
            "UPDATE audit_events SET seq = seq + 1000 WHERE seq > 10;
             UPDATE audit_events SET seq = seq - 999 WHERE seq > 1000;
             INSERT INTO audit_events SELECT 11, time_ms, event, call_id, tenant, client_id,
                peer_uid, peer_pid, target, model, capability, team, workflow, credential_id,
                credential_version, fingerprint, upstream_status, latency_ms, bytes_in,
                bytes_out, input_tokens, output_tokens, total_tokens, detail, flags, mac,
                cached_input_tokens, cache_write_tokens, cost_micros
                FROM audit_events WHERE seq = 10;",
        )
        .unwrap();
    assert_bad(&audit, 11);

    // At the end, with a MAC copied from a real row.
    let (dir, audit) = trail(20).await;
    raw(dir.path())
        .execute_batch(
            "INSERT INTO audit_events SELECT 21, time_ms, event, call_id, tenant, client_id,
                peer_uid, peer_pid, target, model, capability, team, workflow, credential_id,
                credential_version, fingerprint, upstream_status, latency_ms, bytes_in,
                bytes_out, input_tokens, output_tokens, total_tokens, detail, flags, mac,
                cached_input_tokens, cache_write_tokens, cost_micros
                FROM audit_events WHERE seq = 20;",
        )
        .unwrap();
    assert_bad(&audit, 21);
}

#[tokio::test]
async fn swapped_rows_are_detected_at_the_first() {
    let (dir, audit) = trail(20).await;
    raw(dir.path())
        .execute_batch(
            "CREATE TEMP TABLE t AS SELECT * FROM audit_events WHERE seq IN (3, 4);
             UPDATE temp.t SET seq = 7 - seq;
             DELETE FROM audit_events WHERE seq IN (3, 4);
             INSERT INTO audit_events SELECT * FROM temp.t;",
        )
        .unwrap();
    let c = raw(dir.path());
    let call: String = c
        .query_row("SELECT call_id FROM audit_events WHERE seq = 3", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(call, "call-4", "the swap itself did not happen");
    assert_bad(&audit, 3);
}

#[tokio::test]
async fn truncated_newest_rows_are_detected_and_refuse_reopen() {
    let (dir, audit) = trail(20).await;
    raw(dir.path())
        .execute("DELETE FROM audit_events WHERE seq > 17", [])
        .unwrap();
    let reason = assert_bad(&audit, 18);
    assert!(reason.contains("truncated"), "{reason}");
    audit.shutdown().await;
    match Audit::open(dir.path(), &master(7), AuditSync::Normal, None) {
        Err(e @ AuditError::Truncated { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("seq 20") && msg.contains("seq 17"), "{msg}");
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
    assert_eq!(
        verify_dir(dir.path(), &master(7)).unwrap().first_bad_seq,
        Some(18)
    );
}

#[tokio::test]
async fn deleted_or_forged_anchor_is_detected() {
    let (dir, audit) = trail(5).await;
    audit.shutdown().await;
    let head = dir.path().join("audit.head");
    let text = std::fs::read_to_string(&head).unwrap();
    std::fs::write(&head, text.replace("seq=5", "seq=4")).unwrap();
    assert!(matches!(
        Audit::open(dir.path(), &master(7), AuditSync::Normal, None),
        Err(AuditError::Tampered { .. })
    ));
    std::fs::remove_file(&head).unwrap();
    let err = Audit::open(dir.path(), &master(7), AuditSync::Normal, None).unwrap_err();
    assert!(err.to_string().contains("audit.head is missing"), "{err}");
    assert!(!verify_dir(dir.path(), &master(7)).unwrap().ok());
}

#[tokio::test]
async fn rows_beyond_a_stale_anchor_are_accepted_like_after_a_crash() {
    // A kill -9 between the database commit and the anchor write leaves the anchor behind.
    let (dir, audit) = trail(5).await;
    let stale = std::fs::read(dir.path().join("audit.head")).unwrap();
    for i in 6..=9 {
        audit.commit(request(i)).await.unwrap();
    }
    audit.shutdown().await;
    std::fs::write(dir.path().join("audit.head"), &stale).unwrap();
    let report = verify_dir(dir.path(), &master(7)).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.anchored_seq, 5);
    let audit = open(dir.path());
    assert_eq!(audit.commit(request(10)).await.unwrap(), 10);
    let report = audit.verify().unwrap();
    assert!(report.ok() && report.anchored_seq == 10, "{report:?}");
}

/// A database written before the spend columns existed (they are dropped here, leaving the
/// exact older schema and rows) opens, gains the columns, still verifies, and chains new rows
/// that carry them; tampering with a new column on an old row is still caught.
#[tokio::test]
async fn a_trail_from_before_the_spend_columns_still_verifies_and_grows() {
    let (dir, audit) = trail(5).await;
    audit.shutdown().await;
    raw(dir.path())
        .execute_batch(
            "ALTER TABLE audit_events DROP COLUMN cached_input_tokens;
             ALTER TABLE audit_events DROP COLUMN cache_write_tokens;
             ALTER TABLE audit_events DROP COLUMN cost_micros;",
        )
        .unwrap();
    let audit = open(dir.path());
    assert!(audit.verify().unwrap().ok());
    let spend = Event {
        input_tokens: Some(11_007),
        cached_input_tokens: Some(9_800),
        cache_write_tokens: Some(1_200),
        output_tokens: Some(50),
        cost_micros: Some(4_321),
        ..request(6)
    };
    assert_eq!(audit.commit(spend).await.unwrap(), 6);
    audit.flush().await;
    assert!(audit.verify().unwrap().ok());
    let rows = audit
        .query(&Filter {
            call_id: Some("call-6".into()),
            ..Filter::default()
        })
        .unwrap();
    assert_eq!(rows[0].event.cached_input_tokens, Some(9_800));
    assert_eq!(rows[0].event.cost_micros, Some(4_321));
    raw(dir.path())
        .execute("UPDATE audit_events SET cost_micros = 1 WHERE seq = 3", [])
        .unwrap();
    assert_bad(&audit, 3);
}

/// A database from before the `time_ms` index was dropped (the index put back here) opens,
/// loses the index, still verifies, answers time-bounded queries the same, and grows; an edit
/// to an old row's time is still caught.
#[tokio::test]
async fn a_trail_with_the_old_time_index_opens_verifies_and_grows() {
    let (dir, audit) = trail(5).await;
    audit.shutdown().await;
    raw(dir.path())
        .execute_batch("CREATE INDEX audit_events_time ON audit_events(time_ms)")
        .unwrap();
    let audit = open(dir.path());
    assert!(audit.verify().unwrap().ok());
    let indexes: i64 = raw(dir.path())
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'audit_events_time'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(indexes, 0);
    assert_eq!(audit.commit(request(6)).await.unwrap(), 6);
    audit.flush().await;
    assert!(audit.verify().unwrap().ok());
    let all = audit.query(&Filter::default()).unwrap();
    let (first, last) = (all.last().unwrap().time_ms, all[0].time_ms);
    let seqs = |since_ms, until_ms| {
        audit
            .query(&Filter {
                since_ms,
                until_ms,
                ..Filter::default()
            })
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect::<Vec<_>>()
    };
    assert_eq!(seqs(Some(first), Some(last)), [6, 5, 4, 3, 2, 1]);
    assert_eq!(seqs(Some(last + 1), None), Vec::<u64>::new());
    assert_eq!(seqs(None, Some(first - 1)), Vec::<u64>::new());
    raw(dir.path())
        .execute(
            "UPDATE audit_events SET time_ms = time_ms + 1 WHERE seq = 2",
            [],
        )
        .unwrap();
    assert_bad(&audit, 2);
}

/// The spend aggregate is kept with the rows, and a database from before it existed gets it
/// built from its rows on open.
#[tokio::test]
async fn spend_aggregate_follows_the_rows_and_is_built_for_older_databases() {
    let dir = tempfile::tempdir().unwrap();
    let audit = open(dir.path());
    for i in 0..10u64 {
        let e = Event {
            tenant: Some(if i < 7 { "acme" } else { "globex" }.into()),
            model: Some(format!("m{}", i % 2)),
            input_tokens: Some(100),
            cached_input_tokens: Some(10),
            output_tokens: Some(i),
            cost_micros: (i != 9).then_some(1_000 + i),
            flags: if i == 9 {
                vec!["unpriced".into()]
            } else {
                vec![]
            },
            ..Event::new(EventKind::RequestCompleted)
        };
        audit.commit(e).await.unwrap();
        // Rows of other kinds are not spend.
        audit.commit(request(i as usize)).await.unwrap();
    }
    let by_model = SpendQuery {
        tenant: Some("acme".into()),
        by: SpendBy::Model,
        ..SpendQuery::default()
    };
    let want = vec![
        SpendRow {
            key: "m0".into(),
            calls: 4,
            input_tokens: 400,
            cached_input_tokens: 40,
            output_tokens: 12,
            cost_micros: 4_012,
            ..SpendRow::default()
        },
        SpendRow {
            key: "m1".into(),
            calls: 3,
            input_tokens: 300,
            cached_input_tokens: 30,
            output_tokens: 9,
            cost_micros: 3_009,
            ..SpendRow::default()
        },
    ];
    assert_eq!(audit.spend(&by_model).unwrap(), want);
    let all = audit.spend(&SpendQuery::default()).unwrap();
    assert_eq!(all[1].key, "globex");
    assert_eq!(
        (all[1].calls, all[1].cost_micros, all[1].unpriced_calls),
        (3, 2_015, 1)
    );
    audit.shutdown().await;
    raw(dir.path())
        .execute_batch(
            "DROP TABLE audit_spend; DELETE FROM audit_meta WHERE key = 'spend_aggregate';",
        )
        .unwrap();
    let audit = open(dir.path());
    assert_eq!(audit.spend(&by_model).unwrap(), want);
    assert!(audit.verify().unwrap().ok());
}

#[tokio::test]
async fn wrong_master_key_cannot_open_the_trail() {
    let (dir, audit) = trail(3).await;
    audit.shutdown().await;
    let err = Audit::open(dir.path(), &master(8), AuditSync::Normal, None).unwrap_err();
    assert!(matches!(err, AuditError::WrongMasterKey { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("master key does not match this store"),
        "{err}"
    );
    assert!(matches!(
        verify_dir(dir.path(), &master(8)),
        Err(AuditError::WrongMasterKey { .. })
    ));
    // The right key still works.
    assert!(open(dir.path()).verify().unwrap().ok());
}

#[tokio::test]
async fn held_lock_refuses_commits_once_rows_cannot_reach_the_database_then_recovers() {
    let (dir, audit) = trail(3).await;
    let locker = raw(dir.path());
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    // The row is durable in the journal, so this commit is accepted...
    assert_eq!(audit.commit(request(4)).await.unwrap(), 4);
    // ...but it cannot be folded into audit.db, and from then on commits are refused, fast.
    audit.flush().await;
    let started = Instant::now();
    let err = audit.commit(request(5)).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    match &err {
        AuditError::Unavailable { reason } => {
            assert!(reason.contains("locked by another process"), "{reason}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    locker.execute_batch("COMMIT").unwrap();
    audit.flush().await;
    // The refused commit did not consume a seq or move the chain head; row 4 was kept.
    assert_eq!(audit.commit(request(5)).await.unwrap(), 5);
    let report = audit.verify().unwrap();
    assert!(report.ok() && report.rows_checked == 5, "{report:?}");
    let in_db: i64 = raw(dir.path())
        .query_row("SELECT count(*) FROM audit_events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(in_db, 5);
}

/// Unmounts (lazily, so a still-open file cannot block it) when the test ends.
struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_fails_commit_then_recovers() {
    if !needs::root("full_disk_fails_commit_then_recovers")
        || !needs::program("full_disk_fails_commit_then_recovers", "mount", "--version")
    {
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("tiny");
    std::fs::create_dir(&mnt).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("run mount");
    assert!(
        status.success(),
        "mount -t tmpfs failed although running as root"
    );
    let _guard = Mount(mnt.clone());

    let audit = open(&mnt);
    for i in 1..=5 {
        audit.commit(request(i)).await.unwrap();
    }
    // Fill the filesystem.
    let filler = mnt.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = [0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let mut handles = Vec::new();
    for i in 0..300 {
        let audit = audit.clone();
        handles.push(tokio::spawn(
            async move { audit.commit(request(100 + i)).await },
        ));
    }
    let mut ok = Vec::new();
    let mut full = 0;
    for h in handles {
        match h.await.unwrap() {
            Ok(seq) => ok.push(seq),
            Err(AuditError::Unavailable { reason }) => {
                assert!(reason.contains("disk full"), "{reason}");
                full += 1;
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        full > 0,
        "no commit failed on a full disk ({} succeeded)",
        ok.len()
    );
    std::fs::remove_file(&filler).unwrap();
    // Commits resume once the rows that could not be folded are in (within a fold interval).
    let deadline = Instant::now() + Duration::from_secs(5);
    let next = loop {
        match audit.commit(request(999)).await {
            Ok(seq) => break seq,
            Err(e) if Instant::now() < deadline => {
                assert!(e.to_string().contains("disk full"), "{e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("commits did not resume after space was freed: {e}"),
        }
    };
    ok.push(next);
    ok.sort_unstable();
    assert_eq!(ok, (6..6 + ok.len() as u64).collect::<Vec<_>>());
    let report = audit.verify().unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.last_seq, next);
    audit.shutdown().await;
}

#[tokio::test]
async fn prune_keeps_the_rest_verifiable() {
    let (dir, audit) = trail(10).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 11..=15 {
        audit.commit(request(i)).await.unwrap();
    }
    assert_eq!(audit.prune(Duration::from_millis(150)).await.unwrap(), 10);
    let report = audit.verify().unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!((report.checkpoint_seq, report.rows_checked), (10, 5));
    assert_eq!(audit.commit(request(16)).await.unwrap(), 16);
    assert!(audit.verify().unwrap().ok());

    // Deleting the first kept row is still caught.
    raw(dir.path())
        .execute("DELETE FROM audit_events WHERE seq = 11", [])
        .unwrap();
    assert_bad(&audit, 11);
    raw(dir.path())
        .execute("DELETE FROM audit_meta WHERE key = 'checkpoint'", [])
        .unwrap();
    assert_bad(&audit, 1);
}

#[tokio::test]
async fn prune_refuses_to_launder_an_edited_row() {
    let (dir, audit) = trail(6).await;
    raw(dir.path())
        .execute("UPDATE audit_events SET tenant = 'x' WHERE seq = 2", [])
        .unwrap();
    let err = audit.prune(Duration::ZERO).await.unwrap_err();
    assert!(matches!(err, AuditError::Tampered { .. }), "{err:?}");
    assert_bad(&audit, 2);
}

#[tokio::test]
async fn pruning_everything_and_automatic_retention() {
    let (dir, audit) = trail(8).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(audit.prune(Duration::ZERO).await.unwrap(), 8);
    let report = audit.verify().unwrap();
    assert!(report.ok() && report.rows_checked == 0, "{report:?}");
    audit.shutdown().await;
    // The chain continues from the checkpoint after a restart.
    let audit = open(dir.path());
    assert_eq!(audit.commit(request(9)).await.unwrap(), 9);
    audit.shutdown().await;

    tokio::time::sleep(Duration::from_millis(100)).await;
    let audit = Audit::open(
        dir.path(),
        &master(7),
        AuditSync::Full,
        Some(Duration::from_millis(50)),
    )
    .unwrap();
    // The maintenance thread runs its first retention pass soon after the open, on its own
    // schedule, so wait (bounded) for it rather than assume it ran before the first query.
    let mut pruned = false;
    for _ in 0..250 {
        audit.flush().await;
        if audit.query(&Filter::default()).unwrap().is_empty() {
            pruned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(pruned, "automatic retention did not prune the expired row");
    let report = audit.verify().unwrap();
    assert!(report.ok() && report.checkpoint_seq == 9, "{report:?}");
}

#[tokio::test]
async fn filters_and_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let audit = open(dir.path());
    let cred = |kind, id: &str, v| Event {
        tenant: Some("acme".into()),
        credential_id: Some(id.into()),
        credential_version: Some(v),
        ..Event::new(kind)
    };
    let fp_key = Secret::from_slice(&[1; 32]);
    let fp = fingerprint(&fp_key, b"{\"model\":\"gpt-4o\"}");
    audit
        .commit(cred(EventKind::CredentialCreated, "cred_a", 1))
        .await
        .unwrap(); // 1
    audit
        .commit(cred(EventKind::CredentialCreated, "cred_b", 1))
        .await
        .unwrap(); // 2
    audit
        .commit(Event {
            call_id: Some("call-x".into()),
            client_id: Some("cli_1".into()),
            fingerprint: Some(fp.clone()),
            ..cred(EventKind::RequestResolved, "cred_a", 1)
        })
        .await
        .unwrap(); // 3
    audit
        .commit(Event {
            call_id: Some("call-x".into()),
            detail: Some("from cred_a/v1 to cred_b/v1: 429".into()),
            ..cred(EventKind::RequestFailover, "cred_a", 1)
        })
        .await
        .unwrap(); // 4
    audit
        .commit(cred(EventKind::CredentialRotated, "cred_a", 2))
        .await
        .unwrap(); // 5
    audit.enqueue(Event {
        call_id: Some("call-x".into()),
        upstream_status: Some(200),
        input_tokens: Some(10),
        ..cred(EventKind::RequestCompleted, "cred_b", 1)
    }); // 6
    audit
        .commit(Event {
            tenant: Some("globex".into()),
            client_id: Some("cli_2".into()),
            detail: Some("scope_denied".into()),
            ..Event::new(EventKind::RequestDenied)
        })
        .await
        .unwrap(); // 7
    audit
        .commit(cred(EventKind::CredentialRevoked, "cred_a", 1))
        .await
        .unwrap(); // 8

    let seqs = |f: Filter| -> Vec<u64> { audit.query(&f).unwrap().iter().map(|r| r.seq).collect() };
    assert_eq!(seqs(Filter::default()), (1..=8).rev().collect::<Vec<_>>());
    assert_eq!(
        seqs(Filter {
            limit: Some(3),
            ..Filter::default()
        }),
        [8, 7, 6]
    );
    assert_eq!(
        seqs(Filter {
            tenant: Some("globex".into()),
            ..Filter::default()
        }),
        [7]
    );
    assert_eq!(
        seqs(Filter {
            credential_id: Some("cred_b".into()),
            ..Filter::default()
        }),
        [6, 2]
    );
    assert_eq!(
        seqs(Filter {
            call_id: Some("call-x".into()),
            ..Filter::default()
        }),
        [6, 4, 3]
    );
    assert_eq!(
        seqs(Filter {
            client_id: Some("cli_1".into()),
            ..Filter::default()
        }),
        [3]
    );
    assert_eq!(
        seqs(Filter {
            event: Some(EventKind::CredentialCreated),
            ..Filter::default()
        }),
        [2, 1]
    );
    assert_eq!(
        seqs(Filter {
            fingerprint: Some(fp.clone()),
            ..Filter::default()
        }),
        [3]
    );
    assert_eq!(
        seqs(Filter {
            tenant: Some("acme".into()),
            event: Some(EventKind::RequestFailover),
            ..Filter::default()
        }),
        [4]
    );
    let all = audit.query(&Filter::default()).unwrap();
    let t = all.iter().map(|r| r.time_ms).max().unwrap();
    assert_eq!(
        seqs(Filter {
            since_ms: Some(t + 1),
            ..Filter::default()
        }),
        Vec::<u64>::new()
    );
    assert_eq!(
        seqs(Filter {
            until_ms: Some(t),
            since_ms: Some(0),
            ..Filter::default()
        })
        .len(),
        8
    );

    let life: Vec<(u64, EventKind)> = audit
        .lifecycle("cred_a")
        .unwrap()
        .iter()
        .map(|r| (r.seq, r.event.kind))
        .collect();
    assert_eq!(
        life,
        [
            (1, EventKind::CredentialCreated),
            (3, EventKind::RequestResolved),
            (4, EventKind::RequestFailover),
            (5, EventKind::CredentialRotated),
            (8, EventKind::CredentialRevoked),
        ]
    );

    // JSON lines for the CLI.
    let json = serde_json::to_value(
        &audit
            .query(&Filter {
                call_id: Some("call-x".into()),
                limit: Some(1),
                ..Filter::default()
            })
            .unwrap()[0],
    )
    .unwrap();
    assert_eq!(json["event"], "request.completed");
    assert_eq!(json["seq"], 6);
    assert_eq!(json["upstream_status"], 200);
    assert!(json.get("model").is_none());
    assert!(json["time"].as_str().unwrap().ends_with('Z'));
    assert!(audit.verify().unwrap().ok());
}

#[tokio::test]
async fn invalid_events_are_refused_and_shutdown_fails_later_commits() {
    let (_dir, audit) = trail(1).await;
    let err = audit
        .commit(Event {
            fingerprint: Some("Bearer sk-proj-abc".into()),
            ..Event::new(EventKind::RequestResolved)
        })
        .await
        .unwrap_err();
    assert!(matches!(err, AuditError::InvalidEvent(_)));
    assert!(!err.to_string().contains("sk-proj"), "{err}");
    let other = audit.clone();
    audit.shutdown().await;
    assert!(matches!(
        other.commit(request(2)).await,
        Err(AuditError::Unavailable { .. })
    ));
}

#[tokio::test]
async fn files_hold_neither_the_audit_key_nor_the_master_key() {
    let dir = tempfile::tempdir().unwrap();
    let audit = open(dir.path());
    let event = Event {
        tenant: Some("tenant-marker-xyz".into()),
        ..request(1)
    };
    audit.commit(event).await.unwrap();
    // Every file in the state directory, while the row is still in the journal and after it
    // was folded into audit.db.
    let all_files = || {
        let mut bytes = Vec::new();
        for entry in std::fs::read_dir(dir.path()).unwrap().flatten() {
            bytes.extend(std::fs::read(entry.path()).unwrap_or_default());
        }
        bytes
    };
    let journaled = all_files();
    audit.shutdown().await;
    let folded = all_files();
    let wrapped: Vec<u8> = raw(dir.path())
        .query_row(
            "SELECT value FROM audit_meta WHERE key = 'mac_key'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let mac_key = master(7).unwrap(Purpose::AuditMacKey, &wrapped).unwrap();
    for bytes in [journaled, folded] {
        let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(
            contains(b"tenant-marker-xyz"),
            "sanity: the row was written"
        );
        assert!(!contains(&[7u8; 32]), "master key bytes");
        assert!(
            !contains(mac_key.expose_secret()),
            "the unwrapped audit MAC key"
        );
    }
}

/// An event of `kind` with every field set.
fn every_field(kind: EventKind, i: usize) -> Event {
    Event {
        call_id: Some(format!("call-{i}")),
        tenant: Some("acme".into()),
        client_id: Some("cli_1".into()),
        peer_uid: Some(1000),
        peer_pid: Some(4242),
        target: Some("openai".into()),
        model: Some("gpt-4o".into()),
        capability: Some("chat".into()),
        team: Some("search".into()),
        workflow: Some("batch".into()),
        credential_id: Some("cred_1".into()),
        credential_version: Some(2),
        fingerprint: Some("ab".repeat(32)),
        upstream_status: Some(200),
        latency_ms: Some(123),
        bytes_in: Some(456),
        bytes_out: Some(789),
        input_tokens: Some(10),
        output_tokens: Some(20),
        total_tokens: Some(30),
        detail: Some("detail".into()),
        flags: vec!["expired_key_warn".into()],
        cached_input_tokens: Some(4),
        cache_write_tokens: Some(2),
        cost_micros: Some(1234),
        ..Event::new(kind)
    }
}

#[tokio::test]
async fn every_field_of_every_event_kind_is_covered_by_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let audit = open(dir.path());
    // Each kind twice: once with every field set, once with only the kind, so both a changed
    // value and a value put into an empty column are tried.
    let mut rows = Vec::new();
    for (i, kind) in EventKind::ALL.into_iter().enumerate() {
        rows.push((kind, audit.commit(every_field(kind, i)).await.unwrap()));
        rows.push((kind, audit.commit(Event::new(kind)).await.unwrap()));
    }
    audit.flush().await;
    assert!(audit.verify().unwrap().ok());
    let conn = raw(dir.path());
    let columns: Vec<(String, String)> = conn
        .prepare("SELECT name, type FROM pragma_table_info('audit_events')")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut checked = 0;
    for (kind, seq) in &rows {
        for (column, kind_of_column) in &columns {
            if column == "seq" || column == "mac" {
                continue;
            }
            let changed = match (column.as_str(), kind_of_column.as_str()) {
                // Another valid kind, so the row still decodes and only the MAC can tell.
                ("event", _) => "CASE event WHEN 'request.completed' THEN 'request.denied' \
                                  ELSE 'request.completed' END"
                    .to_string(),
                ("fingerprint", _) => format!("'{}'", "cd".repeat(32)),
                ("flags", _) => {
                    "CASE WHEN flags IS NULL THEN 'forged' ELSE flags || ',forged' END".into()
                }
                (_, "INTEGER") => format!("COALESCE({column} + 1, 1)"),
                _ => format!("COALESCE({column} || 'x', 'x')"),
            };
            let original: rusqlite::types::Value = conn
                .query_row(
                    &format!("SELECT {column} FROM audit_events WHERE seq = ?1"),
                    [*seq as i64],
                    |r| r.get(0),
                )
                .unwrap();
            conn.execute(
                &format!("UPDATE audit_events SET {column} = {changed} WHERE seq = ?1"),
                [*seq as i64],
            )
            .unwrap();
            let report = audit.verify().unwrap();
            assert!(
                !report.ok() && report.first_bad_seq == Some(*seq),
                "editing {column} of a {kind} row (seq {seq}) went unnoticed: {report:?}"
            );
            conn.execute(
                &format!("UPDATE audit_events SET {column} = ?2 WHERE seq = ?1"),
                rusqlite::params![*seq as i64, original],
            )
            .unwrap();
            checked += 1;
        }
        assert!(audit.verify().unwrap().ok(), "restoring seq {seq} failed");
    }
    assert_eq!(checked, rows.len() * (columns.len() - 2));
    assert_eq!(
        columns.len(),
        29,
        "a new column must be covered above: {columns:?}"
    );
}
