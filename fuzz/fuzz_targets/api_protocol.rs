//! The agent's unix-socket protocol: a request line as the agent reads it,
//! a response line as tern-cni and the CLI read it. Whatever decodes must
//! encode to one line that decodes to the same message and encodes to the
//! same bytes again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tern_api::{Request, Response};

fuzz_target!(|data: &[u8]| {
    // The agent reads one line and decodes it from a &str; the client
    // decodes each answer line the same way.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(request) = round_trip::<Request>(text) {
        let json = serde_json::to_value(&request).unwrap_or_default();
        assert_eq!(json["op"], request.op(), "op() names the wire tag");
    }
    round_trip::<Response>(text);
});

fn round_trip<T>(text: &str) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let decoded: T = serde_json::from_str(text).ok()?;
    let encoded = match serde_json::to_string(&decoded) {
        Ok(s) => s,
        Err(e) => panic!("{decoded:?} decodes but does not encode: {e}"),
    };
    assert!(!encoded.contains('\n'), "one message, one line");
    let again: T = match serde_json::from_str(&encoded) {
        Ok(v) => v,
        Err(e) => panic!("{encoded} (encoded {decoded:?}) does not decode: {e}"),
    };
    assert_eq!(again, decoded, "{encoded}");
    match serde_json::to_string(&again) {
        Ok(s) => assert_eq!(s, encoded, "the encoding is stable"),
        Err(e) => panic!("{again:?} does not encode: {e}"),
    }
    Some(decoded)
}
