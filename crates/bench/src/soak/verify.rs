//! The verify tasks: VerifyKey on a mix of current, rotated-away, revoked
//! and unknown secrets.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tonic::transport::Channel;
use vilvik_keys_domain::{GeneratedKey, Pepper};

use super::calls::{Record, Shared, with_timeout};
use super::pool::{Class, MIX, Rng};
use crate::client::{code_name, verify_client, verify_request};

pub(super) async fn verify_task(
    shared: Arc<Shared>,
    channel: Channel,
    rate: f64,
    scope: String,
    salt: u64,
) -> anyhow::Result<Record> {
    let mut client = verify_client(&channel);
    let mut record = Record::default();
    let mut rng = Rng::seeded(salt);
    let unknown_pepper = Pepper::generate();
    let mut pace = (rate > 0.0).then(|| {
        let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        pace
    });
    while !shared.stop.load(Ordering::Relaxed) {
        if let Some(pace) = &mut pace {
            pace.tick().await;
        }
        let roll = rng.next() % 100;
        let mut class = Class::Unknown;
        let mut total = 0;
        for (c, share) in MIX {
            total += share;
            if roll < total {
                class = c;
                break;
            }
        }
        // Until the admin tasks have handed out such a secret, an unknown one.
        let picked = shared.pool.read().unwrap().pick(class, &mut rng);
        let (class, secret) = match picked {
            Some(picked) => picked,
            None => (
                Class::Unknown,
                GeneratedKey::generate(&unknown_pepper)
                    .expose_secret()
                    .to_owned(),
            ),
        };
        let request = with_timeout(verify_request(&secret, &scope));
        if let Ok(response) = shared
            .call(&mut record, "VerifyKey", client.verify_key(request))
            .await
        {
            *record
                .codes
                .entry((class, code_name(&response)))
                .or_default() += 1;
        }
    }
    Ok(record)
}
