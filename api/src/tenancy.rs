//! What the API holds for every team on a shared installation, beyond team scoping: the control
//! plane's own host names, which no application may claim, and each team's budget of server
//! validations — a validation connects to a host and port of the team's choosing, so it is a
//! probe of the network the workers sit in, and is rationed.

use std::time::Duration;
use uuid::Uuid;
use zpanel_domain::values::DomainName;

/// Server validations and checks a team may ask for at once.
pub const VALIDATION_BURST: u32 = 10;
/// How long a team waits for each further validation once its burst is spent.
pub const VALIDATION_EVERY: Duration = Duration::from_secs(6);

/// The installation's tenancy rules (see the module docs).
#[derive(Debug)]
pub struct Tenancy {
    reserved: Vec<DomainName>,
    validations: crate::limits::RateLimiter,
}

impl Default for Tenancy {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl Tenancy {
    /// Rules reserving `reserved` (`ZPANEL_PUBLIC_HOST`) for the control plane.
    #[must_use]
    pub fn new(reserved: Vec<DomainName>) -> Self {
        Self { reserved, validations: crate::limits::RateLimiter::one_every(VALIDATION_EVERY, VALIDATION_BURST) }
    }

    /// The host names no application may claim.
    #[must_use]
    pub fn reserved(&self) -> &[DomainName] {
        &self.reserved
    }

    /// Takes one server validation from `team`'s budget.
    ///
    /// # Errors
    /// How long until the next one would be accepted.
    pub fn validation(&self, team: Uuid) -> Result<(), Duration> {
        self.validations.take(team)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_team_gets_its_burst_of_validations_then_waits_and_others_do_not() {
        let tenancy = Tenancy::default();
        let team = Uuid::now_v7();
        for _ in 0..VALIDATION_BURST {
            assert!(tenancy.validation(team).is_ok());
        }
        let wait = tenancy.validation(team).expect_err("the burst is spent");
        assert!(wait > Duration::ZERO && wait <= VALIDATION_EVERY, "{wait:?}");
        assert!(tenancy.validation(Uuid::now_v7()).is_ok(), "another team has its own budget");
    }
}
