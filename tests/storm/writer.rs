//! One writer: its own keys, its own connection, and its journal of every
//! call. Creates and rotations carry request ids and are retried with
//! them until answered; updates and revocations that are not answered OK
//! are read back.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use prost_types::FieldMask;
use tonic::transport::Channel;
use tonic::{Code, Status};
use vilvik_keys::proto;
use vilvik_keys::proto::key_admin_client::KeyAdminClient;
use vilvik_keys_domain::RequestId;
use vilvik_keys_test_support::requests::get;
use vilvik_keys_test_support::{bearer, lazy_channel};

use crate::journal::{
    Answer, Call, Effect, Journal, Method, Owned, attempt, classify, to_system_time,
};
use crate::{CALL_TIMEOUT, KEYS_PER_WRITER, RESOLVE_WITHIN, Rng, SCOPE};

pub struct Writer {
    number: usize,
    client: KeyAdminClient<Channel>,
    credential: String,
    rng: Rng,
    keys: Vec<Owned>,
    journal: Vec<Call>,
    names: usize,
}

impl Writer {
    pub fn new(number: usize, admin: SocketAddr, credential: &str, seed: u64) -> Writer {
        Writer {
            number,
            client: KeyAdminClient::new(lazy_channel(admin, Some(CALL_TIMEOUT))),
            credential: credential.to_owned(),
            rng: Rng::seeded(seed),
            keys: Vec::new(),
            journal: Vec::new(),
            names: 0,
        }
    }

