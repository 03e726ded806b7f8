//! The secrets the admin tasks hand the verify tasks, by what they should
//! answer, and the mix the verify tasks present.

use std::collections::{HashMap, VecDeque};

/// Rotated-away and revoked secrets the verify tasks keep to present.
pub(super) const OLD_SECRETS_KEPT: usize = 512;

/// What a verify task presents, in percent of its calls.
pub(super) const MIX: [(Class, u64); 4] = [
    (Class::Current, 70),
    (Class::Rotated, 10),
    (Class::Revoked, 10),
    (Class::Unknown, 10),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Class {
    Current,
    Rotated,
    /// Rotated away so long ago that the store has pruned it
    /// (`rotated_secrets_kept` newer ones): the store knows it no more.
    Pruned,
    Revoked,
    Unknown,
}

impl Class {
    pub(super) fn name(self) -> &'static str {
        match self {
            Class::Current => "current",
            Class::Rotated => "rotated_away",
            Class::Pruned => "rotated_away_pruned",
            Class::Revoked => "revoked",
            Class::Unknown => "unknown",
        }
    }
}

/// The secrets the admin tasks hand the verify tasks.
pub(super) struct Pool {
    /// (key id, secret) of every key the soak holds active.
    pub(super) current: Vec<(String, String)>,
    pub(super) rotated: VecDeque<RotatedAway>,
    pub(super) revoked: VecDeque<String>,
    /// Rotations so far, per key id.
    pub(super) rotations: HashMap<String, u64>,
    /// The server's `rotated_secrets_kept`.
    pub(super) kept: u64,
}

pub(super) struct RotatedAway {
    pub(super) key_id: String,
    /// Which of its key's rotations replaced it (1 for the first).
    pub(super) rotation: u64,
    pub(super) secret: String,
}

impl Pool {
    pub(super) fn new(kept: u64) -> Self {
        Self {
            current: Vec::new(),
            rotated: VecDeque::new(),
            revoked: VecDeque::new(),
            rotations: HashMap::new(),
            kept,
        }
    }

    /// A secret of `class`, and its class now (a rotated-away secret may
    /// have been pruned since).
    pub(super) fn pick(&self, class: Class, rng: &mut Rng) -> Option<(Class, String)> {
        let pick = |n: usize, rng: &mut Rng| (rng.next() % n as u64) as usize;
        match class {
            Class::Current if !self.current.is_empty() => {
                Some((class, self.current[pick(self.current.len(), rng)].1.clone()))
            }
            Class::Rotated if !self.rotated.is_empty() => {
                let r = &self.rotated[pick(self.rotated.len(), rng)];
                // The store keeps the newest `kept` rotated-away secrets.
                let since = self.rotations.get(&r.key_id).copied().unwrap_or(0) - r.rotation;
                let class = if since >= self.kept {
                    Class::Pruned
                } else {
                    Class::Rotated
                };
                Some((class, r.secret.clone()))
            }
            Class::Revoked if !self.revoked.is_empty() => {
                Some((class, self.revoked[pick(self.revoked.len(), rng)].clone()))
            }
            _ => None,
        }
    }

    pub(super) fn retire(&mut self, key_id: &str, into_revoked: bool) -> Option<String> {
        let at = self.current.iter().position(|(id, _)| id == key_id)?;
        let (_, secret) = self.current.swap_remove(at);
        if into_revoked {
            self.revoked.push_back(secret.clone());
            if self.revoked.len() > OLD_SECRETS_KEPT {
                self.revoked.pop_front();
            }
        } else {
            let rotation = self.rotations.entry(key_id.to_owned()).or_default();
            *rotation += 1;
            self.rotated.push_back(RotatedAway {
                key_id: key_id.to_owned(),
                rotation: *rotation,
                secret: secret.clone(),
            });
            if self.rotated.len() > OLD_SECRETS_KEPT {
                self.rotated.pop_front();
            }
        }
        Some(secret)
    }
}

/// SplitMix64: enough to pick keys and operations, no dependency needed.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn seeded(salt: u64) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self(nanos ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retired_secrets_move_to_their_list_and_stay_bounded() {
        let mut pool = Pool::new(10);
        for i in 0..OLD_SECRETS_KEPT + 5 {
            pool.current.push((format!("k{i}"), format!("s{i}")));
            let into_revoked = i % 2 == 0;
            assert_eq!(
                pool.retire(&format!("k{i}"), into_revoked),
                Some(format!("s{i}"))
            );
        }
        assert!(pool.current.is_empty());
        assert_eq!(pool.retire("k0", true), None, "a key is retired once");
        assert_eq!(
            pool.revoked.len() + pool.rotated.len(),
            OLD_SECRETS_KEPT + 5
        );
        let even = |s: &str| s[1..].parse::<usize>().unwrap() % 2 == 0;
        assert!(pool.revoked.iter().all(|s| even(s)));
        assert!(pool.rotated.iter().all(|r| !even(&r.secret)));
        for _ in 0..OLD_SECRETS_KEPT {
            pool.current.push(("again".to_owned(), "x".to_owned()));
            pool.retire("again", true);
        }
        assert_eq!(pool.revoked.len(), OLD_SECRETS_KEPT);
    }

    #[test]
    fn a_secret_rotated_away_kept_times_ago_counts_as_pruned() {
        let mut pool = Pool::new(2);
        let mut rng = Rng::seeded(1);
        pool.current.push(("k".to_owned(), "s0".to_owned()));
        pool.retire("k", false);
        assert_eq!(
            pool.pick(Class::Rotated, &mut rng),
            Some((Class::Rotated, "s0".to_owned()))
        );
        for i in 1..=2 {
            pool.current.push(("k".to_owned(), format!("s{i}")));
            pool.retire("k", false);
        }
        // s0 has two newer rotated-away secrets: the store kept only those.
        let classes: Vec<_> = (0..200)
            .filter_map(|_| pool.pick(Class::Rotated, &mut rng))
            .map(|(class, secret)| (secret, class))
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .collect();
        assert_eq!(
            classes,
            [
                ("s0".to_owned(), Class::Pruned),
                ("s1".to_owned(), Class::Rotated),
                ("s2".to_owned(), Class::Rotated),
            ]
        );
        assert_eq!(pool.pick(Class::Revoked, &mut rng), None);
    }
}
