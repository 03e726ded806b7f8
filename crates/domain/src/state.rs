//! Key lifecycle states, account tiers and audit actions.

use std::fmt;
use std::str::FromStr;

use time::OffsetDateTime;

/// Where a key stands at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active,
    Expired,
    Revoked,
}

impl KeyState {
    /// Revocation wins over expiry: a revoked key stays revoked.
    pub fn at(
        now: OffsetDateTime,
        expires_at: Option<OffsetDateTime>,
        revoked_at: Option<OffsetDateTime>,
    ) -> Self {
        if revoked_at.is_some() {
            Self::Revoked
        } else if expires_at.is_some_and(|at| at <= now) {
            Self::Expired
        } else {
            Self::Active
        }
    }
}

/// An account's plan; it decides how many active keys the account may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Tier {
    #[default]
    Free,
    Premium,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Premium => "premium",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a tier: use 'free' or 'premium'")]
pub struct UnknownTier(pub String);

impl FromStr for Tier {
    type Err = UnknownTier;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "free" => Ok(Tier::Free),
            "premium" => Ok(Tier::Premium),
            other => Err(UnknownTier(crate::excerpt(other))),
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many active keys each tier may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierLimits {
    pub free: u32,
    pub premium: u32,
}

impl Default for TierLimits {
    fn default() -> Self {
        Self {
            free: 3,
            premium: 25,
        }
    }
}

impl TierLimits {
    pub fn for_tier(&self, tier: Tier) -> u32 {
        match tier {
            Tier::Free => self.free,
            Tier::Premium => self.premium,
        }
    }
}

/// What an audit event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditAction {
    Created,
    Updated,
    Rotated,
    Revoked,
    TierChanged,
    /// The operator set (or cleared) the account's grantable scopes.
    GrantableScopesChanged,
}

impl AuditAction {
    /// Every action.
    pub const ALL: [AuditAction; 6] = [
        AuditAction::Created,
        AuditAction::Updated,
        AuditAction::Rotated,
        AuditAction::Revoked,
        AuditAction::TierChanged,
        AuditAction::GrantableScopesChanged,
    ];

    /// The action's name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Created => "created",
            AuditAction::Updated => "updated",
            AuditAction::Rotated => "rotated",
            AuditAction::Revoked => "revoked",
            AuditAction::TierChanged => "tier_changed",
            AuditAction::GrantableScopesChanged => "grantable_scopes_changed",
        }
    }
}

/// A name that is not an [`AuditAction`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{0}' is not an audit action: use created, updated, rotated, revoked, tier_changed or \
     grantable_scopes_changed"
)]
pub struct UnknownAuditAction(pub String);

impl FromStr for AuditAction {
    type Err = UnknownAuditAction;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AuditAction::ALL
            .into_iter()
            .find(|action| action.as_str() == s)
            .ok_or_else(|| UnknownAuditAction(crate::excerpt(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn state_follows_revocation_then_expiry() {
        let now = datetime!(2026-11-26 10:00 UTC);
        let past = datetime!(2026-01-01 0:00 UTC);
        let future = datetime!(2027-01-01 0:00 UTC);
        assert_eq!(KeyState::at(now, None, None), KeyState::Active);
        assert_eq!(KeyState::at(now, Some(future), None), KeyState::Active);
        assert_eq!(KeyState::at(now, Some(now), None), KeyState::Expired);
        assert_eq!(KeyState::at(now, Some(past), None), KeyState::Expired);
        assert_eq!(KeyState::at(now, Some(past), Some(past)), KeyState::Revoked);
    }

    #[test]
    fn audit_actions_parse_from_their_names_and_nothing_else() {
        for action in AuditAction::ALL {
            assert_eq!(action.as_str().parse::<AuditAction>(), Ok(action));
        }
        let err = "deleted".parse::<AuditAction>().unwrap_err();
        assert_eq!(err, UnknownAuditAction("deleted".into()));
        let message = err.to_string();
        assert!(
            message.contains("'deleted' is not an audit action"),
            "{message}"
        );
        for action in AuditAction::ALL {
            assert!(message.contains(action.as_str()), "{message}");
        }
    }

    #[test]
    fn tiers_parse_and_have_default_limits() {
        assert_eq!("premium".parse::<Tier>().unwrap(), Tier::Premium);
        assert!(
            "gold"
                .parse::<Tier>()
                .unwrap_err()
                .to_string()
                .contains("free")
        );
        assert_eq!(TierLimits::default().for_tier(Tier::Free), 3);
        assert_eq!(TierLimits::default().for_tier(Tier::Premium), 25);
    }
}
