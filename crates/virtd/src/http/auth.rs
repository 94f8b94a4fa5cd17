//! The TCP listener's bearer token, checked from the headers before anything else is read.
//!
//! Clients send `Authorization: Bearer TOKEN`. A browser cannot set that header on a WebSocket,
//! so the console's WebSocket handshake may carry the token as a subprotocol instead:
//! `new WebSocket(url, ["ferrovirt.console", "ferrovirt.bearer." + base64url(TOKEN)])` (base64url
//! without padding: subprotocol names cannot hold every character a token may have). The server
//! then selects `ferrovirt.console`, never echoing the token back.

use data_encoding::BASE64URL_NOPAD;
use hyper::header::{HeaderMap, AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};

/// The subprotocol a browser's console client offers, and the server selects.
pub const CONSOLE_PROTOCOL: &str = "ferrovirt.console";
/// Prefix of the subprotocol that carries the token.
const BEARER_PROTOCOL: &str = "ferrovirt.bearer.";

/// Does the request carry `token`, in its Authorization header or (WebSocket handshakes) in a
/// `ferrovirt.bearer.` subprotocol?
pub fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let header = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    if crate::server::token_matches(header, token) {
        return true;
    }
    offered_protocols(headers)
        .filter_map(|p| p.strip_prefix(BEARER_PROTOCOL))
        .filter_map(|b64| BASE64URL_NOPAD.decode(b64.as_bytes()).ok())
        .any(|given| constant_time_eq(&given, token.as_bytes()))
}

/// The subprotocols a WebSocket client offered, in its order.
pub fn offered_protocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    const TOKEN: &str = "s3cret/token+with=odd,chars";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn bearer_protocol(token: &str) -> String {
        format!(
            "{BEARER_PROTOCOL}{}",
            BASE64URL_NOPAD.encode(token.as_bytes())
        )
    }

    #[test]
    fn the_token_is_taken_from_the_header_or_a_websocket_subprotocol() {
        let ok = format!("Bearer {TOKEN}");
        assert!(authorized(&headers(&[("authorization", &ok)]), TOKEN));
        let offered = format!("{CONSOLE_PROTOCOL}, {}", bearer_protocol(TOKEN));
        assert!(authorized(
            &headers(&[("sec-websocket-protocol", &offered)]),
            TOKEN
        ));
        // Offered in a header line of its own.
        let h = headers(&[
            ("sec-websocket-protocol", CONSOLE_PROTOCOL),
            ("sec-websocket-protocol", &bearer_protocol(TOKEN)),
        ]);
        assert!(authorized(&h, TOKEN));
    }

    #[test]
    fn a_wrong_missing_or_undecodable_token_is_refused() {
        assert!(!authorized(&headers(&[]), TOKEN));
        assert!(!authorized(
            &headers(&[("authorization", "Bearer nope")]),
            TOKEN
        ));
        for offered in [
            bearer_protocol("wrong token of some length"),
            bearer_protocol(&TOKEN[1..]),
            format!("{BEARER_PROTOCOL}{TOKEN}"),
            format!("{BEARER_PROTOCOL}!!!"),
            BEARER_PROTOCOL.to_string(),
            CONSOLE_PROTOCOL.to_string(),
        ] {
            let h = headers(&[("sec-websocket-protocol", &offered)]);
            assert!(!authorized(&h, TOKEN), "{offered}");
        }
    }
}
