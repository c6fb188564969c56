//! The API key check every transport applies to rerank calls (`Authorization: Bearer <key>`).

use std::sync::Arc;

use crate::error::RerankError;

/// The expected `authorization` value when an API key is configured; none lets every call in.
#[derive(Clone)]
pub struct ApiKey {
    expected: Option<Arc<[u8]>>,
}

impl ApiKey {
    pub fn new(api_key: Option<&str>) -> Self {
        Self {
            expected: api_key.map(|key| key.as_bytes().into()),
        }
    }

    /// Checks a call's `authorization` header value, comparing in constant time.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), RerankError> {
        let Some(expected) = &self.expected else {
            return Ok(());
        };
        if constant_time_eq(&credentials(authorization.unwrap_or_default()), expected) {
            Ok(())
        } else {
            Err(RerankError::Unauthenticated(
                "missing or wrong API key: send `authorization: Bearer <key>`".into(),
            ))
        }
    }
}

/// The credentials of an `authorization` value with the `Bearer` scheme (its name is case-insensitive, as
/// RFC 6750 has it); anything else gives no credentials.
fn credentials(authorization: &[u8]) -> Vec<u8> {
    match authorization.split_at_checked(7) {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case(b"bearer ") => token.to_vec(),
        _ => Vec::new(),
    }
}

/// Byte equality whose time depends only on the lengths, not on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut difference = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (
            a.get(i).copied().unwrap_or(0),
            b.get(i).copied().unwrap_or(0),
        );
        difference |= usize::from(std::hint::black_box(x ^ y));
    }
    difference == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_value_passes() {
        let key = ApiKey::new(Some("s3cret"));
        assert!(key.check(Some(b"Bearer s3cret")).is_ok());
        assert!(
            key.check(Some(b"bearer s3cret")).is_ok(),
            "the scheme is case-insensitive"
        );
        for wrong in [
            &b"Bearer s3cre"[..],
            b"Bearer s3cret!",
            b"s3cret",
            b"",
            b"Basic s3cret",
            b"Bearer S3CRET",
        ] {
            assert!(key.check(Some(wrong)).is_err(), "{wrong:?}");
        }
        assert!(key.check(None).is_err());
        assert!(ApiKey::new(None).check(None).is_ok());
    }
}
