//! The client key: a number a client gives each document it sends, so that
//! a document sent again (through another balancer, after the first one
//! died before answering) is recognised by the server that already holds
//! it. On the wire, 32 lowercase hex digits; our client makes it from a
//! random 64-bit id chosen per run and the document's place in the batch.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A client-chosen 128-bit key of one document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientKey(pub u128);

impl ClientKey {
    /// The key of document `seq` of the client run `run`.
    pub fn new(run: u64, seq: u64) -> ClientKey {
        ClientKey((u128::from(run) << 64) | u128::from(seq))
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Why text is not a client key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadKey;

impl fmt::Display for BadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a client key is 32 lowercase hex digits")
    }
}

impl std::error::Error for BadKey {}

impl FromStr for ClientKey {
    type Err = BadKey;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower_hex = s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if s.len() != 32 || !lower_hex {
            return Err(BadKey);
        }
        u128::from_str_radix(s, 16)
            .map(ClientKey)
            .map_err(|_| BadKey)
    }
}

impl Serialize for ClientKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ClientKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One key a balancer asks servers about (`lookup`), with the request
/// number it will store the document under if no server holds the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyProbe {
    pub key: ClientKey,
    #[serde(rename = "numero_richiesta")]
    pub request_number: u64,
}

/// A key a server holds: the stored copy that answers for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldKey {
    pub key: ClientKey,
    #[serde(rename = "numero_richiesta")]
    pub request_number: u64,
    pub file: String,
    pub a_count: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_read_back_as_written_and_odd_text_is_refused() {
        let key = ClientKey::new(0x9f1c_0000_0000_0001, 41);
        let text = key.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text.parse(), Ok(key));
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(serde_json::from_str::<ClientKey>(&json).unwrap(), key);
        for bad in [
            "",
            "12",
            &text.to_uppercase(),
            &format!("{text}0"),
            "g".repeat(32).as_str(),
        ] {
            assert_eq!(bad.parse::<ClientKey>(), Err(BadKey), "{bad}");
        }
    }
}
