//! Every XML input (domain and network definitions) is parsed here, within limits.
//!
//! roxmltree checks duplicate attributes with a linear search (quadratic in the attributes of one
//! element: 200k attributes took ~65 CPU s) and deep nesting exhausted a request thread's stack.
//! A linear pre-scan of the raw text measures nesting depth, element count and attributes before
//! roxmltree sees the text; its node limit is a second fence.

use roxmltree::{Document, ParsingOptions};

use crate::error::ApiError;

/// Deepest element nesting accepted (libvirt's domain XML nests about 6 deep).
pub const MAX_DEPTH: usize = 64;
/// Most elements in one document.
pub const MAX_ELEMENTS: usize = 20_000;
/// Most attributes on one element (libvirt's busiest elements have about 15).
pub const MAX_ATTRIBUTES_PER_ELEMENT: usize = 64;
/// Most attributes in one document.
pub const MAX_ATTRIBUTES: usize = 100_000;
/// roxmltree's own node limit (elements, text, comments), the second fence.
const MAX_NODES: u32 = 100_000;

/// Parse `text` as XML after checking the limits; errors are `malformed_body` (HTTP 400) and name
/// the limit that was exceeded.
pub fn parse(text: &str) -> Result<Document<'_>, ApiError> {
    prescan(text)?;
    let opts = ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_NODES,
    };
    Document::parse_with_options(text, opts).map_err(|e| match e {
        roxmltree::Error::NodesLimitReached => ApiError::malformed(format!(
            "the XML has more than {MAX_NODES} nodes (limit {MAX_NODES})"
        )),
        e => ApiError::malformed(format!("invalid XML: {e}")),
    })
}

fn too_deep() -> ApiError {
    ApiError::malformed(format!(
        "the XML nests elements more than {MAX_DEPTH} deep (limit {MAX_DEPTH})"
    ))
}

