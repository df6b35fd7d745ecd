//! The forward-auth answers: the ext_authz `CheckResponse` that
//! `decide_http` built, in each gateway's HTTP contract, and the one table
//! from errors to HTTP statuses on this listener. Pure conversions, no I/O.
//!
//! - Allowed (both): `200` with the identity headers (`x-tollgate-tenant-id`,
//!   …; the gateway copies them upstream) and `RateLimit-*`; for NGINX also
//!   `x-tollgate-remove`, the request headers to clear upstream.
//! - Denied, Traefik: the denial itself (product status, JSON body,
//!   `Retry-After`, `RateLimit-*`, `X-Request-Id`), relayed as is.
//! - Denied, NGINX: `auth_request` only tells 2xx, 401 and 403 apart (any
//!   other status is an error, 500), so the answer is 401 or 403 with the
//!   same headers plus `x-tollgate-status` (the product's status) and
//!   `x-tollgate-body` (its JSON body, ASCII-only); the example config
//!   returns them with `auth_request_set` and a named location.

use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::json;

use super::Gateway;
use crate::error::Error;

/// NGINX: the product's HTTP status of a denial.
pub const STATUS_HEADER: &str = "x-tollgate-status";
/// NGINX: the product's JSON body of a denial, on one ASCII line.
pub const BODY_HEADER: &str = "x-tollgate-body";
/// NGINX, on an allow: the request headers to clear before the upstream
/// (the credential's, and identity headers Tollgate has no value for).
pub const REMOVE_HEADER: &str = "x-tollgate-remove";

/// A short text answer (health, unknown paths).
pub(super) fn plain(status: u16, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status_code(status);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn status_code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn json_response(status: u16, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status_code(status);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Sets ext_authz headers on `r`; a header that is not valid HTTP (none of
/// ours are) is left out rather than answered with a panic.
fn set_headers<'a>(
    r: &mut Response<Full<Bytes>>,
    headers: impl IntoIterator<Item = &'a HeaderValueOption>,
) {
    for h in headers.into_iter().filter_map(|h| h.header.as_ref()) {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.key.as_bytes()),
            HeaderValue::from_str(&h.value),
        ) else {
            tracing::warn!(header = %h.key, "left out a header that is not valid HTTP");
            continue;
        };
        r.headers_mut().insert(name, value);
    }
}

/// The decision in `gateway`'s contract, and its outcome for the metrics.
pub(super) fn decision(
    gateway: Gateway,
    check: CheckResponse,
) -> (&'static str, Response<Full<Bytes>>) {
    match check.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            let mut r = Response::new(Full::new(Bytes::new()));
            set_headers(&mut r, ok.headers.iter().chain(&ok.response_headers_to_add));
            if gateway == Gateway::Nginx {
                // NGINX cannot be told to remove headers: it reads this list
                // (a `map` on `authorization`) and clears what is named.
                let removed = ok.headers_to_remove.join(",");
                if let Ok(removed) = HeaderValue::from_str(&removed) {
                    r.headers_mut().insert(REMOVE_HEADER, removed);
                }
            }
            ("allow", r)
        }
        Some(HttpResponse::DeniedResponse(denied)) => {
            let status = denied.status.map_or(403, |s| s.code);
            let status = u16::try_from(status).unwrap_or(403);
            let r = match gateway {
                Gateway::Traefik => {
                    let mut r = json_response(status, denied.body);
                    set_headers(&mut r, &denied.headers);
                    r
                }
                Gateway::Nginx => {
                    let body = ascii_json(&denied.body);
                    let mut r = json_response(if status == 401 { 401 } else { 403 }, body.clone());
                    set_headers(&mut r, &denied.headers);
                    let headers = r.headers_mut();
                    headers.insert(STATUS_HEADER, HeaderValue::from(status));
                    if let Ok(body) = HeaderValue::from_str(&body) {
                        headers.insert(BODY_HEADER, body);
                    }
                    r
                }
            };
            ("deny", r)
        }
        // decide_http always answers one of the two; never allow by default.
        None | Some(HttpResponse::ErrorResponse(_)) => (
            "error",
            error(Error::Internal("check answered no HTTP response".into())),
        ),
    }
}

/// The one table from errors to this listener's answers. None of them is
/// 2xx, 401 or 403 except a gateway that did not prove itself (401), so
/// NGINX treats an outage or a malformed route policy as an error and
/// applies its failure mode; Traefik relays it.
pub(super) fn error(e: Error) -> Response<Full<Bytes>> {
    let (status, body) = match e {
        Error::InvalidArgument(v) => {
            let violations: Vec<_> =
                v.0.iter()
                    .map(|f| {
                        let field = f.field.replacen("context_extensions.", "query.", 1);
                        json!({"field": field, "description": f.description})
                    })
                    .collect();
            (
                500,
                json!({"error": "invalid_route_policy",
                    "message": "the gateway's auth URL carries a malformed route policy",
                    "violations": violations}),
            )
        }
        Error::Unauthenticated => (
            401,
            json!({"error": "gateway_unauthenticated",
                "message": "this listener answers the gateway only: send x-tollgate-gateway-secret"}),
        ),
        Error::PermissionDenied(why) => (403, json!({"error": "forbidden", "message": why})),
        Error::Unavailable(detail) => {
            tracing::warn!(error = %detail, "storage unavailable");
            (
                503,
                json!({"error": "unavailable",
                    "message": "Tollgate cannot decide now; retry later"}),
            )
        }
        other => {
            tracing::error!(error = %other, "forward-auth failed");
            (
                500,
                json!({"error": "internal", "message": "internal error"}),
            )
        }
    };
    json_response(status, body.to_string())
}

/// `body` (JSON) on one line of printable ASCII: re-serialised compactly,
/// every non-ASCII character escaped as `\uXXXX`, so it fits a header
/// value unchanged in meaning. Text that is not JSON is escaped the same.
pub(crate) fn ascii_json(body: &str) -> String {
    let compact = serde_json::from_str::<serde_json::Value>(body)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| serde_json::Value::String(body.to_owned()).to_string());
    let mut out = String::with_capacity(compact.len());
    for c in compact.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}
