//! Checksums that survive a change of line endings.
//!
//! sqlx stores the SHA-384 of the file exactly as read. pgstack writes the
//! SHA-384 of the file with CRLF turned into LF (the same bytes for a file
//! that already uses LF, so sqlx's `Migrator` agrees on such files), and
//! accepts a recorded checksum when it equals the digest of the file as read,
//! with LF line endings, or with CRLF line endings.

use sha2::{Digest, Sha384};

/// The digests of one script.
#[derive(Clone, Debug)]
pub(crate) struct Checksums {
    /// What pgstack records: SHA-384 of the text with LF line endings.
    pub(crate) canonical: Vec<u8>,
    /// SHA-384 of the text exactly as read (what sqlx records).
    raw: Vec<u8>,
    /// SHA-384 of the text with CRLF line endings (what sqlx records from a
    /// checkout that converted the file to CRLF).
    crlf: Vec<u8>,
}

impl Checksums {
    pub(crate) fn of(sql: &str) -> Self {
        let lf = sql.replace("\r\n", "\n");
        let crlf = lf.replace('\n', "\r\n");
        Checksums {
            canonical: Sha384::digest(lf.as_bytes()).to_vec(),
            raw: Sha384::digest(sql.as_bytes()).to_vec(),
            crlf: Sha384::digest(crlf.as_bytes()).to_vec(),
        }
    }

    /// Whether a recorded checksum belongs to this script, ignoring line endings.
    pub(crate) fn accepts(&self, recorded: &[u8]) -> bool {
        recorded == self.canonical.as_slice()
            || recorded == self.raw.as_slice()
            || recorded == self.crlf.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::Checksums;
    use sha2::{Digest, Sha384};

    #[test]
    fn line_endings_do_not_matter() {
        let lf = "create table t (id int);\n-- note\n";
        let crlf = "create table t (id int);\r\n-- note\r\n";
        let from_lf = Checksums::of(lf);
        let from_crlf = Checksums::of(crlf);
        assert_eq!(from_lf.canonical, from_crlf.canonical);
        // what sqlx recorded from either checkout is accepted by the other
        assert!(from_crlf.accepts(&Sha384::digest(lf.as_bytes())));
        assert!(from_lf.accepts(&Sha384::digest(crlf.as_bytes())));
        // an LF file's canonical checksum is sqlx's
        assert_eq!(from_lf.canonical, Sha384::digest(lf.as_bytes()).to_vec());
    }

    proptest::proptest! {
        #[test]
        fn any_line_ending_conversion_is_accepted(lines in proptest::collection::vec("[ -~]{0,20}", 0..8)) {
            let lf = lines.join("\n");
            let crlf = lines.join("\r\n");
            let sqlx_lf = Sha384::digest(lf.as_bytes());
            let sqlx_crlf = Sha384::digest(crlf.as_bytes());
            for file in [&lf, &crlf] {
                let sums = Checksums::of(file);
                proptest::prop_assert!(sums.accepts(&sqlx_lf));
                proptest::prop_assert!(sums.accepts(&sqlx_crlf));
                proptest::prop_assert!(sums.accepts(&sums.canonical));
            }
            proptest::prop_assert_eq!(Checksums::of(&lf).canonical, Checksums::of(&crlf).canonical);
        }
    }

    #[test]
    fn edits_do_matter() {
        let a = Checksums::of("create table t (id int);\n");
        assert!(!a.accepts(&Sha384::digest(b"create table t (id bigint);\n")));
        assert!(!a.accepts(&Sha384::digest(b"create table t (id int);\n\n")));
    }
}
