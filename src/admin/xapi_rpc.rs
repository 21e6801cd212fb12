//! XAPI's JSON-RPC API on the host's local unix socket.
//!
//! `follow-xapi` needs what `xe` cannot give: waiting for changes
//! (`event.from`). xapi serves JSON-RPC 2.0 at `/jsonrpc` on its local
//! socket and trusts a login that comes through that socket without a
//! password (xapi_session.ml, "we trust requests from local unix filename
//! sockets"). Records come typed (a map is a JSON object), so nothing has to
//! be parsed back out of printed text as with `xe`.
//!
//! One HTTP/1.1 request per connection (`Connection: close`): `event.from`
//! blocks for up to its own timeout, and a fresh connection per call keeps
//! the client free of keep-alive state. Every read is under a timeout and
//! every answer is bounded before it costs memory.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

/// xapi's local socket on XCP-ng (and XenServer).
pub const DEFAULT_SOCKET: &str = "/var/lib/xcp/xapi";
/// The largest answer read: a pool's VM records at a few KiB each.
const MAX_RESPONSE: usize = 64 << 20;
/// The largest status line and headers.
const MAX_HEAD: usize = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach xapi at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("xapi answered HTTP {0}")]
    Status(u16),
    #[error("xapi's answer is malformed: {0}")]
    Malformed(String),
    #[error("xapi's answer exceeds {MAX_RESPONSE} bytes")]
    TooLarge,
    #[error("xapi: {method} failed: {code} {data:?}")]
    Api {
        method: String,
        code: String,
        data: Vec<String>,
    },
}

impl Error {
    /// The API error code (`SESSION_INVALID`, ...), if xapi gave one.
    pub fn api_code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A JSON-RPC client of one xapi socket.
pub struct Client {
    path: PathBuf,
    next_id: u64,
}

impl Client {
    pub fn new(path: impl AsRef<Path>) -> Client {
        Client {
            path: path.as_ref().to_path_buf(),
            next_id: 1,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Calls `method` with `params`; waits at most `wait` for the answer.
    pub fn call(&mut self, method: &str, params: Value, wait: Duration) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let body = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id});
        let raw = self.post(body.to_string().as_bytes(), wait)?;
        answer(method, &raw)
    }

    fn io(&self, source: std::io::Error) -> Error {
        Error::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// One POST /jsonrpc; the answer's body.
    fn post(&self, body: &[u8], wait: Duration) -> Result<Vec<u8>> {
        let mut s = UnixStream::connect(&self.path).map_err(|e| self.io(e))?;
        s.set_read_timeout(Some(wait)).map_err(|e| self.io(e))?;
        s.set_write_timeout(Some(wait)).map_err(|e| self.io(e))?;
        let head = format!(
            "POST /jsonrpc HTTP/1.1\r\nHost: localhost\r\nUser-Agent: vgpu-admin\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).map_err(|e| self.io(e))?;
        s.write_all(body).map_err(|e| self.io(e))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 << 10];
        loop {
            let n = s.read(&mut chunk).map_err(|e| self.io(e))?;
            if n == 0 {
                break;
            }
            if buf.len() + n > MAX_HEAD + MAX_RESPONSE {
                return Err(Error::TooLarge);
            }
            buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
            if let Some(body) = http_body(&buf, false)? {
                return Ok(body);
            }
        }
        http_body(&buf, true)?.ok_or_else(|| Error::Malformed("connection closed early".into()))
    }
}

/// The body of an HTTP/1.1 answer in `buf`, once it is whole: `None` while
/// more is needed. `eof`: the peer closed (a body without a length ends there).
fn http_body(buf: &[u8], eof: bool) -> Result<Option<Vec<u8>>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(Error::Malformed("headers too long".into()))
        }
        Ok(httparse::Status::Partial) if eof => {
            return Err(Error::Malformed("truncated headers".into()))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Error::Malformed(format!("HTTP: {e}"))),
    };
    let code = resp.code.unwrap_or(0);
    if code != 200 {
        return Err(Error::Status(code));
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let rest = buf.get(head_len..).unwrap_or_default();
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return dechunk(rest, eof);
    }
    if let Some(len) = header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| Error::Malformed(format!("Content-Length {len:?}")))?;
        if len > MAX_RESPONSE {
            return Err(Error::TooLarge);
        }
        return match rest.get(..len) {
            Some(body) => Ok(Some(body.to_vec())),
            None if eof => Err(Error::Malformed("body shorter than Content-Length".into())),
            None => Ok(None),
        };
    }
    Ok(eof.then(|| rest.to_vec()))
}

