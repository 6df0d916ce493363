//! A password that never prints.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The text that stands in for a secret wherever one would be shown.
pub const REDACTED: &str = "********";

/// A database password.
///
/// `Debug`, `Display` and `Serialize` all print [`REDACTED`]; the only way to
/// read the value is [`Password::expose`], which the pool calls when it
/// connects.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Wraps a password.
    pub fn new(value: impl Into<String>) -> Self {
        Password(value.into())
    }

    /// The password itself. Call only where it is handed to the server.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Password({REDACTED})")
    }
}

impl fmt::Display for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Password {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Password {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Password)
    }
}
