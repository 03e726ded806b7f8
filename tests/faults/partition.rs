//! One verify node cut off from the database by the proxy in front of it
//! (a silent black hole, or every connection reset), while the admin node
//! and the other verify node still reach it. A key is revoked through the
//! admin node: the node that can read the change log rejects it within
//! 1 s; the cut-off node accepts it for no longer than the bound plus one
//! deadline after the cut, and never again after that (UNAVAILABLE until
//! the partition heals, REVOKED after).

use std::time::{Duration, Instant};

use vilvik_keys_test_db::ProxyMode;

use crate::harness::{
    ACCEPT_AT_MOST, Answer, Faults, Findings, STALENESS_BOUND, Watch, secs, watch,
};

/// How soon a node that reaches the database must reject a revoked key.
const REJECT_WITHIN: Duration = Duration::from_secs(1);
/// How long the cut-off node may take to answer REVOKED once healed.
const HEALED_WITHIN: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow fault test: run by .ci/run"]
async fn a_black_holed_node_accepts_a_revoked_key_no_longer_than_the_bound() {
    partition(ProxyMode::BlackHole, "black hole").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow fault test: run by .ci/run"]
async fn a_reset_node_accepts_a_revoked_key_no_longer_than_the_bound() {
    partition(ProxyMode::Reset, "reset").await;
}

async fn partition(mode: ProxyMode, scenario: &str) {
    let Some((faults, keys)) = Faults::start(&["revoked", "bystander"]).await else {
        return;
    };
    let [revoked, bystander] = &keys[..] else {
        unreachable!("two keys asked for")
    };

    let cut = Instant::now();
    faults.proxy.set_mode(mode);
    faults.revoke(revoked).await;
    let acked = cut.elapsed();
    eprintln!(
        "[{scenario}] revoke acknowledged {} s after the cut",
        secs(acked)
    );

    let observe = ACCEPT_AT_MOST + Duration::from_millis(1_500);
    let timelines = watch(
        scenario,
        vec![
            Watch::new(&faults.direct, revoked, "revoked key"),
            Watch::new(&faults.cut_off, revoked, "revoked key"),
            Watch::new(&faults.direct, bystander, "cached key"),
        ],
        cut,
        observe,
        |_| false,
    )
    .await;
    let [direct, cut_off, direct_bystander] = &timelines[..] else {
        unreachable!("three targets, three timelines")
    };

    let mut findings = Findings::default();
    // The node that reaches the database.
    match direct.first(Answer::Revoked) {
        Some(revoked) => {
            let after_ack = revoked.received.saturating_sub(acked);
            eprintln!(
                "[{scenario}] direct node: REVOKED {} s after the acknowledgement",
                secs(after_ack)
            );
            findings.check(after_ack <= REJECT_WITHIN, || {
                format!(
                    "direct node: rejected the revoked key {} s after the acknowledgement \
                     (at most {} s)",
                    secs(after_ack),
                    secs(REJECT_WITHIN)
                )
            });
        }
        None => findings.check(false, || {
            format!(
                "direct node: never answered REVOKED within {} s",
                secs(observe)
            )
        }),
    }
    findings.never_valid_again(direct, "it had rejected the key");
    findings.only(
        direct_bystander,
        &[Answer::Valid],
        "VALID (the key is not revoked)",
    );

    // The cut-off node.
    match cut_off.first_not_valid() {
        None => findings.check(false, || {
            format!(
                "cut-off node: accepted the revoked key for the whole {} s observed \
                 (bound {} s + deadline: at most {} s after the cut)",
                secs(observe),
                secs(STALENESS_BOUND),
                secs(ACCEPT_AT_MOST)
            )
        }),
        Some(stopped) => {
            let last_valid = cut_off.last_valid().map_or(Duration::ZERO, |p| p.sent);
            eprintln!(
                "[{scenario}] cut-off node: accepted the revoked key until {} s after the cut \
                 ({} s after the acknowledgement), first {:?} asked at {} s, answered at {} s",
                secs(last_valid),
                secs(last_valid.saturating_sub(acked)),
                stopped.answer,
                secs(stopped.sent),
                secs(stopped.received)
            );
            findings.check(last_valid <= ACCEPT_AT_MOST, || {
                format!(
                    "cut-off node: accepted the revoked key {} s after the cut (at most {} s)",
                    secs(last_valid),
                    secs(ACCEPT_AT_MOST)
                )
            });
        }
    }
    findings.never_valid_again(cut_off, "it had stopped accepting the revoked key");
    findings.only(
        cut_off,
        &[Answer::Valid, Answer::Unavailable, Answer::Revoked],
        "VALID, UNAVAILABLE or REVOKED",
    );

    // Healed: REVOKED, with no VALID on the way.
    let healed = Instant::now();
    faults.proxy.set_mode(ProxyMode::Pass);
    let after = watch(
        scenario,
        vec![Watch::new(
            &faults.cut_off,
            revoked,
            "revoked key after the heal",
        )],
        healed,
        HEALED_WITHIN,
        |answer| answer == Answer::Revoked,
    )
    .await;
    let after = &after[0];
    match after.first(Answer::Revoked) {
        Some(revoked) => eprintln!(
            "[{scenario}] cut-off node: REVOKED {} s after the heal",
            secs(revoked.received)
        ),
        None => findings.check(false, || {
            format!(
                "cut-off node: not REVOKED within {} s of the heal",
                secs(HEALED_WITHIN)
            )
        }),
    }
    findings.only(
        after,
        &[Answer::Unavailable, Answer::Revoked],
        "UNAVAILABLE or REVOKED",
    );
    findings.assert_none(scenario);
}