/// A chunked body, once its last chunk is in.
fn dechunk(mut rest: &[u8], eof: bool) -> Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        let (used, size) = match httparse::parse_chunk_size(rest) {
            Ok(httparse::Status::Complete(v)) => v,
            Ok(httparse::Status::Partial) if eof => {
                return Err(Error::Malformed("truncated chunk".into()))
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(Error::Malformed("bad chunk size".into())),
        };
        let size = usize::try_from(size).map_err(|_| Error::TooLarge)?;
        if body.len().saturating_add(size) > MAX_RESPONSE {
            return Err(Error::TooLarge);
        }
        if size == 0 {
            return Ok(Some(body));
        }
        let data = rest.get(used..).unwrap_or_default();
        match (data.get(..size), data.get(size..size + 2)) {
            (Some(d), Some(b"\r\n")) => body.extend_from_slice(d),
            (_, Some(_)) => return Err(Error::Malformed("chunk without CRLF".into())),
            _ if eof => return Err(Error::Malformed("truncated chunk".into())),
            _ => return Ok(None),
        }
        rest = data.get(size + 2..).unwrap_or_default();
    }
}

/// The `result` of a JSON-RPC answer, or its `error` as [`Error::Api`]
/// (xapi: `{"code": 1, "message": CODE, "data": [...]}`; version 1
/// answers carry `[CODE, ...]`).
fn answer(method: &str, raw: &[u8]) -> Result<Value> {
    let mut v: Value =
        serde_json::from_slice(raw).map_err(|e| Error::Malformed(format!("JSON: {e}")))?;
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    match v.get("error") {
        None | Some(Value::Null) => {}
        Some(e) => {
            let (code, data) = match e {
                Value::Object(o) => (
                    o.get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    o.get("data").map(strings).unwrap_or_default(),
                ),
                Value::Array(_) => {
                    let mut all = strings(e).into_iter();
                    (all.next().unwrap_or_default(), all.collect())
                }
                other => (other.to_string(), Vec::new()),
            };
            return Err(Error::Api {
                method: method.to_string(),
                code,
                data,
            });
        }
    }
    match v.get_mut("result") {
        Some(r) => Ok(r.take()),
        None => Err(Error::Malformed("no result and no error".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_taken_by_length_by_chunks_or_to_the_end() {
        let whole = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(http_body(whole, false).unwrap().unwrap(), b"hello");
        assert!(http_body(&whole[..whole.len() - 1], false)
            .unwrap()
            .is_none());
        assert!(http_body(&whole[..whole.len() - 1], true).is_err());
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n";
        assert_eq!(http_body(chunked, false).unwrap().unwrap(), b"hello");
        assert!(http_body(&chunked[..60], false).unwrap().is_none());
        let to_eof = b"HTTP/1.1 200 OK\r\n\r\nhel";
        assert!(http_body(to_eof, false).unwrap().is_none());
        assert_eq!(http_body(to_eof, true).unwrap().unwrap(), b"hel");
    }

    #[test]
    fn hostile_answers_are_errors_not_allocations() {
        let huge = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_RESPONSE + 1
        );
        assert!(matches!(
            http_body(huge.as_bytes(), false),
            Err(Error::TooLarge)
        ));
        let huge_chunk = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffff\r\n";
        assert!(matches!(http_body(huge_chunk, false), Err(Error::TooLarge)));
        assert!(matches!(
            http_body(b"HTTP/1.1 500 Oops\r\n\r\n", false),
            Err(Error::Status(500))
        ));
        assert!(http_body(b"not http at all\r\n\r\n", false).is_err());
        let bad_len = b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n";
        assert!(http_body(bad_len, false).is_err());
        let long_head = vec![b'a'; MAX_HEAD + 1];
        assert!(http_body(&long_head, false).is_err());
    }

    #[test]
    fn answers_give_the_result_or_the_api_error() {
        let ok = br#"{"jsonrpc":"2.0","result":"OpaqueRef:s","id":1}"#;
        assert_eq!(answer("m", ok).unwrap(), json!("OpaqueRef:s"));
        let e2 = br#"{"jsonrpc":"2.0","error":{"code":1,"message":"SESSION_INVALID","data":["OpaqueRef:s"]},"id":1}"#;
        let e = answer("event.from", e2).unwrap_err();
        assert_eq!(e.api_code(), Some("SESSION_INVALID"));
        assert!(e.to_string().contains("event.from failed: SESSION_INVALID"));
        let e1 = br#"{"result":null,"error":["EVENTS_LOST"],"id":1}"#;
        assert_eq!(answer("m", e1).unwrap_err().api_code(), Some("EVENTS_LOST"));
        assert!(answer("m", b"[1,2").is_err());
        assert!(answer("m", b"{}").is_err());
    }
}