    pub async fn run(mut self, stop: Arc<AtomicBool>) -> Journal {
        // Bounded: the storm lasts well under this many calls.
        for _ in 0..100_000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let active: Vec<usize> = (0..self.keys.len())
                .filter(|&i| !self.keys[i].revoked)
                .collect();
            let roll = self.rng.next() % 100;
            if active.len() < 2 || (roll < 25 && active.len() < KEYS_PER_WRITER) {
                self.create().await;
                continue;
            }
            let index = active[(self.rng.next() % active.len() as u64) as usize];
            if active.len() >= KEYS_PER_WRITER || roll >= 90 {
                self.revoke(index).await;
            } else if roll < 65 {
                self.update(index).await;
            } else {
                self.rotate(index).await;
            }
        }
        Journal {
            writer: self.number,
            calls: self.journal,
            keys: self.keys,
        }
    }

    fn new_name(&mut self) -> String {
        self.names += 1;
        format!("w{}-{}", self.number, self.names)
    }

    async fn backoff(attempt: usize) {
        tokio::time::sleep(Duration::from_millis((50 * attempt as u64).min(500))).await;
    }

    /// Sends `message` with `send` again and again (a retry carries the
    /// same request id) until it is answered OK or refused, or
    /// [`RESOLVE_WITHIN`] passes, noting each attempt in `call`. The OK
    /// answer, with when its attempt was sent.
    async fn until_answered<M: Clone, R, Fut>(
        &self,
        call: &mut Call,
        message: M,
        send: impl Fn(KeyAdminClient<Channel>, tonic::Request<M>) -> Fut,
    ) -> Option<(R, SystemTime)>
    where
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let began = Instant::now();
        loop {
            let sent = SystemTime::now();
            let request = bearer(message.clone(), &self.credential);
            let result = send(self.client.clone(), request).await;
            let answered = SystemTime::now();
            match result {
                Ok(response) => {
                    call.attempts
                        .push(attempt(sent, answered, Answer::Acknowledged, ""));
                    return Some((response.into_inner(), sent));
                }
                Err(status) => {
                    let answer = classify(&status);
                    call.attempts
                        .push(attempt(sent, answered, answer.clone(), status.message()));
                    if let Answer::Refused(_) = answer {
                        call.effect = Effect::NotCommitted;
                        return None;
                    }
                    if began.elapsed() > RESOLVE_WITHIN {
                        return None;
                    }
                    Self::backoff(call.attempts.len()).await;
                }
            }
        }
    }

    /// Sends `message` with `send` once, noting the attempt in `call` (and
    /// the call committed when answered OK): the answer, or how the call
    /// was answered otherwise.
    async fn once<M, R, Fut>(
        &self,
        call: &mut Call,
        message: M,
        send: impl FnOnce(KeyAdminClient<Channel>, tonic::Request<M>) -> Fut,
    ) -> Result<R, Answer>
    where
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let sent = SystemTime::now();
        let result = send(self.client.clone(), bearer(message, &self.credential)).await;
        let answered = SystemTime::now();
        match result {
            Ok(response) => {
                call.attempts
                    .push(attempt(sent, answered, Answer::Acknowledged, ""));
                call.effect = Effect::Committed;
                Ok(response.into_inner())
            }
            Err(status) => {
                let answer = classify(&status);
                call.attempts
                    .push(attempt(sent, answered, answer.clone(), status.message()));
                Err(answer)
            }
        }
    }

    /// CreateKey with a request id, retried with it until answered.
    async fn create(&mut self) {
        let name = self.new_name();
        let request_id = RequestId::generate().as_str().to_owned();
        let mut call = Call::new(Method::Create, None, Some(request_id.clone()), name.clone());
        let message = proto::CreateKeyRequest {
            name: name.clone(),
            scopes: vec![SCOPE.to_owned()],
            request_id,
            ..Default::default()
        };
        let answered = self
            .until_answered(&mut call, message, async |mut client, request| {
                client.create_key(request).await
            })
            .await;
        if let Some((response, sent)) = answered {
            let key = response.key.expect("CreateKey answers the key");
            call.committed_at(to_system_time(key.created_at.as_ref()), sent, "created");
            call.key_id = Some(key.key_id.clone());
            self.keys.push(Owned {
                key_id: key.key_id,
                secret: response.secret,
                name,
                etag: key.etag,
                stale_etag: None,
                old_secrets: Vec::new(),
                revoked: false,
                rotations: 0,
                updates: 0,
            });
        }
        self.journal.push(call);
    }

    /// RotateKey with a request id (and sometimes the etag), retried with
    /// the same fields until answered.
    async fn rotate(&mut self, index: usize) {
        let key = self.keys[index].clone();
        let with_etag = self.rng.chance(50);
        let request_id = RequestId::generate().as_str().to_owned();
        let etag = if with_etag {
            key.etag.clone()
        } else {
            String::new()
        };
        let mut call = Call::new(
            Method::Rotate,
            Some(key.key_id.clone()),
            Some(request_id.clone()),
            format!("etag {etag:?}"),
        );
        let message = proto::RotateKeyRequest {
            key_id: key.key_id.clone(),
            request_id,
            etag,
        };
        let answered = self
            .until_answered(&mut call, message, async |mut client, request| {
                client.rotate_key(request).await
            })
            .await;
        if let Some((response, sent)) = answered {
            let rotated = response.key.expect("RotateKey answers the key");
            call.committed_at(to_system_time(rotated.rotated_at.as_ref()), sent, "rotated");
            let owned = &mut self.keys[index];
            let old = std::mem::replace(&mut owned.secret, response.secret);
            owned.old_secrets.push(old);
            owned.stale_etag = Some(std::mem::replace(&mut owned.etag, rotated.etag));
            owned.rotations += 1;
        }
        self.journal.push(call);
    }

    /// UpdateKey of the name, with the current etag, a stale one (which
    /// must be ABORTED) or none. Anything but OK is read back.
    async fn update(&mut self, index: usize) {
        let key = self.keys[index].clone();
        let name = self.new_name();
        let roll = self.rng.next() % 100;
        let (etag, stale) = match &key.stale_etag {
            Some(stale) if roll < 15 => (stale.clone(), true),
            _ if roll < 55 => (key.etag.clone(), false),
            _ => (String::new(), false),
        };
        let mut call = Call::new(
            Method::Update,
            Some(key.key_id.clone()),
            None,
            format!("name {name:?} etag {etag:?}"),
        );
        let message = proto::UpdateKeyRequest {
            key_id: key.key_id.clone(),
            name: name.clone(),
            etag,
            update_mask: Some(FieldMask {
                paths: vec!["name".to_owned()],
            }),
            ..Default::default()
        };
        let result = self
            .once(&mut call, message, async |mut client, request| {
                client.update_key(request).await
            })
            .await;
        match result {
            Ok(updated) => {
                if stale {
                    call.problems
                        .push("an update with a stale etag was acknowledged".to_owned());
                }
                let owned = &mut self.keys[index];
                owned.name = name;
                owned.stale_etag = Some(std::mem::replace(&mut owned.etag, updated.etag));
                owned.updates += 1;
            }
            Err(answer) => {
                if stale && matches!(answer, Answer::Refused(code) if code != Code::Aborted) {
                    call.problems
                        .push(format!("a stale etag was answered {answer:?}, not ABORTED"));
                }
                let renamed = |now: &proto::Key| now.name == name;
                let committed = self
                    .resolve(index, &mut call, &answer, renamed, "the update was made")
                    .await;
                if committed == Some(true) {
                    let owned = &mut self.keys[index];
                    owned.name = name;
                    owned.updates += 1;
                }
            }
        }
        self.journal.push(call);
    }

    /// RevokeKey (sometimes with the etag); anything but OK is read back.
    async fn revoke(&mut self, index: usize) {
        let key = self.keys[index].clone();
        let etag = if self.rng.chance(50) {
            key.etag.clone()
        } else {
            String::new()
        };
        let mut call = Call::new(
            Method::Revoke,
            Some(key.key_id.clone()),
            None,
            format!("etag {etag:?}"),
        );
        let message = proto::RevokeKeyRequest {
            key_id: key.key_id.clone(),
            reason: "storm".to_owned(),
            etag,
        };
        let result = self
            .once(&mut call, message, async |mut client, request| {
                client.revoke_key(request).await
            })
            .await;
        match result {
            Ok(_) => self.keys[index].revoked = true,
            Err(answer) => {
                let revoked = |now: &proto::Key| now.state() == proto::KeyState::Revoked;
                let committed = self
                    .resolve(index, &mut call, &answer, revoked, "the key was revoked")
                    .await;
                if let Some(committed) = committed {
                    self.keys[index].revoked = committed;
                }
            }
        }
        self.journal.push(call);
    }

    /// After a call answered `answer` (not OK), reads key `index` back to
    /// learn whether the call committed (`committed` of the key as read)
    /// and notes it in `call`: an answer other than an ambiguous one for a
    /// change that was `made` is a problem. Whether it committed; `None`
    /// when the key could not be read back.
    async fn resolve(
        &mut self,
        index: usize,
        call: &mut Call,
        answer: &Answer,
        committed: impl Fn(&proto::Key) -> bool,
        made: &str,
    ) -> Option<bool> {
        let key_id = self.keys[index].key_id.clone();
        let now = self.read_back(&key_id, call).await?;
        let committed = committed(&now);
        call.effect = if committed {
            Effect::Committed
        } else {
            Effect::NotCommitted
        };
        let ambiguous = matches!(answer, Answer::Ambiguous(_));
        if committed && !ambiguous {
            call.problems
                .push(format!("answered {answer:?} but {made}"));
        }
        if ambiguous {
            call.committed_before_resolution = Some(committed);
        }
        let owned = &mut self.keys[index];
        if now.etag != owned.etag {
            owned.stale_etag = Some(std::mem::replace(&mut owned.etag, now.etag));
        }
        Some(committed)
    }

    /// GetKey until it answers (the server or the database may be down).
    async fn read_back(&mut self, key_id: &str, call: &mut Call) -> Option<proto::Key> {
        let began = Instant::now();
        for attempt in 1.. {
            let result = self
                .client
                .get_key(bearer(get(key_id), &self.credential))
                .await;
            match result {
                Ok(key) => return Some(key.into_inner()),
                Err(status) if matches!(classify(&status), Answer::Refused(_)) => {
                    call.problems
                        .push(format!("the read-back was refused: {status:?}"));
                    return None;
                }
                Err(_) if began.elapsed() > RESOLVE_WITHIN => return None,
                Err(_) => Self::backoff(attempt).await,
            }
        }
        None
    }
}