/// One linear pass over the text. Malformed XML may be measured loosely here: roxmltree rejects
/// it afterwards; well-formed XML is measured exactly.
fn prescan(text: &str) -> Result<(), ApiError> {
    let b = text.as_bytes();
    let mut i = 0;
    let mut depth = 0usize;
    let mut elements = 0usize;
    let mut attributes = 0usize;
    // Index just past the first occurrence of `end` at or after `from` (or the end of the text).
    let skip_past = |from: usize, end: &str| {
        text.get(from..)
            .and_then(|rest| rest.find(end))
            .map_or(b.len(), |at| from + at + end.len())
    };
    while i < b.len() {
        let Some(lt) = text[i..].find('<') else {
            break;
        };
        i += lt;
        let rest = &b[i..];
        if rest.starts_with(b"<!--") {
            i = skip_past(i + 4, "-->");
        } else if rest.starts_with(b"<![CDATA[") {
            i = skip_past(i + 9, "]]>");
        } else if rest.starts_with(b"<?") {
            i = skip_past(i + 2, "?>");
        } else if rest.starts_with(b"<!") || rest.starts_with(b"</") {
            // A DOCTYPE (refused by the parser) or an end tag.
            if rest.starts_with(b"</") {
                depth = depth.saturating_sub(1);
            }
            i = skip_past(i + 2, ">");
        } else {
            elements += 1;
            if elements > MAX_ELEMENTS {
                return Err(ApiError::malformed(format!(
                    "the XML has more than {MAX_ELEMENTS} elements (limit {MAX_ELEMENTS})"
                )));
            }
            let name_end = b[i + 1..]
                .iter()
                .position(|c| c.is_ascii_whitespace() || matches!(c, b'>' | b'/'))
                .map_or(b.len(), |p| i + 1 + p);
            let name = &text[i + 1..name_end];
            i = name_end;
            let mut own = 0usize;
            let mut closed = false;
            while i < b.len() {
                match b[i] {
                    b'"' | b'\'' => i = skip_past(i + 1, if b[i] == b'"' { "\"" } else { "'" }),
                    b'=' => {
                        own += 1;
                        attributes += 1;
                        if own > MAX_ATTRIBUTES_PER_ELEMENT {
                            return Err(ApiError::malformed(format!(
                                "the XML element <{}> has more than {MAX_ATTRIBUTES_PER_ELEMENT} attributes (limit {MAX_ATTRIBUTES_PER_ELEMENT} per element)",
                                name.chars().take(64).collect::<String>()
                            )));
                        }
                        if attributes > MAX_ATTRIBUTES {
                            return Err(ApiError::malformed(format!(
                                "the XML has more than {MAX_ATTRIBUTES} attributes (limit {MAX_ATTRIBUTES})"
                            )));
                        }
                        i += 1;
                    }
                    b'/' if b.get(i + 1) == Some(&b'>') => {
                        i += 2;
                        closed = true;
                        break;
                    }
                    b'>' => {
                        i += 1;
                        depth += 1;
                        if depth > MAX_DEPTH {
                            return Err(too_deep());
                        }
                        closed = true;
                        break;
                    }
                    b'<' => break,
                    _ => i += 1,
                }
            }
            if !closed {
                // An unterminated tag: the parser will say where.
                continue;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> String {
        format!("{}{}", "<a>".repeat(depth), "</a>".repeat(depth))
    }

    fn attributes(n: usize) -> String {
        let mut s = String::from("<domain");
        for i in 0..n {
            s.push_str(&format!(" a{i}=''"));
        }
        s.push_str("/>");
        s
    }

    #[test]
    fn deep_nesting_is_refused_naming_the_limit() {
        for depth in [MAX_DEPTH + 1, 4000, 100_000] {
            let err = parse(&nested(depth)).expect_err("refused");
            assert_eq!(err.code, crate::ErrorCode::MalformedBody);
            assert!(
                err.message.contains(&format!("limit {MAX_DEPTH}")),
                "{}",
                err.message
            );
        }
        parse(&nested(MAX_DEPTH)).expect("at the limit");
    }

    #[test]
    fn many_attributes_are_refused_naming_the_limit() {
        for n in [MAX_ATTRIBUTES_PER_ELEMENT + 1, 200_000] {
            let err = parse(&attributes(n)).expect_err("refused");
            assert_eq!(err.code, crate::ErrorCode::MalformedBody);
            assert!(
                err.message.contains("<domain>")
                    && err
                        .message
                        .contains(&format!("limit {MAX_ATTRIBUTES_PER_ELEMENT} per element")),
                "{}",
                err.message
            );
        }
        parse(&attributes(MAX_ATTRIBUTES_PER_ELEMENT)).expect("at the limit");
    }

    #[test]
    fn many_elements_and_attributes_in_total_are_refused() {
        let flat = format!("<r>{}</r>", "<e/>".repeat(MAX_ELEMENTS));
        let err = parse(&flat).expect_err("refused");
        assert!(
            err.message.contains(&format!("limit {MAX_ELEMENTS}")),
            "{}",
            err.message
        );
        let each = "<e a='' b='' c='' d='' e='' f='' g='' h='' i='' j=''/>";
        let wide = format!("<r>{}</r>", each.repeat(MAX_ATTRIBUTES / 10 + 1));
        let err = parse(&wide).expect_err("refused");
        assert!(
            err.message.contains(&format!("limit {MAX_ATTRIBUTES})")),
            "{}",
            err.message
        );
    }

    #[test]
    fn markup_inside_values_comments_and_cdata_is_not_counted() {
        let inner = nested(MAX_DEPTH + 10).replace('<', "&lt;");
        let xml = format!(
            "<?xml version='1.0'?><!-- {} --><r v='>> = = =' w=\"/>\"><![CDATA[{}]]>{inner}<x/></r>",
            nested(MAX_DEPTH + 10),
            nested(MAX_DEPTH + 10)
        );
        let doc = parse(&xml).expect("parses");
        assert_eq!(doc.root_element().attribute("w"), Some("/>"));
        assert!(parse("<r><a></r>").is_err());
        assert!(parse("<r a='1").is_err());
        assert!(parse("<!DOCTYPE r [<!ENTITY x 'y'>]><r/>").is_err());
    }
}
