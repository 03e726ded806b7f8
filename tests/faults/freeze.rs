//! The whole cluster frozen (SIGSTOP of the postmaster and every backend):
//! connections stay open and nothing answers, so no revoke is possible.
//! Cached keys keep verifying until the staleness bound since the last
//! confirmed read, then verifies fail closed; after the thaw they verify
//! again.

use std::time::{Duration, Instant};

use crate::harness::{
    ACCEPT_AT_MOST, Answer, CONSISTENCY_CHECK, Faults, Findings, STALENESS_BOUND, Watch, secs,
    watch,
};

/// Slack in the "not before" direction: a loaded machine may run a
/// node's last confirmed read a little before the freeze.
const EARLY_SLACK: Duration = Duration::from_millis(750);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow fault test: run by .ci/run"]
async fn a_frozen_database_is_trusted_for_the_bound_then_verifies_fail_closed() {
    let Some((mut faults, keys)) = Faults::start(&["frozen"]).await else {
        return;
    };
    let key = &keys[0];

    let frozen = Instant::now();
    faults.cluster.freeze();
    let observe = ACCEPT_AT_MOST + Duration::from_millis(1_500);
    let timelines = watch(
        "freeze",
        vec![
            Watch::new(&faults.direct, key, "cached key"),
            Watch::new(&faults.cut_off, key, "cached key"),
        ],
        frozen,
        observe,
        |_| false,
    )
    .await;
    faults.cluster.thaw();
    let thawed = Instant::now();

    let mut findings = Findings::default();
    for timeline in &timelines {
        let label = &timeline.label;
        let Some(stopped) = timeline.first_not_valid() else {
            findings.check(false, || {
                format!(
                    "{label}: answered VALID for the whole {} s the database was frozen \
                     (bound {} s + deadline: at most {} s)",
                    secs(observe),
                    secs(STALENESS_BOUND),
                    secs(ACCEPT_AT_MOST)
                )
            });
            continue;
        };
        let last_valid = timeline.last_valid().map_or(Duration::ZERO, |p| p.sent);
        eprintln!(
            "[freeze] {label}: VALID until {} s after the freeze, first {:?} asked at {} s, answered at {} s",
            secs(last_valid),
            stopped.answer,
            secs(stopped.sent),
            secs(stopped.received)
        );
        findings.check(last_valid <= ACCEPT_AT_MOST, || {
            format!(
                "{label}: still VALID {} s after the freeze (at most {} s)",
                secs(last_valid),
                secs(ACCEPT_AT_MOST)
            )
        });
        let earliest = STALENESS_BOUND
            .saturating_sub(CONSISTENCY_CHECK)
            .saturating_sub(EARLY_SLACK);
        findings.check(stopped.received >= earliest, || {
            format!(
                "{label}: stopped trusting its cache {} s after the freeze, before the bound \
                 (expected no earlier than {} s)",
                secs(stopped.received),
                secs(earliest)
            )
        });
        findings.never_valid_again(timeline, "failing closed, while still frozen");
        findings.only(
            timeline,
            &[Answer::Valid, Answer::Unavailable],
            "VALID or UNAVAILABLE",
        );
    }

    // Thawed: every node verifies the key again within a few seconds.
    let recovered = watch(
        "thaw",
        vec![
            Watch::new(&faults.direct, key, "cached key after the thaw"),
            Watch::new(&faults.cut_off, key, "cached key after the thaw"),
        ],
        thawed,
        Duration::from_secs(5),
        |answer| answer == Answer::Valid,
    )
    .await;
    for timeline in &recovered {
        let label = &timeline.label;
        match timeline.first(Answer::Valid) {
            Some(valid) => eprintln!(
                "[thaw] {label}: VALID {} s after the thaw",
                secs(valid.received)
            ),
            None => findings.check(false, || {
                format!("{label}: not VALID within 5 s of the thaw")
            }),
        }
    }
    findings.assert_none("freeze");
}
