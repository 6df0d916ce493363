//! Errors for policies built from bad settings.

use std::fmt;

/// One bad setting: which key, its value, and what it must be instead.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct InvalidSetting {
    /// The key, as it appears in configuration (`retry.multiplier`).
    pub key: &'static str,
    /// The rejected value, printed.
    pub value: String,
    /// What the value must be, phrased as advice.
    pub expected: &'static str,
}

impl fmt::Display for InvalidSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` = {}: {}", self.key, self.value, self.expected)
    }
}

/// Settings a policy could not be built from; one entry per problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid resilience settings: {}", join(.problems))]
#[non_exhaustive]
pub struct InvalidSettings {
    /// Every problem found, in field order.
    pub problems: Vec<InvalidSetting>,
}

fn join(problems: &[InvalidSetting]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Collects problems while checking a settings struct.
#[derive(Default)]
pub(crate) struct Checker {
    problems: Vec<InvalidSetting>,
}

impl Checker {
    pub(crate) fn check(
        &mut self,
        ok: bool,
        key: &'static str,
        value: impl fmt::Debug,
        expected: &'static str,
    ) {
        if !ok {
            self.problems.push(InvalidSetting {
                key,
                value: format!("{value:?}"),
                expected,
            });
        }
    }

    pub(crate) fn finish(self) -> Result<(), InvalidSettings> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(InvalidSettings {
                problems: self.problems,
            })
        }
    }
}
