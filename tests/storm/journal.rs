//! A writer's journal: every call, its parameters and request id, each
//! attempt's answer, and what the call finally did to the store.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost_types::Timestamp;
use tonic::{Code, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Method {
    Create,
    Update,
    Rotate,
    Revoke,
}

/// What one attempt of a call was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Acknowledged,
    /// A definite status: the call was decided and refused.
    Refused(Code),
    /// UNAVAILABLE saying "nothing was changed": definite too.
    NothingChanged,
    /// A transport error, UNAVAILABLE without "nothing was changed",
    /// DEADLINE_EXCEEDED and the like: it may or may not have committed.
    Ambiguous(Code),
}

pub fn classify(status: &Status) -> Answer {
    match status.code() {
        Code::Unavailable if status.message().contains("nothing was changed") => {
            Answer::NothingChanged
        }
        code @ (Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::Aborted
        | Code::OutOfRange
        | Code::ResourceExhausted
        | Code::Unauthenticated
        | Code::Unimplemented) => Answer::Refused(code),
        code => Answer::Ambiguous(code),
    }
}

#[derive(Debug, Clone)]
pub struct Attempt {
    pub sent: SystemTime,
    pub answered: SystemTime,
    pub answer: Answer,
    pub message: String,
}

/// What a call finally did to the store, as the writer established it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Committed,
    NotCommitted,
    /// Never resolved within [`RESOLVE_WITHIN`]: a failure.
    Unknown,
}

/// One journal entry.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: Method,
    /// The key it acted on (a create's, once known).
    pub key_id: Option<String>,
    pub request_id: Option<String>,
    /// The name an update set, or the etag it sent: for messages.
    pub params: String,
    pub attempts: Vec<Attempt>,
    pub effect: Effect,
    /// For an ambiguous call that committed: whether an attempt before the
    /// one that resolved it had committed (the retry was answered from the
    /// request id, or the read-back found the change).
    pub committed_before_resolution: Option<bool>,
    /// Problems the writer saw itself (a "nothing was changed" that had).
    pub problems: Vec<String>,
}

impl Call {
    pub fn new(
        method: Method,
        key_id: Option<String>,
        request_id: Option<String>,
        params: String,
    ) -> Call {
        Call {
            method,
            key_id,
            request_id,
            params,
            attempts: Vec::new(),
            effect: Effect::Unknown,
            committed_before_resolution: None,
            problems: Vec::new(),
        }
    }

    /// The call committed, the server dating the change `changed_at`; the
    /// attempt answered OK was sent at `sent`.
    pub fn committed_at(&mut self, changed_at: SystemTime, sent: SystemTime, what: &str) {
        if self.attempts.len() > 1 {
            // An earlier attempt made the change when it is older than
            // the attempt answered.
            self.committed_before_resolution = Some(changed_at < truncate_to_micros(sent));
        }
        check_nothing_changed(self, changed_at, what);
        self.effect = Effect::Committed;
    }

    pub fn first_answer(&self) -> &Answer {
        &self.attempts[0].answer
    }

    pub fn describe(&self) -> String {
        let answers: Vec<String> = self
            .attempts
            .iter()
            .map(|a| match &a.answer {
                Answer::Acknowledged => "OK".to_owned(),
                other => format!("{other:?} ({})", a.message),
            })
            .collect();
        format!(
            "{:?} key {} request id {} params {:?}: {} -> {:?}",
            self.method,
            self.key_id.as_deref().unwrap_or("-"),
            self.request_id.as_deref().unwrap_or("-"),
            self.params,
            answers.join(", "),
            self.effect
        )
    }
}

/// A key a writer created, as its journal says it is now. No `Debug`:
/// it holds the secret.
#[derive(Clone)]
pub struct Owned {
    pub key_id: String,
    pub secret: String,
    pub name: String,
    pub etag: String,
    /// An etag the key had before its last change: sending it must be ABORTED.
    pub stale_etag: Option<String>,
    pub revoked: bool,
    pub rotations: usize,
    pub updates: usize,
    /// The secrets rotations replaced: none may verify VALID.
    pub old_secrets: Vec<String>,
}

/// What a writer hands back: its journal and its keys' final state.
pub struct Journal {
    pub writer: usize,
    pub calls: Vec<Call>,
    pub keys: Vec<Owned>,
}

pub fn attempt(sent: SystemTime, answered: SystemTime, answer: Answer, message: &str) -> Attempt {
    Attempt {
        sent,
        answered,
        answer,
        message: message.to_owned(),
    }
}

/// A call answered "nothing was changed" on an attempt must not have made
/// the change then: the change's time (taken by the server when it began
/// the call) must fall outside every such attempt.
pub fn check_nothing_changed(call: &mut Call, changed_at: SystemTime, what: &str) {
    let offending: Vec<String> = call
        .attempts
        .iter()
        .filter(|a| a.answer == Answer::NothingChanged)
        .filter(|a| truncate_to_micros(a.sent) <= changed_at && changed_at <= a.answered)
        .map(|a| a.message.clone())
        .collect();
    for message in offending {
        call.problems.push(format!(
            "the key was {what} by an attempt answered \"nothing was changed\": {message}"
        ));
    }
}

pub fn to_system_time(at: Option<&Timestamp>) -> SystemTime {
    let at = at.expect("the timestamp is set");
    UNIX_EPOCH + Duration::new(at.seconds as u64, at.nanos as u32)
}

/// Both stores keep microseconds.
pub fn truncate_to_micros(at: SystemTime) -> SystemTime {
    let since = at.duration_since(UNIX_EPOCH).unwrap();
    UNIX_EPOCH + Duration::from_micros(since.as_micros() as u64)
}
