//! What the module decided for a request: `$mesh_decision`, the refusal log line and
//! `mesh_requests_total{decision}` all name it the same way.

/// What the module decided for a request (`$mesh_decision`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
    Unauthenticated,
    RateLimited,
    WouldDeny,
    WouldRateLimit,
}

impl Decision {
    /// Every decision, in counter order (`Decision::index`).
    pub const ALL: [Decision; 6] = [
        Decision::Allow,
        Decision::Deny,
        Decision::Unauthenticated,
        Decision::RateLimited,
        Decision::WouldDeny,
        Decision::WouldRateLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Unauthenticated => "unauthenticated",
            Decision::RateLimited => "rate_limited",
            Decision::WouldDeny => "would_deny",
            Decision::WouldRateLimit => "would_rate_limit",
        }
    }

    /// Its place in [`Decision::ALL`] (a counter's index).
    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_in_index_order() {
        for (i, d) in Decision::ALL.iter().enumerate() {
            assert_eq!(d.index(), i);
        }
        assert_eq!(Decision::WouldRateLimit.as_str(), "would_rate_limit");
    }
}
