//! Config errors that say where, never what: a TOML or serde message
//! quotes values from the file, which may be secrets pasted in the wrong
//! place.

/// A TOML error without the offending text: the line it quotes may hold a
/// secret pasted where its reference belongs. Says where (line, column) and
/// what, with any quoted value replaced by `…`.
pub(crate) fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    let at = e
        .span()
        .map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(" (line {line}, column {column})")
        })
        .unwrap_or_default();
    let message = redact_variant(&redact_quoted(e.message().trim()));
    format!("{}{at}", crate::limits::clip_message(&message))
}

/// A YAML error, like [`describe_toml_error`]: where, and what without the
/// values it quotes.
pub(crate) fn describe_yaml_error(e: &yaml_serde::Error) -> String {
    let at = e
        .location()
        .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
        .unwrap_or_default();
    let message = e.to_string();
    // The library appends its own " at line N column M".
    let message = message.split(" at line ").next().unwrap_or_default().trim();
    let message = redact_variant(&redact_quoted(message));
    format!("{}{at}", crate::limits::clip_message(&message))
}

/// Replaces the inside of every `"…"` in a message.
fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut inside = false;
    for c in message.chars() {
        if c == '"' {
            if inside {
                out.push('…');
            }
            inside = !inside;
            out.push(c);
        } else if !inside {
            out.push(c);
        }
    }
    out
}

/// serde's "unknown variant `<value>`" quotes a value from the file (which
/// may be a secret pasted in the wrong place): the value is replaced, the
/// variants it expected are kept.
fn redact_variant(message: &str) -> String {
    const MARK: &str = "unknown variant `";
    let Some(start) = message.find(MARK).map(|i| i + MARK.len()) else {
        return message.to_owned();
    };
    match message[start..].find('`') {
        Some(len) => format!("{}…{}", &message[..start], &message[start + len..]),
        None => message.to_owned(),
    }
}
