//! Chat templates rendered the way HF transformers renders them.
//!
//! Model authors ship their prompt format as a Jinja2 template written against
//! Python's jinja2 with the environment that `transformers` sets up. A prompt
//! that differs from that by a single newline measurably degrades a model, so
//! this module mirrors that environment with `minijinja`: `trim_blocks` and
//! `lstrip_blocks` on, loop controls (`break`/`continue`) on, Python string and
//! dict methods (`startswith`, `split`, `strip`, `items`, ...) through
//! `minijinja-contrib`'s pycompat callback, a `raise_exception(msg)` global, a
//! `strftime_now(fmt)` global and a `tojson` filter that formats like Python's
//! `json.dumps(ensure_ascii=False)` (`", "` and `": "` separators, no HTML
//! escaping). Template errors — syntax errors at load time, undefined methods
//! or the template's own `raise_exception` at render time — come back as
//! [`TextError::Template`], never as panics.
//!
//! Known gaps: the `{% generation %}` tag of transformers' `AssistantTracker`
//! extension is not supported, `none` renders as `none` rather than Python's
//! `None`, and `strftime_now` uses UTC rather than the local time zone.

use std::collections::BTreeMap;
use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::TextError;

/// Name under which the single template is stored in its environment.
const NAME: &str = "chat_template";

/// One chat turn. `role` is free-form (`system`, `user`, `assistant`, `tool`,
/// ...) because templates, not this crate, decide what roles mean.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    /// Convenience constructor.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template plus the HF-compatible environment it runs in.
///
/// Compiling happens once in [`ChatTemplate::new`], so syntax errors surface
/// when the model directory is loaded rather than on the first request.
pub struct ChatTemplate {
    env: Environment<'static>,
    origin: String,
    /// Kept for [`ChatTemplate::source`]; the environment's copy can only be
    /// borrowed through a temporary handle.
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`. `origin` says where the text came from (a path, or
    /// `path:field`) and is repeated in every error this template produces.
    pub fn new(source: impl Into<String>, origin: impl Into<String>) -> Result<Self, TextError> {
        let origin = origin.into();
        let source = source.into();
        let mut env = hf_environment();
        env.add_template_owned(NAME, source.clone())
            .map_err(|e| template_error(&origin, &e))?;
        Ok(Self {
            env,
            origin,
            source,
        })
    }

    /// Where the template text came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The template text as loaded.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` into a prompt.
    ///
    /// The context matches transformers' `apply_chat_template`: `messages`,
    /// `add_generation_prompt`, `tools` and `documents` set to none, plus every
    /// entry of `vars` (special tokens such as `bos_token`/`eos_token`, and
    /// template switches such as `enable_thinking`). Variables that are not
    /// given stay undefined, which templates test with `is defined`; `vars`
    /// may override `tools`/`documents` but not `messages` or
    /// `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        vars: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, TextError> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| template_error(&self.origin, &e))?;
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        for (k, v) in vars {
            ctx.insert(k.clone(), Value::from_serialize(v));
        }
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        tmpl.render(ctx)
            .map_err(|e| template_error(&self.origin, &e))
    }
}

fn template_error(origin: &str, err: &Error) -> TextError {
    let mut message = err.to_string();
    // Include the chain (e.g. a failing filter's own error) when present.
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    TextError::Template {
        origin: origin.to_string(),
        message,
    }
}

/// Builds the environment transformers uses (`ImmutableSandboxedEnvironment(
/// trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])` plus its
/// globals and filters).
fn hf_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env
}

/// `raise_exception(msg)`: templates call this to reject conversations they
/// cannot format (e.g. "Conversation roles must alternate").
fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)`: Llama 3 templates put today's date in the system
/// prompt with it.
fn strftime_now(fmt: String) -> Result<Value, Error> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(strftime_utc(&fmt, secs)))
}

/// `tojson(indent=None, ensure_ascii=False, sort_keys=False)` formatted like
/// Python's `json.dumps`, which is what transformers installs in place of
/// jinja2's HTML-safe `tojson`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<i64> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json_err = |e: serde_json::Error| {
        Error::new(ErrorKind::InvalidOperation, "tojson: cannot serialize").with_source(e)
    };
    let fmt = PyJsonFormatter::new(indent, ensure_ascii.unwrap_or(false));
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    if sort_keys.unwrap_or(false) {
        let v = sorted(serde_json::to_value(&value).map_err(json_err)?);
        v.serialize(&mut ser).map_err(json_err)?;
    } else {
        value.serialize(&mut ser).map_err(json_err)?;
    }
    let s = String::from_utf8(out)
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, "tojson: invalid UTF-8"))?;
    Ok(Value::from_safe_string(s))
}

/// Rebuilds a JSON value with object keys in sorted order (independently of
/// whether `serde_json` preserves insertion order in this build).
fn sorted(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            let mut entries: Vec<_> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        serde_json::Value::Array(a) => {
            serde_json::Value::Array(a.into_iter().map(sorted).collect())
        }
        other => other,
    }
}

/// A `serde_json` formatter producing Python `json.dumps` layout: compact
/// output uses `", "`/`": "`, indented output uses `","` + newline and
/// `": "`, and `ensure_ascii` escapes non-ASCII as `\uXXXX` (UTF-16 units).
struct PyJsonFormatter {
    indent: Option<Vec<u8>>,
    level: usize,
    has_value: bool,
    ensure_ascii: bool,
}

impl PyJsonFormatter {
    fn new(indent: Option<i64>, ensure_ascii: bool) -> Self {
        Self {
            indent: indent.map(|n| vec![b' '; n.max(0) as usize]),
            level: 0,
            has_value: false,
            ensure_ascii,
        }
    }

    fn newline_indent<W: ?Sized + io::Write>(&self, w: &mut W) -> io::Result<()> {
        if let Some(ind) = &self.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.level {
                w.write_all(ind)?;
            }
        }
        Ok(())
    }

    fn begin_container<W: ?Sized + io::Write>(&mut self, w: &mut W, open: &[u8]) -> io::Result<()> {
        self.level += 1;
        self.has_value = false;
        w.write_all(open)
    }

    fn end_container<W: ?Sized + io::Write>(&mut self, w: &mut W, close: &[u8]) -> io::Result<()> {
        self.level -= 1;
        if self.has_value {
            self.newline_indent(w)?;
        }
        w.write_all(close)
    }

    fn begin_item<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if self.indent.is_some() {
            if !first {
                w.write_all(b",")?;
            }
            self.newline_indent(w)
        } else if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
}

impl serde_json::ser::Formatter for PyJsonFormatter {
    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.begin_container(w, b"[")
    }
    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.end_container(w, b"]")
    }
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.begin_item(w, first)
    }
    fn end_array_value<W: ?Sized + io::Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.begin_container(w, b"{")
    }
    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.end_container(w, b"}")
    }
    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.begin_item(w, first)
    }
    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
    fn end_object_value<W: ?Sized + io::Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        if !self.ensure_ascii || fragment.is_ascii() {
            return w.write_all(fragment.as_bytes());
        }
        let mut units = [0u16; 2];
        for c in fragment.chars() {
            if c.is_ascii() {
                w.write_all(&[c as u8])?;
            } else {
                for u in c.encode_utf16(&mut units) {
                    write!(w, "\\u{u:04x}")?;
                }
            }
        }
        Ok(())
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// A small `strftime` over UTC for the directives chat templates use
/// (`%Y %y %m %d %-d %e %B %b %h %A %a %H %I %M %S %p %j %%`); unknown
/// directives are copied through verbatim.
pub(crate) fn strftime_utc(fmt: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let sod = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let (h, m, s) = (sod / 3600, (sod / 60) % 60, sod % 60);
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let num = |v: i64, width: usize| {
            if no_pad {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        let h12 = if h % 12 == 0 { 12 } else { h % 12 };
        let piece = match d {
            'Y' => year.to_string(),
            'y' => num(year.rem_euclid(100), 2),
            'm' => num(i64::from(month), 2),
            'd' => num(i64::from(day), 2),
            'e' => format!("{day:>2}"),
            'B' => MONTHS[month as usize - 1].to_string(),
            'b' | 'h' => MONTHS[month as usize - 1][..3].to_string(),
            'A' => WEEKDAYS[weekday].to_string(),
            'a' => WEEKDAYS[weekday][..3].to_string(),
            'H' => num(h, 2),
            'I' => num(h12, 2),
            'M' => num(m, 2),
            'S' => num(s, 2),
            'p' => if h < 12 { "AM" } else { "PM" }.to_string(),
            'j' => num(yday, 3),
            '%' => "%".to_string(),
            other => {
                if no_pad {
                    format!("%-{other}")
                } else {
                    format!("%{other}")
                }
            }
        };
        out.push_str(&piece);
    }
    out
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31), proleptic
/// Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected strings below were produced by Python jinja2 3.1 configured as
    // transformers configures it (ImmutableSandboxedEnvironment, trim_blocks,
    // lstrip_blocks, loopcontrols, json.dumps-based tojson).

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    const QWEN3: &str = include_str!("../tests/fixtures/qwen3_chat_template.jinja");

    fn no_vars() -> serde_json::Map<String, serde_json::Value> {
        serde_json::Map::new()
    }

    fn conversation() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "You are helpful."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "<think>\nLet me greet.\n</think>\n\nHello!"),
            ChatMessage::new("user", "How are you?"),
        ]
    }

    #[test]
    fn chatml_two_turns_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "test").unwrap();
        let msgs = [
            ChatMessage::new("user", "Hello"),
            ChatMessage::new("assistant", "Hi there!"),
            ChatMessage::new("user", "How are you?"),
        ];
        let out = t.render(&msgs, true, &no_vars()).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there!<|im_end|>\n\
             <|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&msgs[..2], false, &no_vars()).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there!<|im_end|>\n"
        );
    }

    #[test]
    fn qwen3_strips_old_reasoning() {
        let t = ChatTemplate::new(QWEN3, "qwen3").unwrap();
        let out = t.render(&conversation(), true, &no_vars()).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn qwen3_enable_thinking_false() {
        let t = ChatTemplate::new(QWEN3, "qwen3").unwrap();
        let mut vars = no_vars();
        vars.insert("enable_thinking".into(), false.into());
        let out = t.render(&conversation(), true, &vars).unwrap();
        assert!(
            out.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"),
            "{out:?}"
        );
        // `true` must not trigger the empty think block.
        vars.insert("enable_thinking".into(), true.into());
        let out = t.render(&conversation(), true, &vars).unwrap();
        assert!(out.ends_with("<|im_start|>assistant\n"), "{out:?}");
    }

    #[test]
    fn qwen3_keeps_reasoning_after_last_query() {
        let t = ChatTemplate::new(QWEN3, "qwen3").unwrap();
        let mut msgs = conversation();
        msgs.push(ChatMessage::new(
            "assistant",
            "<think>\nFine.\n</think>\n\nGood, thanks!",
        ));
        let out = t.render(&msgs, false, &no_vars()).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n\
             <|im_start|>assistant\n<think>\nFine.\n</think>\n\nGood, thanks!<|im_end|>\n"
        );
    }

    #[test]
    fn qwen3_tools_use_python_tojson() {
        let t = ChatTemplate::new(QWEN3, "qwen3").unwrap();
        let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather",
            "description": "Météo <now>", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}}}}}]);
        let mut vars = no_vars();
        vars.insert("tools".into(), tools);
        let out = t
            .render(&[ChatMessage::new("user", "Hi")], true, &vars)
            .unwrap();
        let expected = "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Météo <now>\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}}}}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(out, expected);
    }

    #[test]
    fn whitespace_control_loop_controls_and_tojson_variants() {
        let src = "{% for m in messages %}{% if m.role == 'user' %}{{ m.content | upper }}{% else %}{% continue %}{% endif %}{% if loop.index > 2 %}{% break %}{% endif %}\n{% endfor %}\n  {% if true %}\n    X\n  {% endif %}\n{{ {\"b\": [1, 2.5, none, true], \"a\": \"é\"} | tojson }}\n{{ {\"b\": [1, {}], \"a\": []} | tojson(indent=2) }}\n{{ {\"b\": 1, \"a\": \"é\"} | tojson(sort_keys=true, ensure_ascii=true) }}\n";
        let t = ChatTemplate::new(src, "inline").unwrap();
        let msgs: Vec<_> = [("user", "a"), ("x", "b"), ("user", "c"), ("user", "d")]
            .iter()
            .map(|(r, c)| ChatMessage::new(*r, *c))
            .collect();
        let out = t.render(&msgs, false, &no_vars()).unwrap();
        assert_eq!(
            out,
            "AC    X\n{\"b\": [1, 2.5, null, true], \"a\": \"é\"}\n{\n  \"b\": [\n    1,\n    {}\n  ],\n  \"a\": []\n}\n{\"a\": \"\\u00e9\", \"b\": 1}"
        );
    }

    #[test]
    fn special_tokens_and_undefined_vars() {
        let t = ChatTemplate::new(
            "{{ bos_token }}[{{ eos_token }}]{% if tools is none %}T{% endif %}{% if enable_thinking is defined %}E{% endif %}",
            "inline",
        )
        .unwrap();
        let mut vars = no_vars();
        vars.insert("bos_token".into(), "<s>".into());
        assert_eq!(t.render(&[], false, &vars).unwrap(), "<s>[]T");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let src = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(src, "inline").unwrap();
        let err = t
            .render(&[ChatMessage::new("system", "x")], true, &no_vars())
            .unwrap_err();
        match err {
            TextError::Template { origin, message } => {
                assert_eq!(origin, "inline");
                assert!(message.contains("System role not supported"), "{message}");
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn syntax_and_runtime_errors_are_errors() {
        let err = ChatTemplate::new("{% for m in messages %}", "bad.jinja").unwrap_err();
        assert!(
            matches!(&err, TextError::Template { origin, .. } if origin == "bad.jinja"),
            "{err:?}"
        );
        let t = ChatTemplate::new("{{ messages[0].content.no_such_method() }}", "x").unwrap();
        assert!(matches!(
            t.render(&[ChatMessage::new("user", "a")], false, &no_vars()),
            Err(TextError::Template { .. })
        ));
        // Attribute access on an undefined value fails like jinja2's Undefined.
        let t = ChatTemplate::new("{{ nothing.attr }}", "x").unwrap();
        assert!(t.render(&[], false, &no_vars()).is_err());
    }

    #[test]
    fn python_string_methods() {
        let t = ChatTemplate::new(
            "{{ '  a,b '.strip() }}|{{ 'xxa'.lstrip('x') }}|{{ 'a\\n\\n'.rstrip('\\n') }}|{{ 'a,b'.split(',')[-1] }}|{{ 'abc'.replace('b', 'B') }}|{{ 'abc'.startswith('ab') }}|{{ 'abc'.endswith('bc') }}|{{ messages[::-1][0].content }}",
            "x",
        )
        .unwrap();
        let msgs = [
            ChatMessage::new("user", "first"),
            ChatMessage::new("user", "last"),
        ];
        assert_eq!(
            t.render(&msgs, false, &no_vars()).unwrap(),
            "a,b|a|a|b|aBc|True|True|last"
        );
    }

    #[test]
    fn strftime_formats() {
        // 2024-07-26 13:05:09 UTC, a Friday, day 208 of a leap year.
        let ts = 1_722_085_509 - 86_400;
        assert_eq!(strftime_utc("%d %b %Y", ts), "26 Jul 2024");
        assert_eq!(
            strftime_utc("%A %B %-d, %y %H:%M:%S %I%p %j %% %Q", ts),
            "Friday July 26, 24 13:05:09 01PM 208 % %Q"
        );
        assert_eq!(strftime_utc("%Y-%m-%d %a", 0), "1970-01-01 Thu");
        assert_eq!(strftime_utc("%Y-%m-%d", 951_782_400), "2000-02-29");
        assert_eq!(days_from_civil(2000, 2, 29), 951_782_400 / 86_400);
    }
}
